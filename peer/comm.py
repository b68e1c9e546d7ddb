"""The communication interface every optimizer talks to, and its in-memory implementation.

Decentralized methods need exactly two collective operations:

* *partial averaging* -- publish my vector for step ``k`` and mix it with the vectors my
  in-neighbours published for step ``k``: ``sum_j w_ij v_j`` over ``j in N_i + {i}``;
* *global averaging* -- ``(1/n) sum_j v_j`` (PmSGD, periodic global averaging).

Both are started without blocking and return a :class:`Handle`; ``handle.wait()`` returns the
mixed vector. A :class:`Communicator` is one peer's end of a transport. There are two
transports behind the same interface (STYLE.md: "one gRPC implementation, one in-memory
implementation for fast tests, and one shared contract test run against both"):

* :class:`InMemoryFabric` / :class:`InMemoryCommunicator` (this module): peers are threads of
  one process sharing a board of published vectors. Used by fast unit tests of the optimizers.
* ``peer.exchange.GrpcCommunicator``: real peers over gRPC.

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
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from peer.errors import ExchangeTimeout, StepEvicted

logger = logging.getLogger(__name__)

DEFAULT_DEADLINE_SECONDS = 30.0
DEFAULT_RETAINED_VERSIONS = 4
GLOBAL_PREFIX = "global/"


@dataclass
class ExchangeStats:
    """What one completed exchange observed (filled in by the transport).

    Attributes:
        wait_seconds: time the caller spent blocked inside :meth:`Handle.wait`.
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
    """A nonblocking exchange in flight. Thread-safe; ``wait`` may be called more than once."""

    stats: ExchangeStats

    @abc.abstractmethod
    def done(self) -> bool:
        """True once :meth:`wait` would return (or raise) without blocking."""

    @abc.abstractmethod
    def wait(self, timeout: float | None = None) -> torch.Tensor:
        """Block until the mixed vector is ready and return it.

        Args:
            timeout: seconds to wait at most; ``None`` uses the exchange's own deadline.

        Returns:
            The weighted average, with the shape, dtype and device of the published tensor.

        Raises:
            peer.errors.ExchangeError: a neighbour's vector could not be obtained in time
                (the subclass says why).
        """


class CompletedHandle(Handle):
    """A handle whose result is already known (e.g. a peer with no neighbours)."""

    def __init__(self, result: torch.Tensor) -> None:
        self._result = result
        self.stats = ExchangeStats()

    def done(self) -> bool:
        return True

    def wait(self, timeout: float | None = None) -> torch.Tensor:
        return self._result


class Communicator(abc.ABC):
    """One peer's end of a transport. See the module docstring for the shared semantics."""

    rank: int
    world_size: int

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
        topology = getattr(self, "topology", None)
        return resolve_weights(topology, self.rank, step, self_weight, src_weights)

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

    def global_average(
        self, name: str, tensor: torch.Tensor, step: int, *, timeout: float | None = None
    ) -> torch.Tensor:
        """Blocking form of :meth:`global_average_async`."""
        return self.global_average_async(name, tensor, step).wait(timeout)

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
    topology: Any,
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


class _Board:
    """Published versions of every peer, shared by the in-memory communicators."""

    def __init__(self, world_size: int, retained_versions: int) -> None:
        self.world_size = world_size
        self.retained_versions = retained_versions
        self.cond = threading.Condition()
        # (rank, name) -> OrderedDict[step, tensor], oldest first
        self.versions: dict[tuple[int, str], OrderedDict[int, torch.Tensor]] = {}
        self.publish_times: dict[tuple[int, str, int], float] = {}

    def publish(
        self, rank: int, name: str, step: int, tensor: torch.Tensor, *, copy: bool = True
    ) -> None:
        snapshot = tensor.detach().clone() if copy else tensor.detach()
        with self.cond:
            retained = self.versions.setdefault((rank, name), OrderedDict())
            retained[step] = snapshot
            retained.move_to_end(step)
            self.publish_times[(rank, name, step)] = time.monotonic()
            while len(retained) > self.retained_versions:
                old_step, _ = retained.popitem(last=False)
                self.publish_times.pop((rank, name, old_step), None)
            self.cond.notify_all()

    def lookup(
        self, src: int, name: str, step: int, max_staleness: int
    ) -> tuple[int, torch.Tensor] | None:
        """Freshest acceptable version (exact step preferred); caller holds ``cond``."""
        retained = self.versions.get((src, name))
        if not retained:
            return None
        if step in retained:
            return step, retained[step]
        acceptable = [s for s in retained if step - max_staleness <= s <= step]
        if acceptable:
            best = max(acceptable)
            return best, retained[best]
        oldest = next(iter(retained))
        if oldest > step:
            raise StepEvicted(
                f"peer {src} no longer retains {name!r} step {step} (oldest retained: {oldest})",
                neighbor=src,
                name=name,
                step=step,
                oldest_step=oldest,
            )
        return None


