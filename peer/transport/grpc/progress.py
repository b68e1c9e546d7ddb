"""Per-neighbour progress of the fetches in flight, and the stall decision made from it.

A link cut shorter than the fetch deadline fails nothing: the fetch just waits, and the
training thread with it. :class:`LinkProgress` makes that visible while it lasts. The gRPC
client stamps it with a monotonic time whenever anything arrives from a neighbour (a Fetch
header or chunk, an Info answer) and counts the fetches to each neighbour that are pending;
:meth:`LinkProgress.check`, called a few times a second from the peer's event loop
(:meth:`peer.transport.grpc.node.PeerNode.watch_stalls`), turns that into events:

- ``STALLED``: a fetch to the neighbour is pending and nothing has arrived from it for
  ``stall_seconds`` (counted from the later of its last arrival and the start of the wait);
- ``RESUMED``: something arrived from a stalled neighbour again;
- ``ABANDONED``: every fetch to a stalled neighbour ended with nothing arriving (failed or
  cancelled; the fetch's own error path reports why).

A neighbour that has not published the step yet is silent too, without anything being wrong
with the link. So once half of ``stall_seconds`` has passed in silence, ``check`` also asks for
an ``Info`` probe of it (see :attr:`StallCheck.probe`): a neighbour that answers is alive and
merely not ready (its answer is an arrival), one that does not answer in the other half is
stalled. The probes continue while it is stalled, so a link that comes back is seen at once
even before the pending fetch delivers.

The decision takes ``now`` as an argument and does no I/O, so it is tested with a fake clock.
Stamping is one lock and a few attribute writes per message (a chunk is ~1 MiB), thread safe
for the blocking reader's worker threads.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


class StallState(enum.Enum):
    """What happened to a neighbour's link between two checks."""

    STALLED = "stalled"
    RESUMED = "resumed"
    ABANDONED = "abandoned"


@dataclass(frozen=True)
class StallEvent:
    """One transition of one neighbour.

    Attributes:
        neighbor: the neighbour's rank.
        state: what happened.
        silent_seconds: how long it had been silent (at the stall; for a resume or an
            abandon, from the start of the silence to its end).
    """

    neighbor: int
    state: StallState
    silent_seconds: float


@dataclass(frozen=True)
class StallCheck:
    """The outcome of one :meth:`LinkProgress.check`.

    Attributes:
        events: transitions, in neighbour order.
        probe: neighbours to ask for ``Info`` now (each is marked as probing until
            :meth:`LinkProgress.probe_done`).
    """

    events: tuple[StallEvent, ...] = ()
    probe: tuple[int, ...] = ()


@dataclass
class _Link:
    pending: int = 0
    arrivals: int = 0
    last_arrival: float = float("-inf")
    waiting_since: float = float("-inf")
    stalled_at: float | None = None
    stalled_arrivals: int = 0
    silent_since: float = 0.0
    probing: bool = False


@dataclass
class LinkProgress:
    """Progress of the fetches in flight to each neighbour (see the module docstring).

    Args:
        stall_seconds: silence, with a fetch pending, after which a neighbour is stalled.
        clock: monotonic time source (tests pass their own).
    """

    stall_seconds: float
    clock: Callable[[], float] = time.monotonic
    _links: dict[int, _Link] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.stall_seconds <= 0:
            raise ValueError(f"stall_seconds must be positive, got {self.stall_seconds}")

    def _link(self, neighbor: int) -> _Link:
        link = self._links.get(neighbor)
        if link is None:
            link = self._links[neighbor] = _Link()
        return link

    def fetch_started(self, neighbor: int) -> None:
        """A fetch to ``neighbor`` starts (the silence of a first pending fetch counts from now)."""
        now = self.clock()
        with self._lock:
            link = self._link(neighbor)
            if link.pending == 0:
                link.waiting_since = now
            link.pending += 1

    def fetch_ended(self, neighbor: int) -> None:
        """A fetch to ``neighbor`` ended (delivered, failed or cancelled)."""
        with self._lock:
            link = self._link(neighbor)
            link.pending = max(0, link.pending - 1)

    def arrived(self, neighbor: int) -> None:
        """Something arrived from ``neighbor`` (a message of a stream, an RPC's answer)."""
        now = self.clock()
        with self._lock:
            link = self._link(neighbor)
            link.arrivals += 1
            link.last_arrival = now

    def probe_done(self, neighbor: int) -> None:
        """The ``Info`` probe asked for by :meth:`check` ended (answered or not)."""
        with self._lock:
            self._link(neighbor).probing = False

    def stalled(self) -> dict[int, float]:
        """``{neighbour: seconds silent}`` of the neighbours stalled now."""
        now = self.clock()
        with self._lock:
            return {
                r: now - link.silent_since
                for r, link in sorted(self._links.items())
                if link.stalled_at is not None
            }

    def most_silent(self, candidates: Iterable[int]) -> int | None:
        """The neighbour among ``candidates`` that has been silent longest (lowest rank on ties).

        Silence counts from the later of its last arrival and the start of its oldest pending
        fetch; a neighbour never fetched from counts as silent since forever. This is the one to
        blame for an exchange still waiting on several neighbours: the others were answering.
        """
        with self._lock:
            ranked = [
                (max(link.last_arrival, link.waiting_since) if link else float("-inf"), rank)
                for rank in candidates
                for link in (self._links.get(rank),)
            ]
        return min(ranked)[1] if ranked else None

    def pending(self, neighbor: int) -> int:
        """Fetches to ``neighbor`` in flight."""
        with self._lock:
            link = self._links.get(neighbor)
            return 0 if link is None else link.pending

    def check(self, now: float | None = None) -> StallCheck:
        """Transitions since the last check, and the neighbours to probe.

        Args:
            now: the time to decide at (default: the clock).

        Returns:
            The events and probes (see :class:`StallCheck`).
        """
        now = self.clock() if now is None else now
        events: list[StallEvent] = []
        probe: list[int] = []
        with self._lock:
            for neighbor, link in sorted(self._links.items()):
                silent_since = max(link.last_arrival, link.waiting_since)
                if link.stalled_at is not None:
                    if link.arrivals != link.stalled_arrivals:
                        seconds = link.last_arrival - link.silent_since
                        events.append(StallEvent(neighbor, StallState.RESUMED, seconds))
                        link.stalled_at = None
                    elif link.pending == 0:
                        seconds = now - link.silent_since
                        events.append(StallEvent(neighbor, StallState.ABANDONED, seconds))
                        link.stalled_at = None
                if link.pending == 0:
                    continue
                silent = now - silent_since
                if link.stalled_at is None and silent > self.stall_seconds:
                    link.stalled_at = now
                    link.stalled_arrivals = link.arrivals
                    link.silent_since = silent_since
                    events.append(StallEvent(neighbor, StallState.STALLED, silent))
                if silent > self.stall_seconds / 2 and not link.probing:
                    link.probing = True
                    probe.append(neighbor)
        return StallCheck(tuple(events), tuple(probe))
