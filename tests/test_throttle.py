"""The bandwidth limiter: exact long-run rate, the sliding-window burst, and no polling."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from peer.transport.grpc import throttle
from peer.transport.grpc.throttle import BandwidthLimiter, ExactThrottler


def _send(limiter: BandwidthLimiter, total: int, chunk: int) -> float:
    async def run() -> float:
        started = time.perf_counter()
        sent = 0
        while sent < total:
            await limiter.acquire(chunk)
            sent += chunk
        return time.perf_counter() - started

    return asyncio.run(run())


@pytest.mark.parametrize("chunk", [10_000, 65_536, 1 << 20, 4 << 20])
def test_long_run_rate_is_the_cap(chunk: int) -> None:
    """Timer overshoot must not lower the rate: 6 MB at 40 MB/s take 150 ms less the burst."""
    cap, total = 40e6, 6_000_000
    limiter = BandwidthLimiter(cap)
    burst = cap * throttle.DEFAULT_WINDOW_SECONDS
    sent = -(-total // chunk) * chunk
    expected = (sent - burst) / cap  # the last acquire returns once all its tokens are in
    assert _send(limiter, total, chunk) == pytest.approx(expected, abs=0.03)


def test_burst_passes_at_once_then_the_rate_holds() -> None:
    async def run() -> tuple[float, float]:
        limiter = BandwidthLimiter(10e6)  # tokens of 6.25 kB, 200 kB per 20 ms window
        started = time.perf_counter()
        await limiter.acquire(187_500)  # 30 of the 32 tokens
        burst = time.perf_counter() - started
        await limiter.acquire(100_000)  # 2 tokens now, 14 when the first 30 leave the window
        return burst, time.perf_counter() - started

    burst, total = asyncio.run(run())
    assert burst < 0.005
    assert total == pytest.approx(throttle.DEFAULT_WINDOW_SECONDS, abs=0.01)


def test_a_saturated_cap_sleeps_once_or_twice_per_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """asyncio_throttle polls every retry_interval (1,600 wake-ups a second at 32 tokens per
    20 ms); the exact throttler sleeps until the slots it needs free."""
    sleeps: list[float] = []
    real_sleep = asyncio.sleep

    async def counting_sleep(delay: float) -> None:
        sleeps.append(delay)
        await real_sleep(delay)

    monkeypatch.setattr(throttle.asyncio, "sleep", counting_sleep)
    seconds = _send(BandwidthLimiter(20e6), 4_000_000, 1 << 20)
    windows = seconds / throttle.DEFAULT_WINDOW_SECONDS
    # Polling would sleep TOKENS_PER_WINDOW (32) times a window; slots freed in two groups
    # (a send that spanned a window boundary) can take two sleeps.
    assert len(sleeps) <= 2 * windows + 2


def test_admission_rule_and_order() -> None:
    """At most rate_limit admissions per sliding period, waiters served in arrival order."""

    async def run() -> list[tuple[int, float]]:
        throttler = ExactThrottler(rate_limit=2, period=0.05)
        admitted: list[tuple[int, float]] = []
        started = time.monotonic()

        async def one(index: int, count: int) -> None:
            await throttler.acquire(count)
            admitted.append((index, time.monotonic() - started))

        await asyncio.gather(one(0, 2), one(1, 3), one(2, 1))
        return admitted

    admitted = asyncio.run(run())
    assert [index for index, _ in admitted] == [0, 1, 2]
    times = dict(admitted)
    assert times[0] < 0.01
    assert times[1] == pytest.approx(0.10, abs=0.02)  # 2 slots at 0.05, the third at 0.10
    assert times[2] == pytest.approx(0.10, abs=0.02)  # the slot free at 0.10


def test_unlimited_and_bad_caps() -> None:
    assert BandwidthLimiter(None).unlimited and BandwidthLimiter(0).unlimited
    assert _send(BandwidthLimiter(None), 10**9, 1 << 20) < 0.05
    with pytest.raises(ValueError, match="bytes_per_second must be >= 0"):
        BandwidthLimiter(-1)


def _order(script: Any) -> list[str]:
    """Run ``script(throttler, log)`` on a 2-slot, 50 ms throttler; the order callers got in."""

    async def run() -> list[str]:
        throttler = ExactThrottler(rate_limit=2, period=0.05)
        log: list[str] = []
        await script(throttler, log)
        return log

    return asyncio.run(run())


def test_queued_sends_go_lowest_priority_first() -> None:
    async def script(throttler: ExactThrottler, log: list[str]) -> None:
        async def one(name: str, priority: float) -> None:
            await throttler.acquire(2, priority)
            log.append(name)

        await throttler.acquire(2)  # the window is full: the holder has to wait for slots
        holder = asyncio.ensure_future(one("holder", 9))
        await asyncio.sleep(0)  # the holder owns the turn while it waits
        await asyncio.gather(holder, one("newer", 5), one("older", 3))

    assert _order(script) == ["holder", "older", "newer"]


def test_a_stream_keeps_its_turn_between_chunks() -> None:
    """An older stream's second chunk goes before a newer stream that queued during its first."""

    async def script(throttler: ExactThrottler, log: list[str]) -> None:
        old, new = object(), object()

        async def old_stream() -> None:
            await throttler.acquire(2, 1, old, keep=True)
            log.append("old chunk 1")
            await asyncio.sleep(0.005)  # the chunk is written; the next acquire comes soon
            await throttler.acquire(2, 1, old, keep=False)
            log.append("old chunk 2")

        async def new_stream() -> None:
            await asyncio.sleep(0.001)
            await throttler.acquire(2, 2, new)
            log.append("new chunk 1")

        await asyncio.gather(old_stream(), new_stream())

    assert _order(script) == ["old chunk 1", "old chunk 2", "new chunk 1"]


