"""Typed errors of the exchange layer.

Every error names the neighbour (rank), the vector name and the step it concerns, so that a
log line or a metric label says exactly which edge failed. None of them is fatal to the peer:
the caller (the training loop) decides the policy.
"""

from __future__ import annotations


class ExchangeError(RuntimeError):
    """Base class of every failure to obtain a neighbour's vector."""

    def __init__(
        self,
        message: str,
        *,
        neighbor: int | None = None,
        name: str | None = None,
        step: int | None = None,
    ) -> None:
        super().__init__(message)
        self.neighbor = neighbor
        self.name = name
        self.step = step


class ExchangeTimeout(ExchangeError):
    """A neighbour's vector did not arrive before the deadline."""


class StepEvicted(ExchangeError):
    """The requested step is older than the oldest version the neighbour still retains."""

    def __init__(self, message: str, *, oldest_step: int | None = None, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.oldest_step = oldest_step


class PeerUnavailable(ExchangeError):
    """The neighbour could not be reached (connection refused, down, unknown)."""


class WireError(ExchangeError):
    """The neighbour sent something malformed: wrong dtype, size, checksum, step or sender."""


class AuthError(ExchangeError):
    """The neighbour refused us (bad token or not allowed to read that vector)."""


class FellBehind(ExchangeError):
    """This peer is too far behind its neighbours to mix (it was stopped, or restarted from an
    old checkpoint): it must take a live neighbour's state (``neighbor``) and rejoin."""
