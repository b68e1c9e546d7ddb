"""Bandwidth cap on the bytes a peer sends, built on :mod:`asyncio_throttle`.

``asyncio_throttle.Throttler`` admits at most ``rate_limit`` acquisitions per sliding window of
``period`` seconds. :class:`BandwidthLimiter` turns bytes into tokens of ``token_bytes`` each and
uses a short window, so the largest burst is ``rate * window_seconds`` bytes and a long transfer
runs at the configured rate. Remainders smaller than one token are carried over to the next
send, so many small chunks are charged exactly. With no cap (the default) :meth:`acquire` returns
at once and costs one attribute test.
"""

from __future__ import annotations

import logging

from asyncio_throttle import Throttler

logger = logging.getLogger(__name__)

DEFAULT_WINDOW_SECONDS = 0.02
TOKENS_PER_WINDOW = 32


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
        self._throttler: Throttler | None = None
        self._token_bytes = 0.0
        self._owed_bytes = 0.0
        if self.bytes_per_second is not None:
            self._token_bytes = self.bytes_per_second * window_seconds / TOKENS_PER_WINDOW
            self._throttler = Throttler(
                rate_limit=TOKENS_PER_WINDOW,
                period=window_seconds,
                retry_interval=window_seconds / TOKENS_PER_WINDOW,
            )

    @property
    def unlimited(self) -> bool:
        """True when no cap is configured."""
        return self._throttler is None

    async def acquire(self, nbytes: int) -> None:
        """Wait until ``nbytes`` more bytes may be sent under the cap."""
        if self._throttler is None:
            return
        self._owed_bytes += nbytes
        while self._owed_bytes >= self._token_bytes:
            await self._throttler.acquire()
            self._owed_bytes -= self._token_bytes