class _InMemoryHandle(Handle):
    def __init__(
        self,
        board: _Board,
        name: str,
        own: torch.Tensor,
        step: int,
        self_weight: float,
        weights: dict[int, float],
        max_staleness: int,
        deadline_seconds: float,
        delay_for: Callable[[int], float],
        rank: int,
    ) -> None:
        self._rank = rank
        self._board = board
        self._name = name
        self._own = own
        self._step = step
        self._self_weight = self_weight
        self._weights = weights
        self._max_staleness = max_staleness
        self._deadline_seconds = deadline_seconds
        self._delay_for = delay_for
        self._started = time.monotonic()
        self._result: torch.Tensor | None = None
        self._lock = threading.Lock()
        self.stats = ExchangeStats()

    def _ready_at(self, src: int) -> float:
        # A simulated slow link makes a vector visible only `delay` seconds after the fetch began.
        return self._started + self._delay_for(src)

    def done(self) -> bool:
        if self._result is not None:
            return True
        now = time.monotonic()
        with self._board.cond:
            for src in self._weights:
                if now < self._ready_at(src):
                    return False
                if self._board.lookup(src, self._name, self._step, self._max_staleness) is None:
                    return False
        return True

    def wait(self, timeout: float | None = None) -> torch.Tensor:
        with self._lock:
            if self._result is not None:
                return self._result
            entered = time.monotonic()
            budget = self._deadline_seconds if timeout is None else timeout
            deadline = entered + budget
            received: dict[int, torch.Tensor] = {}
            with self._board.cond:
                for src in self._weights:
                    while True:
                        found = self._board.lookup(src, self._name, self._step, self._max_staleness)
                        now = time.monotonic()
                        ready_at = self._ready_at(src)
                        if found is not None and now >= ready_at:
                            used_step, tensor = found
                            received[src] = tensor
                            self.stats.used_steps[src] = used_step
                            self.stats.latency_seconds[src] = now - self._started
                            self.stats.bytes_received += tensor.numel() * tensor.element_size()
                            break
                        if now >= deadline:
                            raise ExchangeTimeout(
                                f"no {self._name!r} step {self._step} from peer {src} within "
                                f"{budget:.3g} s",
                                neighbor=src,
                                name=self._name,
                                step=self._step,
                            )
                        wake = deadline if found is None else min(deadline, ready_at)
                        self._board.cond.wait(timeout=max(0.0, wake - now))
            self_weight, weights = damp_stale_weights(
                self._self_weight, self._weights, self.stats.used_steps, self._step
            )
            self._result = weighted_sum(self._own, self_weight, received, weights, self._rank)
            self.stats.wait_seconds = time.monotonic() - entered
            return self._result


class InMemoryFabric:
    """A set of in-process peers exchanging through shared memory (for tests and simulators).

    Args:
        world_size: number of peers.
        topology: object with ``view(rank, step)`` (``topology.Topology``); may be ``None``
            when every call passes explicit weights.
        retained_versions: versions kept per (peer, name).
        deadline_seconds: default deadline of :meth:`Handle.wait`.
        link_delay_seconds: optional ``{(src, dst): seconds}``: simulated slow links (a vector
            from ``src`` becomes visible to ``dst`` that long after ``dst`` starts fetching).
        link_bytes_per_second: optional simulated bandwidth of every link: a vector of ``b``
            bytes takes a further ``b / link_bytes_per_second`` seconds to arrive.
    """

    def __init__(
        self,
        world_size: int,
        topology: Any = None,
        *,
        retained_versions: int = DEFAULT_RETAINED_VERSIONS,
        deadline_seconds: float = DEFAULT_DEADLINE_SECONDS,
        link_delay_seconds: Mapping[tuple[int, int], float] | None = None,
        link_bytes_per_second: float | None = None,
    ) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if retained_versions < 1:
            raise ValueError(f"retained_versions must be >= 1, got {retained_versions}")
        self.world_size = world_size
        self.topology = topology
        self.deadline_seconds = deadline_seconds
        self.link_delay_seconds = dict(link_delay_seconds or {})
        self.link_bytes_per_second = link_bytes_per_second
        self._board = _Board(world_size, retained_versions)

    def communicator(self, rank: int) -> InMemoryCommunicator:
        """The communicator of peer ``rank``."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is not in 0..{self.world_size - 1}")
        return InMemoryCommunicator(self, rank)

    def retained_steps(self, rank: int, name: str) -> list[int]:
        """Steps of ``name`` that peer ``rank`` still retains (oldest first)."""
        with self._board.cond:
            return list(self._board.versions.get((rank, name), ()))


class InMemoryCommunicator(Communicator):
    """Peer ``rank``'s end of an :class:`InMemoryFabric`."""

    def __init__(self, fabric: InMemoryFabric, rank: int) -> None:
        self.fabric = fabric
        self.rank = rank
        self.world_size = fabric.world_size
        self.topology = fabric.topology

    def _delay(self, src: int, nbytes: int) -> float:
        delay = self.fabric.link_delay_seconds.get((src, self.rank), 0.0)
        if self.fabric.link_bytes_per_second:
            delay += nbytes / self.fabric.link_bytes_per_second
        return delay

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
    ) -> Handle:
        weight, weights = self._mixing_weights(step, self_weight, src_weights, max_staleness)
        own = tensor.detach().clone() if copy else tensor.detach()
        self.fabric._board.publish(self.rank, name, step, own, copy=False)
        if not weights:
            return CompletedHandle(own.mul(weight))
        return _InMemoryHandle(
            self.fabric._board,
            name,
            own,
            step,
            weight,
            weights,
            max_staleness,
            self.fabric.deadline_seconds,
            lambda src: self._delay(src, own.numel() * own.element_size()),
            self.rank,
        )

    def publish(self, name: str, tensor: torch.Tensor, step: int) -> torch.Tensor | None:
        self.fabric._board.publish(self.rank, name, step, tensor)
        return None

    def retained_versions(self, min_step: int) -> dict[str, dict[int, torch.Tensor]]:
        board = self.fabric._board
        with board.cond:
            return {
                name: {s: t for s, t in steps.items() if s >= min_step}
                for (rank, name), steps in board.versions.items()
                if rank == self.rank and any(s >= min_step for s in steps)
            }
