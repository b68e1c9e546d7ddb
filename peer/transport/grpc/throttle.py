"""Bandwidth cap on the bytes a peer sends, built on :mod:`asyncio_throttle`.

``asyncio_throttle.Throttler`` admits at most ``rate_limit`` acquisitions per sliding window of
``period`` seconds. :class:`BandwidthLimiter` turns bytes into tokens of ``token_bytes`` each and
uses a short window, so the largest burst is ``rate * window_seconds`` bytes and a long transfer
runs at the configured rate. Remainders smaller than one token are carried over to the next
send, so many small chunks are charged exactly. With no cap (the default) :meth:`acquire` returns
at once and costs one attribute test.

A saturated ``Throttler`` polls: it sleeps ``retry_interval`` and looks again, which at a
20 MB/s cap wakes the event loop ~1,600 times a second, and each wake-up takes the GIL from the
training thread (benchmarks/overlap.py measured the pipelined step's compute 4 ms longer for
it). :class:`ExactThrottler` keeps the throttler's sliding window, sleeps until its oldest
admission leaves it and then takes every slot that freed, so a saturated cap wakes the loop once
or twice per window (tests/test_throttle.py). Waiting sends go oldest version first: with a
pipelined exchange (``--pipeline``) the previous step's transfer, which the neighbour is waiting
for, is not slowed by this step's, which it needs only a step later (benchmarks/overlap.py: at
4 MB/s the two shared the cap and finished together, leaving the link idle ~45 ms every other
step).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable

from asyncio_throttle import Throttler

logger = logging.getLogger(__name__)

DEFAULT_WINDOW_SECONDS = 0.02
TOKENS_PER_WINDOW = 32


class ExactThrottler(Throttler):
    """A :class:`asyncio_throttle.Throttler` that sleeps until a slot frees instead of polling.

    Same admission rule (at most ``rate_limit`` acquisitions per sliding ``period``). One caller
    takes slots at a time; the next is the waiter with the lowest ``priority``, then the
    earliest. A caller that says it will be back (``keep``, e.g. a stream with more chunks to
    send) keeps its turn for up to ``period`` against waiters of a higher priority number, so
    a newer stream cannot slip in between an older stream's chunks.
    """

    def __init__(self, rate_limit: int, period: float = 1.0) -> None:
        super().__init__(rate_limit=rate_limit, period=period, retry_interval=period)
        self._busy = False
        self._waiters: list[tuple[float, int, asyncio.Future[None]]] = []
        self._arrivals = itertools.count()
        self._kept_for: object | None = None
        self._kept_timer: asyncio.TimerHandle | None = None

    async def acquire(
        self, count: int = 1, priority: float = 0.0, owner: object = None, keep: bool = False
    ) -> None:
        """Wait until ``count`` more acquisitions fit in the sliding window, and record them.

        Args:
            count: acquisitions (slots are taken as they free; may exceed ``rate_limit``).
            priority: order among queued callers (lowest first, then arrival).
            owner: who is calling (any object; needed with ``keep``).
            keep: this owner will call again soon: hold the turn for it (up to ``period``)
                unless an older (lower-priority) caller is waiting.
        """
        if self._kept_for is not None and self._kept_for is owner:
            self._release_kept()
            if self._waiters and self._waiters[0][0] < priority:
                self._hand_over()  # an older caller came meanwhile: it goes first
                if self._busy:
                    await self._queue(priority)
                else:  # it had been cancelled: nobody took the turn
                    self._busy = True
        elif self._busy:
            await self._queue(priority)
        else:
            self._busy = True
        try:
            await self._take(count)
        except BaseException:
            self._hand_over()
            raise
        if keep and owner is not None:
            self._kept_for = owner
            self._kept_timer = asyncio.get_running_loop().call_later(self.period, self._expire)
        else:
            self._hand_over()

    async def _queue(self, priority: float) -> None:
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._arrivals), turn))
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._hand_over()  # granted just as it was cancelled: pass the turn on
            raise

    def _release_kept(self) -> None:
        if self._kept_timer is not None:
            self._kept_timer.cancel()
        self._kept_for = self._kept_timer = None

    def _expire(self) -> None:
        """The owner did not come back in time: the turn goes to the waiters."""
        self._kept_for = self._kept_timer = None
        self._hand_over()

    def _hand_over(self) -> None:
        while self._waiters:
            _, _, turn = heapq.heappop(self._waiters)
            if not turn.done():  # cancelled waiters are skipped
                turn.set_result(None)
                return
        self._busy = False

    async def _take(self, count: int) -> None:
        due: float | None = None
        while count > 0:
            self.flush()
            free = self.rate_limit - len(self._task_logs)
            if free > 0:
                taken = min(free, count)
                # Log the slots at the instant they freed, not at the (later) wake-up: timer
                # overshoot then shortens the next wait instead of lowering the rate.
                now = time.monotonic()
                self._task_logs.extend([now if due is None else min(due, now)] * taken)
                count -= taken
                continue
            # flush() drops an admission once it is older than ``period``: sleep until the
            # oldest one is (a hair past, so the next flush drops it).
            due = self._task_logs[0] + self.period
            await asyncio.sleep(max(due - time.monotonic(), 0.0) + 1e-6)


class BandwidthLimiter:
    """Limits the send rate of one server (shared by all its streams) to a byte rate.

    Args:
        bytes_per_second: the cap; ``None`` or ``0`` means unlimited.
        window_seconds: sliding window of the underlying throttler (largest burst =
            ``bytes_per_second * window_seconds``).
    """

    def __init__(
        self, bytes_per_second: float | None, window_seconds: float = DEFAULT_WINDOW_SECONDS
    ) -> None:
        if bytes_per_second is not None and bytes_per_second < 0:
            raise ValueError(f"bytes_per_second must be >= 0, got {bytes_per_second}")
        self.bytes_per_second = bytes_per_second or None
        self._throttler: ExactThrottler | None = None
        self._token_bytes = 0.0
        self._owed_bytes = 0.0
        if self.bytes_per_second is not None:
            self._token_bytes = self.bytes_per_second * window_seconds / TOKENS_PER_WINDOW
            self._throttler = ExactThrottler(rate_limit=TOKENS_PER_WINDOW, period=window_seconds)

    @property
    def unlimited(self) -> bool:
        """True when no cap is configured."""
        return self._throttler is None

    async def acquire(
        self, nbytes: int, priority: float = 0.0, stream: object = None, more: bool = False
    ) -> None:
        """Wait until ``nbytes`` more bytes may be sent under the cap.

        Args:
            nbytes: bytes about to be sent.
            priority: sends waiting for the cap go lowest first (the server passes the
                version's step: the oldest version is the one a neighbour is blocked on), then
                in arrival order.
            stream: the stream sending (any object identifying it), for ``more``.
            more: this stream sends again right after: newer streams do not get the cap in
                between (for at most one window).
        """
        if self._throttler is None:
            return
        self._owed_bytes += nbytes
        tokens = int(self._owed_bytes // self._token_bytes)
        if tokens:
            self._owed_bytes -= tokens * self._token_bytes
            await self._throttler.acquire(tokens, priority, stream, more)

    async def paced(
        self, messages: Iterable[bytes] | AsyncIterable[bytes], priority: float = 0.0
    ) -> AsyncIterator[bytes]:
        """The messages of one stream, each let through once the cap admits it.

        The stream keeps its turn between its messages (it says ``more`` while another follows),
        so a newer stream does not slip in between them; ``priority`` as in :meth:`acquire`.
        Without a cap the messages pass straight through. ``messages`` may be asynchronous
        (chunks coded in a worker thread as the stream goes).
        """
        iterator = _as_async(messages)
        if self._throttler is None:
            async for message in iterator:
                yield message
            return
        stream = object()
        current: bytes | None = await anext(iterator, None)
        while current is not None:
            following = await anext(iterator, None)  # one ahead: is this the stream's last?
            await self.acquire(len(current), priority, stream, more=following is not None)
            yield current
            current = following


async def _as_async(messages: Iterable[bytes] | AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    if isinstance(messages, AsyncIterable):
        async for message in messages:
            yield message
    else:
        for message in messages:
            yield message
