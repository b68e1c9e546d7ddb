"""The live graph: who is up, when to probe and re-admit a neighbour, and the weights to mix with.

Pure decisions, no I/O (torchft's quorum style): every function takes the clock (``now``) and
the views it decides on as arguments, so the transport calls them with real time and the tests
with made-up time.

*Membership.* Each peer keeps, per in-neighbour, a :class:`NeighborStatus`. A neighbour that
misses the exchange deadline (the detection delay), refuses connections or answers UNAVAILABLE
is marked :attr:`LinkState.DOWN` by the peer that reads from it; nobody else is told. A down
neighbour is probed at most every ``probe_interval_seconds`` and re-admitted (from the next
step) once it answers and its step is within ``readmit_margin_steps`` of ours: a neighbour that
is far behind (a stalled or restarted peer) must first catch up from a live neighbour's state,
so it never drags the others back. A peer that sees a neighbour ``behind_steps`` or more ahead
of itself has fallen behind and must take a neighbour's state (:func:`fell_behind`).

*Weights on the live graph.* Each peer declares, with every vector it publishes, the set of
in-neighbours it mixes at that step (``L_i(k)``). For an undirected graph with
Metropolis-Hastings weights an edge ``(i, j)`` is used at step ``k`` iff ``j`` is in ``L_i(k)``,
``i`` is in ``L_j(k)`` and the vector arrived; its weight is the topology's own weight when both
ends declare their full neighbourhood, and otherwise ``1 / (1 + max(|L_i|, |L_j|))``, the
Metropolis-Hastings weight of the live degrees (:func:`metropolis_live_row`). Both ends compute
the same number from the same two declarations, so the live ``W`` is symmetric and doubly
stochastic as soon as both ends of every link agree; while they disagree (one step, when a link
fails in one direction only) every row is still stochastic. For directed and time-varying graphs
(and explicit weights) a missing in-neighbour's weight goes to the self weight
(:func:`self_absorbing_row`): rows stay stochastic but columns do not, so the network average
drifts while a peer is down (measured by ``benchmarks/faults.py``). Without faults both
functions return the topology's row unchanged, bit for bit.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping, Set
from dataclasses import dataclass, replace

logger = logging.getLogger(__name__)

DEFAULT_DETECTION_SECONDS = 5.0
DEFAULT_PROBE_INTERVAL_SECONDS = 0.5


class LinkState(enum.Enum):
    """State of the link from one in-neighbour, as the reading peer sees it."""

    UP = "up"
    DOWN = "down"


class MixingMode(enum.Enum):
    """How a peer reweights its row when in-neighbours are missing."""

    METROPOLIS = "metropolis"  # undirected static graph: MH on the live degrees
    SELF_ABSORBING = "self-absorbing"  # a missing neighbour's weight goes to the self weight


@dataclass(frozen=True)
class MembershipPolicy:
    """When a neighbour is down, probed, re-admitted, and when a peer has fallen behind.

    Attributes:
        detection_seconds: an exchange that waits this long for a neighbour marks it down.
        probe_interval_seconds: least time between two probes of a down neighbour.
        readmit_margin_steps: a probed neighbour is re-admitted when its step is at least our
            step minus this (it must be able to fetch our retained versions to catch up).
        behind_steps: a neighbour this many steps ahead of us means we fell behind.
    """

    detection_seconds: float = DEFAULT_DETECTION_SECONDS
    probe_interval_seconds: float = DEFAULT_PROBE_INTERVAL_SECONDS
    readmit_margin_steps: int = 2
    behind_steps: int = 4

    def __post_init__(self) -> None:
        if self.detection_seconds <= 0 or self.probe_interval_seconds <= 0:
            raise ValueError("detection_seconds and probe_interval_seconds must be positive")
        if not 0 <= self.readmit_margin_steps < self.behind_steps:
            raise ValueError("need 0 <= readmit_margin_steps < behind_steps")


@dataclass(frozen=True)
class NeighborStatus:
    """One in-neighbour as this peer sees it.

    Attributes:
        state: up or down.
        since: time of the last transition (``now`` of the caller's clock).
        last_probe: time of the last probe sent while down (``-inf``: never).
        changes: number of transitions so far (membership changes on this edge).
        known_step: the newest step this neighbour was seen at (probe or served version).
        reason: why it went down (for logs).
    """

    state: LinkState = LinkState.UP
    since: float = 0.0
    last_probe: float = float("-inf")
    changes: int = 0
    known_step: int | None = None
    reason: str = ""

    @property
    def up(self) -> bool:
        """Whether the neighbour is mixed."""
        return self.state is LinkState.UP


def mark_down(status: NeighborStatus, now: float, reason: str) -> NeighborStatus:
    """The neighbour failed an exchange (timeout, refused, UNAVAILABLE): down from ``now``."""
    if not status.up:
        return replace(status, reason=reason)
    return replace(
        status, state=LinkState.DOWN, since=now, changes=status.changes + 1, reason=reason
    )


def should_probe(status: NeighborStatus, now: float, policy: MembershipPolicy) -> bool:
    """Whether to probe a down neighbour now (at most once per probe interval)."""
    return not status.up and now - status.last_probe >= policy.probe_interval_seconds


def probe_sent(status: NeighborStatus, now: float) -> NeighborStatus:
    """Record that a probe left at ``now``."""
    return replace(status, last_probe=now)


def may_readmit(their_step: int, own_step: int, policy: MembershipPolicy) -> bool:
    """Whether a neighbour at ``their_step`` may be mixed again by a peer at ``own_step``.

    It must be close enough behind to catch up from our retained versions, and not so far
    ahead that it means *we* fell behind.
    """
    return own_step - policy.readmit_margin_steps <= their_step < own_step + policy.behind_steps


def probe_answered(
    status: NeighborStatus, now: float, their_step: int, own_step: int, policy: MembershipPolicy
) -> NeighborStatus:
    """A probe of a down neighbour answered: re-admit it if :func:`may_readmit` says so."""
    seen = replace(status, known_step=their_step)
    if status.up or not may_readmit(their_step, own_step, policy):
        return seen
    return replace(seen, state=LinkState.UP, since=now, changes=status.changes + 1, reason="")


def saw_step(status: NeighborStatus, step: int) -> NeighborStatus:
    """Record a step the neighbour was seen at (a served version, a probe)."""
    if status.known_step is not None and status.known_step >= step:
        return status
    return replace(status, known_step=step)


def fell_behind(
    own_step: int, statuses: Mapping[int, NeighborStatus], policy: MembershipPolicy
) -> int | None:
    """The neighbour to take state from if this peer fell behind, else None.

    A peer fell behind when some neighbour was seen ``behind_steps`` or more ahead of it (it was
    stopped, or restarted from an old checkpoint). The most advanced neighbour is returned (the
    lowest rank among equals), so that the state taken is as fresh as possible.
    """
    ahead = [
        (status.known_step, rank)
        for rank, status in statuses.items()
        if status.known_step is not None and status.known_step >= own_step + policy.behind_steps
    ]
    if not ahead:
        return None
    best = max(step for step, _ in ahead)
    return min(rank for step, rank in ahead if step == best)


def live_set(statuses: Mapping[int, NeighborStatus], neighbors: Set[int]) -> frozenset[int]:
    """The in-neighbours of ``neighbors`` currently up (unknown ones count as up)."""
    return frozenset(j for j in neighbors if statuses.get(j, NeighborStatus()).up)


def mixing_mode(weights_scheme: str, time_varying: bool) -> MixingMode:
    """:attr:`MixingMode.METROPOLIS` for a static graph with Metropolis-Hastings weights (an
    undirected graph), else :attr:`MixingMode.SELF_ABSORBING`."""
    if weights_scheme == "metropolis" and not time_varying:
        return MixingMode.METROPOLIS
    return MixingMode.SELF_ABSORBING


def self_absorbing_row(
    self_weight: float, weights: Mapping[int, float], received: Set[int]
) -> tuple[float, dict[int, float]]:
    """Row of ``W`` when only ``received`` arrived: missing weights go to the self weight.

    Args:
        self_weight: the topology's ``w_ii``.
        weights: the topology's ``{j: w_ij}``.
        received: the in-neighbours whose vectors are mixed.

    Returns:
        ``(w_ii, {j: w_ij})`` over the received neighbours; the topology's row unchanged when
        every neighbour arrived.
    """
    if received >= weights.keys():
        return self_weight, dict(weights)
    missing = sum(w for j, w in weights.items() if j not in received)
    return self_weight + missing, {j: w for j, w in weights.items() if j in received}


def metropolis_live_row(
    rank: int,
    self_weight: float,
    weights: Mapping[int, float],
    own_live: Set[int],
    their_live: Mapping[int, Set[int] | None],
    full_degrees: Mapping[int, int],
) -> tuple[float, dict[int, float]]:
    """Row ``rank`` of the Metropolis-Hastings matrix of the live graph (see the module doc).

    Args:
        rank: this peer ``i``.
        self_weight: the topology's ``w_ii``.
        weights: the topology's ``{j: w_ij}`` (all in-neighbours of the full graph).
        own_live: ``L_i``, the in-neighbours this peer declared it mixes at this step.
        their_live: for every neighbour whose vector arrived, the set ``L_j`` it declared
            (``None``: it declared nothing, an older peer: taken as its full neighbourhood).
        full_degrees: every neighbour's degree in the full graph.

    Returns:
        ``(w_ii, {j: w_ij})`` over the edges used; exactly the topology's row when every
        neighbour is live, arrived and declared its full neighbourhood.
    """
    full_own = len(weights)
    own_degree = len(own_live)
    used: dict[int, float] = {}
    degraded = own_degree != full_own
    for j in sorted(weights):
        if j not in own_live or j not in their_live:
            degraded = True
            continue
        declared = their_live[j]
        their_degree = full_degrees[j] if declared is None else len(declared)
        if declared is not None and rank not in declared:
            degraded = True
            continue
        if own_degree == full_own and their_degree == full_degrees[j]:
            used[j] = weights[j]
        else:
            degraded = True
            used[j] = 1.0 / (1 + max(own_degree, their_degree))
    if not degraded:
        return self_weight, used
    return 1.0 - sum(used.values()), used
