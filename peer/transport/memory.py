"""In-memory transport: peers are threads of one process sharing a board of published vectors.

The fast twin of the gRPC transport, used by the optimizers' unit tests and the threaded
trainer tests; it implements :class:`peer.transport.base.Communicator` with the same
semantics (snapshots, retained versions, bounded staleness, deadlines).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping

import torch

from peer.errors import ExchangeError, ExchangeTimeout, StepEvicted
from peer.transport.base import (
    DEFAULT_DEADLINE_SECONDS,
    DEFAULT_RETAINED_VERSIONS,
    Communicator,
    CompletedHandle,
    ExchangeStats,
    Handle,
    TopologyLike,
    choose_step,
    damp_stale_weights,
    weighted_sum,
)

logger = logging.getLogger(__name__)


class _Board:
    """Published versions of every peer, shared by the in-memory communicators."""

    def __init__(self, world_size: int, retained_versions: int) -> None:
        self.world_size = world_size
        self.retained_versions = retained_versions
        self.cond = threading.Condition()
        # (rank, name) -> OrderedDict[step, tensor], oldest first
        self.versions: dict[tuple[int, str], OrderedDict[int, torch.Tensor]] = {}

    def publish(
        self, rank: int, name: str, step: int, tensor: torch.Tensor, *, copy: bool = True
    ) -> None:
        snapshot = tensor.detach().clone() if copy else tensor.detach()
        with self.cond:
            retained = self.versions.setdefault((rank, name), OrderedDict())
            retained[step] = snapshot
            retained.move_to_end(step)
            while len(retained) > self.retained_versions:
                retained.popitem(last=False)
            self.cond.notify_all()

    def lookup(
        self, src: int, name: str, step: int, max_staleness: int
    ) -> tuple[int, torch.Tensor] | None:
        """Freshest acceptable version (:func:`~peer.transport.base.choose_step`); caller holds
        ``cond``."""
        retained = self.versions.get((src, name))
        if not retained:
            return None
        chosen = choose_step(list(retained), step, step - max_staleness, name=name, neighbor=src)
        return None if chosen is None else (chosen, retained[chosen])


class _InMemoryHandle(Handle):
    """An in-memory exchange: finished once every source's vector is visible (mixed), or
    failed once the exchange's deadline (from its start) has passed, or a step was evicted."""

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
        damp_stale: bool = True,
    ) -> None:
        self._rank = rank
        self._damp_stale = damp_stale
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
        self._deadline = self._started + deadline_seconds
        self._received: dict[int, torch.Tensor] = {}
        self._result: torch.Tensor | None = None
        self._error: ExchangeError | None = None
        self.stats = ExchangeStats()

    def _ready_at(self, src: int) -> float:
        # A simulated slow link makes a vector visible only `delay` seconds after the fetch began.
        return self._started + self._delay_for(src)

    def _advance(self, now: float) -> float | None:
        """Take every vector visible at ``now``; finish (result or error) when possible.

        The caller holds the board's condition. Returns when to look again, or None once the
        exchange has finished.
        """
        if self._result is not None or self._error is not None:
            return None
        wake = self._deadline
        missing = []
        for src in self._weights:
            if src in self._received:
                continue
            try:
                found = self._board.lookup(src, self._name, self._step, self._max_staleness)
            except StepEvicted as exc:
                self._error = exc
                return None
            ready_at = self._ready_at(src)
            if found is not None and now >= ready_at:
                used_step, tensor = found
                self._received[src] = tensor
                self.stats.used_steps[src] = used_step
                self.stats.latency_seconds[src] = now - self._started
                self.stats.bytes_received += tensor.numel() * tensor.element_size()
                continue
            if found is not None:
                wake = min(wake, ready_at)
            missing.append(src)
        if not missing:
            self_weight, weights = self._self_weight, self._weights
            if self._damp_stale:
                self_weight, weights = damp_stale_weights(
                    self_weight, weights, self.stats.used_steps, self._step
                )
            self._result = weighted_sum(self._own, self_weight, self._received, weights, self._rank)
            return None
        if now >= self._deadline:
            self._error = self._timeout(missing[0], self._deadline_seconds)
            return None
        return wake

    def _timeout(self, src: int, seconds: float) -> ExchangeTimeout:
        return ExchangeTimeout(
            f"no {self._name!r} step {self._step} from peer {src} within {seconds:.3g} s",
            neighbor=src,
            name=self._name,
            step=self._step,
        )

    def _block(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the exchange to finish; True once it has."""
        entered = time.monotonic()
        until = entered + timeout
        try:
            with self._board.cond:
                while True:
                    now = time.monotonic()
                    wake = self._advance(now)
                    if wake is None:
                        return True
                    if now >= until:
                        return False
                    self._board.cond.wait(timeout=max(0.0, min(wake, until) - now))
        finally:
            if timeout > 0:
                self.stats.wait_seconds += time.monotonic() - entered

    def done(self) -> bool:
        return self._block(0.0)

    def wait_done(self, timeout: float) -> bool:
        return self._block(timeout)

    def wait(self, timeout: float | None = None) -> torch.Tensor:
        finished = self._block(math.inf if timeout is None else timeout)
        if self._error is not None:
            raise self._error
        if not finished or self._result is None:
            missing = min(j for j in self._weights if j not in self._received)
            raise self._timeout(missing, time.monotonic() - self._started)
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
        topology: TopologyLike | None = None,
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
        damp_stale: bool = True,
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
            damp_stale,
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
