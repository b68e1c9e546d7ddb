"""The communication interface every optimizer talks to, and its in-memory implementation.

Decentralized methods need exactly two collective operations:

* *partial averaging* -- publish my vector for step ``k`` and mix it with the vectors my
  in-neighbours published for step ``k``: ``sum_j w_ij v_j`` over ``j in N_i + {i}``;
* *global averaging* -- ``(1/n) sum_j v_j`` (PmSGD, periodic global averaging).

Both are started without blocking and return a :class:`Handle`; ``handle.wait()`` returns the
mixed vector. A :class:`Communicator` is one peer's end of a transport. There are two
transports behind the same interface, and one contract test
(``tests/test_exchange_contract.py``) runs against both:

* :class:`InMemoryFabric` / :class:`InMemoryCommunicator` (this module): peers are threads of
  one process sharing a board of published vectors. Used by fast unit tests of the optimizers.
* ``peer.transport.grpc.communicator.GrpcCommunicator``: real peers over gRPC.

Semantics shared by both transports:

* A published vector is snapshotted at publish time: the caller may mutate its tensor right
  after ``*_async`` returns.
* Each peer retains the last ``retained_versions`` steps per name. Asking for a step older than
  the oldest retained one raises :class:`~peer.errors.StepEvicted`.
* ``max_staleness = T``: if a neighbour's vector for step ``k`` is not there yet, the freshest
  one with step in ``[k - T, k]`` is used (``T = 0`` is the synchronous algorithm). The handle
  waits only when no acceptable version exists, and never longer than the deadline.
* A deadline miss raises :class:`~peer.errors.ExchangeTimeout` naming the neighbour and step.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from peer.errors import StepEvicted

logger = logging.getLogger(__name__)

DEFAULT_DEADLINE_SECONDS = 30.0
DEFAULT_RETAINED_VERSIONS = 4
GLOBAL_PREFIX = "global/"

# Histogram buckets (seconds) of exchange latencies and iteration times: 1 ms to 60 s, shared by
# every transport's metrics and the training metrics so their panels line up.
LATENCY_BUCKETS_SECONDS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class PeerViewLike(Protocol):
    """One peer's mixing step at one iteration (``topology.PeerView`` or a test double)."""

    @property
    def self_weight(self) -> float:
        """``w_ii``."""

    @property
    def in_neighbors(self) -> Mapping[int, float]:
        """``{j: w_ij}``: the peers this one mixes from."""

    @property
    def out_neighbors(self) -> Collection[int]:
        """The peers that mix this one's vector."""


class TopologyLike(Protocol):
    """What the transports and the peer process read of a topology (``topology.Topology``)."""

    @property
    def period(self) -> int:
        """Iterations before the views repeat (1 when static)."""

    def view(self, rank: int, k: int) -> PeerViewLike:
        """Peer ``rank``'s view of the mixing step at iteration ``k``."""


def neighbors_over_period(
    topology: TopologyLike, rank: int, *, incoming: bool = True, outgoing: bool = False
) -> set[int]:
    """Every in-neighbour (and/or out-neighbour) of ``rank`` over one period of the topology.

    Args:
        topology: the topology.
        rank: the peer.
        incoming: include the peers ``rank`` mixes from.
        outgoing: include the peers that mix ``rank``'s vector.

    Returns:
        The neighbours' ranks (never ``rank`` itself).
    """
    found: set[int] = set()
    for k in range(max(1, topology.period)):
        view = topology.view(rank, k)
        if incoming:
            found.update(int(j) for j in view.in_neighbors)
        if outgoing:
            found.update(int(j) for j in view.out_neighbors)
    found.discard(rank)
    return found


