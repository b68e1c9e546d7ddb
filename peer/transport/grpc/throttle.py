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
it). :class:`ExactThrottler` keeps the throttler's sliding window and sleeps once, until the
oldest admissions it needs leave it, and takes all the tokens of one send at once, so a saturated
cap wakes the loop about once per window.
"""

from __future__ import annotations

import asyncio
import logging
import time

from asyncio_throttle import Throttler

logger = logging.getLogger(__name__)

DEFAULT_WINDOW_SECONDS = 0.02
TOKENS_PER_WINDOW = 32


class ExactThrottler(Throttler):
    """A :class:`asyncio_throttle.Throttler` that sleeps until a slot frees instead of polling.

    Same admission rule (at most ``rate_limit`` acquisitions per sliding ``period``); waiters are
    admitted in the order they asked (one lock), so streams sharing the cap are served fairly.
    """

    def __init__(self, rate_limit: int, period: float = 1.0) -> None:
        super().__init__(rate_limit=rate_limit, period=period, retry_interval=period)
        self._lock = asyncio.Lock()

    async def acquire(self, count: int = 1) -> None:
        """Wait until ``count`` more acquisitions fit in the sliding window, and record them.

        Slots are taken as they free (``count`` may exceed ``rate_limit``).
        """
        async with self._lock:
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

    async def acquire(self, nbytes: int) -> None:
        """Wait until ``nbytes`` more bytes may be sent under the cap."""
        if self._throttler is None:
            return
        self._owed_bytes += nbytes
        tokens = int(self._owed_bytes // self._token_bytes)
        if tokens:
            self._owed_bytes -= tokens * self._token_bytes
            await self._throttler.acquire(tokens)