def test_a_kept_turn_expires_and_an_older_caller_still_goes_first() -> None:
    async def script(throttler: ExactThrottler, log: list[str]) -> None:
        gone, kept = object(), object()
        started = time.monotonic()
        await throttler.acquire(1, 1, gone, keep=True)  # never comes back
        await throttler.acquire(1, 2)
        waited.append(time.monotonic() - started)
        await throttler.acquire(2, 5, kept, keep=True)

        async def older() -> None:
            await throttler.acquire(2, 3)
            log.append("older")

        async def owner_again() -> None:
            await asyncio.sleep(0.002)
            await throttler.acquire(2, 5, kept)
            log.append("owner")

        await asyncio.gather(older(), owner_again())

    waited: list[float] = []
    assert _order(script) == ["older", "owner"]
    assert waited[0] == pytest.approx(0.05, abs=0.02)  # one period for the owner that left


def test_a_cancelled_waiter_does_not_stall_the_others() -> None:
    async def script(throttler: ExactThrottler, log: list[str]) -> None:
        await throttler.acquire(1, 0, "holder", keep=True)
        cancelled = asyncio.ensure_future(throttler.acquire(1, 1))
        later = asyncio.ensure_future(throttler.acquire(1, 2))
        await asyncio.sleep(0.001)
        cancelled.cancel()
        await asyncio.wait_for(later, timeout=1.0)
        log.append("later")

    assert _order(script) == ["later"]


def test_an_owner_whose_older_rival_was_cancelled_goes_on() -> None:
    async def script(throttler: ExactThrottler, log: list[str]) -> None:
        owner = object()
        await throttler.acquire(1, 5, owner, keep=True)
        rival = asyncio.ensure_future(throttler.acquire(1, 1))  # older, queues behind the turn
        await asyncio.sleep(0.001)
        rival.cancel()
        await asyncio.sleep(0)
        await asyncio.wait_for(throttler.acquire(1, 5, owner), timeout=1.0)
        log.append("owner")
        await asyncio.wait_for(throttler.acquire(1, 9), timeout=1.0)  # the turn is free again
        log.append("next")

    assert _order(script) == ["owner", "next"]


def test_paced_streams_send_the_older_version_whole_first() -> None:
    async def run() -> list[str]:
        limiter = BandwidthLimiter(10e6)  # 200 kB window: each 150 kB message waits for slots
        sent: list[str] = []

        async def stream(name: str, step: int, count: int, delay: float) -> None:
            await asyncio.sleep(delay)
            messages = (bytes(150_000) for _ in range(count))
            async for index, _ in _aenumerate(limiter.paced(messages, priority=step)):
                sent.append(f"{name}{index}")

        await asyncio.gather(stream("old", 1, 3, 0.0), stream("new", 2, 2, 0.002))
        return sent

    assert asyncio.run(run()) == ["old0", "old1", "old2", "new0", "new1"]


def test_unlimited_paced_passes_messages_through() -> None:
    async def run() -> list[bytes]:
        return [m async for m in BandwidthLimiter(None).paced([b"a", b"b"], priority=3)]

    assert asyncio.run(run()) == [b"a", b"b"]


async def _aenumerate(items: Any) -> Any:
    index = 0
    async for item in items:
        yield index, item
        index += 1