@dataclass
class ExchangeStats:
    """What one completed exchange observed (filled in by the transport).

    Attributes:
        wait_seconds: total time callers spent blocked in :meth:`Handle.wait` and
            :meth:`Handle.wait_done` (every slice of an interruptible wait).
        latency_seconds: per neighbour, time from start to the vector being available.
        used_steps: per neighbour, the step of the version actually mixed (staleness = step -
            used_step).
        bytes_received: total payload bytes received from neighbours.
    """

    wait_seconds: float = 0.0
    latency_seconds: dict[int, float] = field(default_factory=dict)
    used_steps: dict[int, int] = field(default_factory=dict)
    bytes_received: int = 0


class Handle(abc.ABC):
    """A nonblocking exchange in flight. Thread-safe; ``wait`` may be called more than once.

    An exchange is *in flight* until it has *finished*, either with the mixed vector or with
    its own error (a neighbour missed the exchange's deadline, a step was evicted, ...).
    :meth:`wait_done` tells the two apart from "not finished yet" without raising, so a caller
    can wait in short slices (to notice a stop request) without spinning on a failed exchange;
    :meth:`wait` then returns the vector or raises the exchange's own error. Every second a
    caller spends blocked in either method is added to ``stats.wait_seconds``.
    """

    stats: ExchangeStats

    @abc.abstractmethod
    def done(self) -> bool:
        """True once the exchange has finished (:meth:`wait` returns or raises at once)."""

    @abc.abstractmethod
    def wait_done(self, timeout: float) -> bool:
        """Block until the exchange has finished, at most ``timeout`` seconds.

        Args:
            timeout: seconds to block at most (``0`` only looks).

        Returns:
            ``True`` once it has finished (with a result or with an error), ``False`` while it
            is still in flight. Never raises an exchange error.
        """

    @abc.abstractmethod
    def wait(self, timeout: float | None = None) -> torch.Tensor:
        """Block until the mixed vector is ready and return it.

        Args:
            timeout: seconds to wait at most; ``None`` uses the exchange's own deadline.

        Returns:
            The weighted average, with the shape, dtype and device of the published tensor.

        Raises:
            peer.errors.ExchangeError: the exchange failed (its own error, e.g.
                :class:`~peer.errors.ExchangeTimeout` naming the neighbour that missed the
                exchange's deadline), or :class:`~peer.errors.ExchangeTimeout` when it is
                still in flight after ``timeout`` seconds.
        """


class CompletedHandle(Handle):
    """A handle whose result is already known (e.g. a peer with no neighbours)."""

    def __init__(self, result: torch.Tensor) -> None:
        self._result = result
        self.stats = ExchangeStats()

    def done(self) -> bool:
        return True

    def wait_done(self, timeout: float) -> bool:
        return True

    def wait(self, timeout: float | None = None) -> torch.Tensor:
        return self._result


