"""The gRPC transport behind :class:`peer.transport.base.Communicator`: :class:`GrpcCommunicator`.

A training script builds it synchronously::

    comm = GrpcCommunicator.start(rank, peers, topology=topo, config=ExchangeConfig(...))
    comm.wait_for_neighbors(timeout=60)
    handle = comm.neighbor_average_async("params", flat_params, step)
    ...  # compute while neighbours' vectors arrive
    mixed = handle.wait()

``start`` launches a :class:`~peer.transport.grpc.server.LoopThread` and, on it, the peer's async
core
(:class:`PeerNode`, built with ``await PeerNode.create(...)``): the gRPC server, the retained
versions and one :class:`~peer.transport.grpc.client.PeerClient` per neighbour. Every public method
is
thread-safe and returns without blocking on the network unless its name says it waits.
Mixing uses :func:`peer.transport.base.weighted_sum`, so this transport and the in-memory one agree
bit
for bit.

With ``ExchangeConfig.failure_detection_seconds`` set (what real peers run), exchanges go through
the live membership: each published version declares the in-neighbours this peer mixes at that
step, sources that fail are marked down instead of failing the step, and the row of ``W`` is
recomputed on the live graph (:mod:`topology.live`). Without faults the weights, and so the
mixed vectors, are exactly those of the strict path. A peer that finds itself far behind its
neighbours gets :class:`~peer.errors.FellBehind` from ``wait`` and must rejoin (GetState).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from prometheus_client import CollectorRegistry

from peer.errors import ExchangeError, ExchangeTimeout, FellBehind, PeerUnavailable, StepEvicted
from peer.transport.base import (
    Communicator,
    CompletedHandle,
    ExchangeStats,
    Handle,
    TopologyLike,
    damp_stale_weights,
    weighted_sum,
)
from peer.transport.grpc.metrics import ExchangeMetrics
from peer.transport.grpc.node import ExchangeConfig, PeerNode, Received, skipped
from peer.transport.grpc.server import LoopThread
from peer.transport.grpc.store import PeerState, StateProvider, snapshot
from peer.transport.grpc.wire import PeerInfo
from topology.live import (
    MixingMode,
    fell_behind,
    metropolis_live_row,
    mixing_mode,
    self_absorbing_row,
)

logger = logging.getLogger(__name__)

__all__ = ["ExchangeConfig", "GrpcCommunicator", "GrpcHandle"]

# How often a wait that can be stopped looks at its stop event.
STOP_POLL_SECONDS = 0.1


@dataclass(frozen=True)
class LiveMix:
    """How a live-mode exchange reweights its row once the vectors are in.

    Attributes:
        declared: ``L_i(k)``, the in-neighbours this peer declared it mixes.
        mode: Metropolis-Hastings on the live degrees, or missing weights to self.
        full_degrees: every neighbour's degree in the full graph (Metropolis mode).
    """

    declared: frozenset[int]
    mode: MixingMode
    full_degrees: dict[int, int]


class GrpcHandle(Handle):
    """A gRPC exchange in flight; ``wait`` mixes with :func:`peer.transport.base.weighted_sum`."""

    def __init__(
        self,
        comm: GrpcCommunicator,
        name: str,
        step: int,
        own: torch.Tensor,
        self_weight: float,
        weights: dict[int, float],
        deadline_seconds: float,
        future: concurrent.futures.Future[Any],
        pending: set[int],
        live: LiveMix | None = None,
    ) -> None:
        self._comm = comm
        self._name = name
        self._step = step
        self._own = own
        self._self_weight = self_weight
        self._weights = weights
        self._started = time.monotonic()
        self._deadline = self._started + deadline_seconds
        self._wait_recorded = False
        self._future = future
        self._pending = pending
        self._live = live
        self._result: torch.Tensor | None = None
        self._lock = threading.Lock()
        self.stats = ExchangeStats()
        # Stale vectors mixed with damped weights (False: exact weights, see Communicator).
        self.damp_stale = True

    def done(self) -> bool:
        return self._future.done()

    def wait_done(self, timeout: float) -> bool:
        if self._future.done():
            return True
        entered = time.monotonic()
        try:
            concurrent.futures.wait((self._future,), timeout=max(0.0, timeout))
        finally:
            self.stats.wait_seconds += time.monotonic() - entered
        return self._future.done()

    def wait(self, timeout: float | None = None) -> torch.Tensor:
        with self._lock:
            if self._result is not None:
                return self._result
            entered = time.monotonic()
            # The fetch coroutine raises at its own deadline; the slack lets its error win.
            budget = self._deadline - entered + 1.0 if timeout is None else timeout
            try:
                outcome = self._future.result(max(0.0, budget))
            except BaseException:
                self.stats.wait_seconds += time.monotonic() - entered
                if not self._future.done():  # still in flight after the caller's timeout
                    # Blame the pending neighbour silent longest, not the lowest rank.
                    src = self._comm.most_silent(self._pending)
                    if src is None:
                        src = min(self._weights)
                    waited = time.monotonic() - self._started
                    raise ExchangeTimeout(
                        f"no {self._name!r} step {self._step} from peer {src} within "
                        f"{waited:.3g} s",
                        neighbor=src,
                        name=self._name,
                        step=self._step,
                    ) from None
                self._record_wait()  # the exchange failed: its own error goes up
                raise
            self.stats.wait_seconds += time.monotonic() - entered
            if self._live is None:
                received: dict[int, Received] = outcome
                base_self, base = self._self_weight, self._weights
            else:
                received, failed = outcome
                try:
                    self._comm.check_behind(self._name, self._step, failed)
                except FellBehind:
                    self._record_wait()
                    raise
                base_self, base = self._live_row(received)
            others = {
                j: r.tensor.to(self._own.device, non_blocking=True) for j, r in received.items()
            }
            self_weight, weights = base_self, base
            if self.damp_stale:
                used = {j: r.step for j, r in received.items()}
                self_weight, weights = damp_stale_weights(self_weight, weights, used, self._step)
            self._result = weighted_sum(self._own, self_weight, others, weights, self._comm.rank)
            for j, r in received.items():
                if j not in weights:
                    continue  # arrived but not mixed (live mode: it does not mix us)
                self.stats.used_steps[j] = r.step
                self.stats.latency_seconds[j] = r.latency_seconds
                self.stats.bytes_received += r.nbytes
            self._record_wait()
            return self._result

    def _record_wait(self) -> None:
        """One histogram sample per exchange: the total time callers were blocked on it."""
        if not self._wait_recorded:
            self._wait_recorded = True
            self._comm.metrics.waited(self.stats.wait_seconds)

    def _live_row(self, received: Mapping[int, Received]) -> tuple[float, dict[int, float]]:
        live = self._live
        if live is None:
            return self._self_weight, dict(self._weights)
        if live.mode is MixingMode.METROPOLIS:
            their = {
                j: None if r.live_neighbors is None else frozenset(r.live_neighbors)
                for j, r in received.items()
            }
            return metropolis_live_row(
                self._comm.rank, self._self_weight, self._weights, live.declared, their,
                live.full_degrees,
            )  # fmt: skip
        return self_absorbing_row(self._self_weight, self._weights, set(received))


class GrpcCommunicator(Communicator):
    """One peer's end of the gRPC transport. Build it with :meth:`start`."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        topology: TopologyLike | None,
        config: ExchangeConfig,
        loop_thread: LoopThread,
        node: PeerNode,
        metrics: ExchangeMetrics,
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.topology = topology
        self.config = config
        self.metrics = metrics
        self._loop_thread = loop_thread
        self._node = node
        self._closed = False
        self.membership = node.membership
        # Duck-typed topologies (tests) without a weight scheme are treated as directed.
        self._mode = mixing_mode(
            getattr(topology, "weights", ""), bool(getattr(topology, "is_time_varying", True))
        )

    @classmethod
    def start(
        cls,
        rank: int,
        peers: Mapping[int, str],
        *,
        topology: TopologyLike | None = None,
        config: ExchangeConfig | None = None,
        bind: str = "127.0.0.1:0",
        world_size: int | None = None,
        registry: CollectorRegistry | None = None,
    ) -> GrpcCommunicator:
        """Start the loop thread and the server, and open channels to ``peers``.

        Args:
            rank: this peer.
            peers: ``{rank: "host:port"}`` of the other peers (may include this one; may be
                empty and filled later with :meth:`update_peers`).
            topology: object with ``view(rank, step)`` and ``period`` (``topology.Topology``),
                or None when every call passes explicit weights.
            config: exchange configuration (defaults if None).
            bind: address the server listens on; port 0 picks a free port (see :attr:`port`).
            world_size: number of peers; defaults to ``max(peers) + 1``.
            registry: Prometheus registry for this peer's metrics (a fresh one if None).

        Returns:
            The running communicator.
        """
        config = config or ExchangeConfig()
        world_size = world_size or max([rank, *peers]) + 1
        metrics = ExchangeMetrics(registry or CollectorRegistry(), rank)
        loop_thread = LoopThread(f"decentlam-peer-{rank}", os_name=f"decentlam-r{rank}")
        try:
            node = loop_thread.run(
                PeerNode.create(rank, world_size, topology, config, bind, metrics),
                config.connect_deadline_seconds,
            )
            loop_thread.run(node.set_peers(peers), config.connect_deadline_seconds)
        except BaseException:
            loop_thread.stop()
            raise
        logger.info("peer %d serving on port %d", rank, node.port)
        return cls(rank, world_size, topology, config, loop_thread, node, metrics)

    @property
    def port(self) -> int:
        """The port the server is bound to."""
        return self._node.port

    @property
    def address(self) -> str:
        """``host:port`` neighbours can dial (the bind host with the bound port)."""
        return f"127.0.0.1:{self.port}"

    def update_peers(self, peers: Mapping[int, str]) -> None:
        """Set or change neighbours' addresses (channels to moved peers are replaced)."""
        self._loop_thread.run(self._node.set_peers(peers), self.config.connect_deadline_seconds)

    def set_current_step(self, step: int) -> None:
        """Step reported by Info."""
        self._node.served.current_step = int(step)

    def set_state_provider(self, provider: StateProvider | None) -> None:
        """Register the GetState callback: ``() -> (step, bytes | {name: tensor})``.

        It runs in a worker thread of the server; it must snapshot what it returns.
        """
        self._node.served.state_provider = provider

    def retained_steps(self, name: str) -> list[int]:
        """Steps of ``name`` this peer still retains (oldest first)."""

        async def steps() -> list[int]:
            return self._node.served.store.retained_steps().get(name, [])

        return self._loop_thread.run(steps(), self.config.connect_deadline_seconds)

    def retained_versions(self, min_step: int) -> dict[str, dict[int, torch.Tensor]]:
        """Own retained versions with step >= ``min_step`` (host copies), per name."""

        async def export() -> dict[str, dict[int, torch.Tensor]]:
            found = self._node.served.store.export(min_step)
            out: dict[str, dict[int, torch.Tensor]] = {}
            for name, versions in found.items():
                for step, version in versions.items():
                    await version.wait_ready()
                    out.setdefault(name, {})[step] = version.host
            return out

        return self._loop_thread.run(export(), self.config.connect_deadline_seconds)

    def publish(
        self,
        name: str,
        tensor: torch.Tensor,
        step: int,
        *,
        copy: bool = True,
        live_neighbors: frozenset[int] | None = None,
    ) -> torch.Tensor:
        """Publish ``tensor`` as ``(name, step)`` without fetching; returns the snapshot
        (``tensor`` itself with ``copy=False``: the caller no longer modifies it).
        ``live_neighbors`` is the in-neighbour set declared in the version's header."""
        own, version = snapshot(tensor, name, step, copy=copy, wire_dtype=self.config.wire_dtype)
        if live_neighbors is not None:
            version.live_neighbors = tuple(sorted(live_neighbors))
        self._loop_thread.loop.call_soon_threadsafe(self._node.served.store.insert, version)
        return own

    def link_states(self) -> dict[int, bool]:
        """``{neighbour: up}`` as this peer's membership sees it (empty in strict mode)."""
        if self.membership is None:
            return {}
        return {rank: status.up for rank, status in self.membership.statuses().items()}

    def check_behind(self, name: str, step: int, failed: Mapping[int, ExchangeError]) -> None:
        """Raise :class:`FellBehind` when a neighbour evicted ``step`` or was seen far ahead."""
        evicted = sorted(
            j for j, e in failed.items() if isinstance(e, StepEvicted) and not skipped(e, step)
        )
        if self.membership is None:
            return
        ahead = fell_behind(step, self.membership.statuses(), self.membership.policy)
        source = ahead if ahead is not None else (evicted[0] if evicted else None)
        if source is None:
            return
        status = self.membership.statuses().get(source)
        seen = status.known_step if status is not None else None
        if ahead is None:  # it evicted our step: its last known step is stale, its oldest is not
            oldest = getattr(failed[source], "oldest_step", None)
            where = "no longer retains it" + (
                f" (its oldest retained step is {oldest})" if oldest is not None else ""
            )
            seen = oldest if oldest is not None else seen
        else:
            where = f"is at step {seen if seen is not None else 'beyond its retained window'}"
        raise FellBehind(
            f"peer {self.rank} at step {step} fell behind: peer {source} {where}",
            neighbor=source,
            name=name,
            step=seen,
        )

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
        if self._closed:
            raise RuntimeError("communicator is closed")
        weight, weights = self._mixing_weights(step, self_weight, src_weights, max_staleness)
        if self.membership is not None:
            live = self._live_average(
                name, tensor, step, weight, weights, src_weights is None, max_staleness, copy
            )
            if isinstance(live, GrpcHandle):
                live.damp_stale = damp_stale
            return live
        own = self.publish(name, tensor, step, copy=copy)
        if not weights:
            return CompletedHandle(own.mul(weight))
        deadline_seconds = self.config.fetch_deadline_seconds
        pending = set(weights)
        future = self._loop_thread.submit(
            self._node.exchange(
                name, step, step - max_staleness, own, sorted(weights), deadline_seconds, pending
            )
        )
        handle = GrpcHandle(
            self, name, step, own, weight, weights, deadline_seconds, future, pending
        )
        handle.damp_stale = damp_stale
        return handle

    def _live_average(
        self,
        name: str,
        tensor: torch.Tensor,
        step: int,
        weight: float,
        weights: dict[int, float],
        from_topology: bool,
        max_staleness: int,
        copy: bool,
    ) -> Handle:
        membership = self.membership
        if membership is None:
            raise RuntimeError("live averaging needs failure_detection_seconds")
        declared = membership.declared(step, frozenset(weights))
        own = self.publish(name, tensor, step, copy=copy, live_neighbors=declared)
        if not weights:
            return CompletedHandle(own.mul(weight))
        mode = self._mode if from_topology else MixingMode.SELF_ABSORBING
        degrees = {}
        if mode is MixingMode.METROPOLIS and self.topology is not None:
            degrees = {j: len(self.topology.view(j, step).in_neighbors) for j in weights}
        else:
            mode = MixingMode.SELF_ABSORBING
        live = LiveMix(declared, mode, degrees)
        sources = sorted(j for j in declared if membership.is_up(j))
        deadline_seconds = self.config.fetch_deadline_seconds
        pending = set(sources)
        future = self._loop_thread.submit(
            self._node.exchange_live(
                name, step, step - max_staleness, own, sources, deadline_seconds, pending
            )
        )
        return GrpcHandle(
            self, name, step, own, weight, weights, deadline_seconds, future, pending, live
        )

    def fetch(
        self,
        src: int,
        name: str,
        step: int,
        like: torch.Tensor,
        *,
        max_staleness: int = 0,
        timeout: float | None = None,
        out: torch.Tensor | None = None,
    ) -> tuple[int, torch.Tensor]:
        """Fetch one neighbour's version of ``name`` (blocking; no publish, no mixing).

        Args:
            src: the neighbour.
            name: vector name.
            step: newest acceptable step.
            like: tensor with the expected shape and dtype (and destination device kind).
            max_staleness: accept steps ``[step - max_staleness, step]``.
            timeout: deadline in seconds (default: ``fetch_deadline_seconds``).
            out: contiguous CPU tensor shaped like ``like`` to receive into (reused buffers
                avoid the page faults of a fresh allocation); None allocates one.

        Returns:
            ``(step_served, tensor)`` (``tensor`` is ``out`` when given).
        """
        seconds = self.config.fetch_deadline_seconds if timeout is None else timeout

        async def one() -> Received:
            deadline = asyncio.get_running_loop().time() + seconds
            return await self._node.fetch(
                src, name, step, step - max_staleness, like, deadline, out=out
            )

        received = self._loop_thread.run(one(), seconds + 1.0)
        return received.step, received.tensor

    def wait_for_neighbors(
        self, timeout: float, stop: threading.Event | None = None
    ) -> dict[int, PeerInfo]:
        """Call Info on every known neighbour until all answer or ``timeout`` passes.

        Args:
            timeout: seconds to wait for every neighbour.
            stop: when set, the wait ends within ``STOP_POLL_SECONDS`` (a stop request).

        Returns:
            ``{rank: PeerInfo}`` of every neighbour.

        Raises:
            PeerUnavailable: naming every neighbour that did not answer in time (or before the
                stop request).
        """

        async def probe_all() -> dict[int, PeerInfo | BaseException]:
            calls = {
                r: asyncio.ensure_future(client.call_info(timeout))
                for r, client in sorted(self._node.clients.items())
            }
            pending = set(calls.values())
            poll = None if stop is None else STOP_POLL_SECONDS
            while pending and not (stop is not None and stop.is_set()):
                _, pending = await asyncio.wait(pending, timeout=poll)
            results: dict[int, PeerInfo | BaseException] = {}
            for r, call in calls.items():
                if call.done():
                    results[r] = call.exception() or call.result()
                else:
                    call.cancel()
                    results[r] = PeerUnavailable("no answer before the stop request", neighbor=r)
            return results

        results = self._loop_thread.run(probe_all(), timeout + 1.0)
        failed = {r: e for r, e in results.items() if isinstance(e, BaseException)}
        if failed:
            names = ", ".join(
                f"{r} at {self._node.clients[r].address} ({e})" for r, e in sorted(failed.items())
            )
            raise PeerUnavailable(f"peer {self.rank}: neighbours unreachable: {names}")
        return {r: info for r, info in results.items() if isinstance(info, PeerInfo)}

    def probe_neighbors(self, timeout: float) -> dict[int, PeerInfo]:
        """Call Info on every known neighbour; ``{rank: PeerInfo}`` of those that answered
        within ``timeout`` (the others are left out, not an error)."""

        async def probe_all() -> dict[int, PeerInfo | BaseException]:
            ranks = sorted(self._node.clients)
            results = await asyncio.gather(
                *(self._node.clients[r].call_info(timeout) for r in ranks), return_exceptions=True
            )
            return dict(zip(ranks, results, strict=True))

        results = self._loop_thread.run(probe_all(), timeout + 1.0)
        return {r: info for r, info in results.items() if isinstance(info, PeerInfo)}

    def set_stall_listener(self, listener: Callable[[int, bool], None] | None) -> None:
        """Be told when a link stalls and when it speaks again (``exchange.stall_seconds``).

        ``listener(neighbor, stalled)`` is called on the transport's event loop, while the
        training thread may be blocked on the stalled fetch: ``True`` once the neighbour has
        sent nothing and answered no Info for ``stall_seconds`` with a fetch from it pending,
        ``False`` when something arrives from it again. A stalled fetch that fails instead is
        not reported here (its error goes to the caller as usual). It must not block.
        """
        self._node.stall_listener = listener

    def most_silent(self, candidates: Iterable[int]) -> int | None:
        """Of ``candidates``, the neighbour that has sent nothing for longest (see
        :meth:`~peer.transport.grpc.progress.LinkProgress.most_silent`)."""
        return self._node.progress.most_silent(candidates)

    def stalled_neighbors(self) -> dict[int, float]:
        """``{neighbour: seconds silent}`` of the links stalled now."""
        return self._node.progress.stalled()

    def set_link_filter(self, link_cut: Callable[[int, int, int], bool] | None) -> None:
        """Fault injection: ``link_cut(src, dst, step)`` True makes fetches and probes of
        ``src`` by this peer (``dst``) fail as if ``src`` were unreachable."""
        self._node.link_cut = link_cut

    def fetch_state(self, rank: int, timeout: float) -> PeerState:
        """Fetch peer ``rank``'s training state (GetState) for rejoining.

        Raises:
            ExchangeError: FAILED_PRECONDITION (no provider there) and other failures.
        """
        client = self._node.client(rank, "state", 0)
        return self._loop_thread.run(
            client.call_get_state(timeout, self.config.chunk_bytes), timeout + 1.0
        )

    def close(self) -> None:
        """Stop the server (grace period), close channels and stop the loop; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._loop_thread.alive:
            try:
                self._loop_thread.run(
                    self._node.close(),
                    self.config.close_grace_seconds + self.config.connect_deadline_seconds,
                )
            except Exception:  # a failed shutdown must not prevent stopping the thread
                logger.exception("peer %d: error while closing", self.rank)
        self._loop_thread.stop()