class Communicator(abc.ABC):
    """One peer's end of a transport. See the module docstring for the shared semantics."""

    rank: int
    world_size: int
    # The topology whose views give default weights; None when every call passes weights.
    topology: TopologyLike | None = None

    @abc.abstractmethod
    def neighbor_average_async(
        self,
        name: str,
        tensor: torch.Tensor,
        step: int,
        self_weight: float | None = None,
        src_weights: Mapping[int, float] | None = None,
        *,
        max_staleness: int = 0,
        copy: bool = True,
        damp_stale: bool = True,
    ) -> Handle:
        """Publish ``tensor`` as ``(name, step)`` and start mixing it with the in-neighbours'.

        Args:
            name: vector name (e.g. ``"params/float32"`` or a bucket name).
            tensor: this peer's vector; snapshotted before returning.
            step: iteration number ``k``.
            self_weight: ``w_ii``; with ``src_weights`` overrides the topology's view at ``step``.
            src_weights: ``{j: w_ij}`` for the in-neighbours to fetch from.
            max_staleness: accept a neighbour's version from steps ``[step - T, step]``.
            copy: ``False`` hands ``tensor`` over instead of snapshotting it: the caller
                promises never to modify it again (the optimizer's fresh messages), which saves
                one copy of the vector per exchange.
            damp_stale: mix a stale neighbour vector with weight ``w_ij / (1 + tau)``
                (:func:`damp_stale_weights`); ``False`` keeps the exact ``w_ij`` (DecentLaM's
                staleness-aware rule, whose fixed point needs the symmetric ``W``).

        Returns:
            A :class:`Handle` whose ``wait()`` gives ``w_ii * tensor + sum_j w_ij * x_j``.
        """

    def global_average_async(
        self, name: str, tensor: torch.Tensor, step: int, *, copy: bool = True
    ) -> Handle:
        """Publish ``tensor`` and start computing the exact average over all peers
        (``copy`` as in :meth:`neighbor_average_async`).

        Every transport that can fetch from any peer gets it for free: a neighbour average with
        weight ``1/n`` on everybody, under a ``global/`` name any peer may read.
        """
        n = self.world_size
        others = {j: 1.0 / n for j in range(n) if j != self.rank}
        return self.neighbor_average_async(
            GLOBAL_PREFIX + name, tensor, step, 1.0 / n, others, copy=copy
        )

    def _mixing_weights(
        self,
        step: int,
        self_weight: float | None,
        src_weights: Mapping[int, float] | None,
        max_staleness: int,
    ) -> tuple[float, dict[int, float]]:
        """Checked arguments of one partial average: ``(w_ii, {j: w_ij})`` (shared by the
        transports' :meth:`neighbor_average_async`)."""
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        return resolve_weights(self.topology, self.rank, step, self_weight, src_weights)

    def neighbor_average(
        self,
        name: str,
        tensor: torch.Tensor,
        step: int,
        self_weight: float | None = None,
        src_weights: Mapping[int, float] | None = None,
        *,
        max_staleness: int = 0,
        timeout: float | None = None,
    ) -> torch.Tensor:
        """Blocking form of :meth:`neighbor_average_async`."""
        handle = self.neighbor_average_async(
            name, tensor, step, self_weight, src_weights, max_staleness=max_staleness
        )
        return handle.wait(timeout)

    def publish(self, name: str, tensor: torch.Tensor, step: int) -> torch.Tensor | None:
        """Publish ``(name, step)`` without mixing (e.g. republishing after a resume)."""
        raise NotImplementedError(f"{type(self).__name__} cannot publish alone")

    def retained_versions(self, min_step: int) -> dict[str, dict[int, torch.Tensor]]:
        """This peer's own published versions with step >= ``min_step``, per name.

        A checkpoint stores them and a resumed peer republishes them, so that neighbours that
        stopped a step behind can still fetch the vectors they need to catch up.
        """
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook, most transports override it
        """Release channels, threads and retained buffers."""

    def __enter__(self) -> Communicator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resolve_weights(
    topology: TopologyLike | None,
    rank: int,
    step: int,
    self_weight: float | None,
    src_weights: Mapping[int, float] | None,
) -> tuple[float, dict[int, float]]:
    """Weights to use for one partial average: explicit ones, else the topology's view at ``step``.

    Args:
        topology: an object with ``view(rank, step)`` returning ``self_weight`` and
            ``in_neighbors`` (``topology.Topology``), or ``None`` when weights are explicit.
        rank: this peer.
        step: the iteration (time-varying graphs change their view with it).
        self_weight: explicit ``w_ii`` or ``None``.
        src_weights: explicit ``{j: w_ij}`` or ``None``.

    Returns:
        ``(self_weight, {j: w_ij})`` with neighbours sorted by rank.
    """
    if src_weights is not None:
        if self_weight is None:
            self_weight = 1.0 - float(sum(src_weights.values()))
        return float(self_weight), {int(j): float(w) for j, w in sorted(src_weights.items())}
    if topology is None:
        raise ValueError("no topology given: pass self_weight and src_weights explicitly")
    view = topology.view(rank, step)
    weight = float(view.self_weight) if self_weight is None else float(self_weight)
    return weight, {int(j): float(w) for j, w in sorted(view.in_neighbors.items())}


def choose_step(
    retained_steps: Sequence[int],
    step: int,
    min_step: int,
    *,
    name: str,
    neighbor: int | None = None,
) -> int | None:
    """Which retained version answers a request for ``step`` (shared by every transport).

    The exact step is preferred, else the freshest retained step in ``[min_step, step]``.

    Args:
        retained_steps: the retained steps of ``name``, oldest first.
        step: newest acceptable step.
        min_step: oldest acceptable step (``step - max_staleness``).
        name: vector name (for the error).
        neighbor: the peer that retains them (for the error), if known.

    Returns:
        The chosen step, or ``None`` when none is acceptable yet (wait for a publish).

    Raises:
        StepEvicted: ``step`` is older than the oldest retained step, or newer steps are retained
            but none in range (the peer skipped them): it will never come.
    """
    if not retained_steps:
        return None
    if step in retained_steps:
        return step
    acceptable = [s for s in retained_steps if min_step <= s <= step]
    if acceptable:
        return max(acceptable)
    oldest = retained_steps[0]
    if oldest > step:
        owner = "" if neighbor is None else f"peer {neighbor}: "
        raise StepEvicted(
            f"{owner}{name!r} step {step} is no longer retained (oldest retained: {oldest})",
            neighbor=neighbor,
            name=name,
            step=step,
            oldest_step=oldest,
        )
    newest = retained_steps[-1]
    if newest > step:
        # Published past the range without it: the peer skipped those steps (it rejoined from a
        # neighbour's state, peer.rejoin); they will never come.
        owner = "" if neighbor is None else f"peer {neighbor}: "
        raise StepEvicted(
            f"{owner}{name!r} steps [{min_step}, {step}] were skipped (it rejoined at a later "
            f"step; retained: {list(retained_steps)})",
            neighbor=neighbor,
            name=name,
            step=step,
            oldest_step=oldest,
        )
    return None


def damp_stale_weights(
    self_weight: float, weights: Mapping[int, float], used_steps: Mapping[int, int], step: int
) -> tuple[float, dict[int, float]]:
    """Weights for mixing when some neighbours' vectors are stale (bounded-staleness mode).

    A vector from ``tau = step - used_step`` steps ago gets weight ``w_ij / (1 + tau)`` and the
    rest goes to the peer's own vector, so each row still sums to 1. Without this, stale
    positions act as a delayed spring: for DecentLaM the consensus mode moving with velocity
    ``v`` evolves as ``v <- (beta - sum_j w_ij tau_j) v`` (unstable once the sum exceeds
    ``1 + beta``, e.g. a ring with ``tau = 3``); with the damping the factor stays inside
    ``(beta - 1, beta)``. Fresh vectors (``tau = 0``, always the case when ``T = 0``) keep
    their weights bit for bit, so the synchronous algorithm is unchanged.
    """
    damped = dict(weights)
    moved = 0.0
    for j, used in used_steps.items():
        tau = step - used
        if tau > 0 and j in damped:
            reduced = damped[j] / (1 + tau)
            moved += damped[j] - reduced
            damped[j] = reduced
    return (self_weight + moved if moved else self_weight), damped


def weighted_sum(
    own: torch.Tensor,
    self_weight: float,
    others: Mapping[int, torch.Tensor],
    weights: Mapping[int, float],
    self_rank: int,
) -> torch.Tensor:
    """``self_weight * own + sum_j weights[j] * others[j]``, summed in rank order.

    Every transport mixes with this one function, and the terms are added in increasing rank
    order with the peer's own term at its own rank, so a global average comes out bit-identical
    on every peer and the transports agree to the last bit.
    """
    terms = {**{j: (others[j], weights[j]) for j in weights}, self_rank: (own, self_weight)}
    out = torch.zeros_like(own)
    for j in sorted(terms):
        vector, weight = terms[j]
        out.add_(vector.to(device=out.device, dtype=out.dtype), alpha=weight)
    return out
