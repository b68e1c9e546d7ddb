"""The async core of a gRPC peer (:class:`PeerNode`) and its :class:`ExchangeConfig`.

:class:`PeerNode` lives on the peer's event loop (built with ``await PeerNode.create(...)``): it
owns the gRPC server, the retained versions and one :class:`~peer.transport.grpc.client.PeerClient`
per
neighbour, and runs the parallel neighbour fetches of one exchange. The synchronous facade the
training loop uses is :class:`peer.transport.grpc.communicator.GrpcCommunicator`.

With ``failure_detection_seconds`` set, an exchange never fails because of one neighbour
(:meth:`PeerNode.exchange_live`): a neighbour that misses the detection delay, refuses the
connection or answers UNAVAILABLE is marked down in this peer's :class:`Membership`, the step
goes on with the neighbours that answered, and down neighbours are probed (Info, short deadline)
in the background and re-admitted by the pure rules of :mod:`topology.live`.

Whatever the mode, a link that goes silent while a fetch is pending is reported as soon as it
has been silent for ``stall_seconds`` (:meth:`PeerNode.watch_stalls`, the decisions of
:mod:`peer.transport.grpc.progress`): a warning naming the neighbour, the
``decentlam_neighbor_stalls_total`` counter, and the stall listener (the peer process sets
``decentlam_neighbor_up`` from it); the fetch itself goes on until it delivers or its deadline.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from peer import __version__
from peer.errors import ExchangeError, ExchangeTimeout, PeerUnavailable, StepEvicted
from peer.transport.base import TopologyLike
from peer.transport.grpc.allocator import tune_malloc
from peer.transport.grpc.client import PeerClient
from peer.transport.grpc.metrics import ExchangeMetrics
from peer.transport.grpc.progress import LinkProgress, StallEvent, StallState
from peer.transport.grpc.security import ReadPolicy, TlsConfig
from peer.transport.grpc.server import PeerServicer, ServedPeer, create_server
from peer.transport.grpc.store import VersionStore, byte_view, wire_dtype_for
from peer.transport.grpc.throttle import BandwidthLimiter
from peer.transport.grpc.trace import ExchangeTrace
from peer.transport.grpc.wire import dtype_name
from topology.live import (
    MembershipPolicy,
    NeighborStatus,
    live_set,
    mark_down,
    probe_answered,
    probe_sent,
    saw_step,
    should_probe,
)
from topology.manifest import MAX_CHUNK_BYTES, ExchangeSpec

logger = logging.getLogger(__name__)

MIB = 1 << 20
# Retries of an UNAVAILABLE fetch in live mode (backoff 0.05 s, 0.1 s) before marking it down.
LIVE_MAX_RETRIES = 2
# The stall watch looks at the fetches in flight this often at most (a quarter of
# stall_seconds when that is shorter), so a stall is reported within this of its threshold.
STALL_CHECK_MAX_INTERVAL_SECONDS = 0.25


#: The manifest's ``exchange`` section with every default: the one definition (type, range,
#: default) of each setting below that a manifest can set.
_SPEC = ExchangeSpec()
#: Bytes a chunk message carries besides its payload (protobuf fields), at most.
MESSAGE_OVERHEAD_BYTES = 64


@dataclass(frozen=True)
class ExchangeConfig:
    """Typed configuration of the exchange engine.

    The settings a manifest can set take their defaults and ranges from
    :class:`topology.manifest.ExchangeSpec` (build from a manifest with :meth:`from_spec`); the
    rest are transport-internal.

    Attributes:
        chunk_bytes: payload bytes per chunk message (tuned with benchmarks/exchange.py).
        fetch_deadline_seconds: deadline of one exchange (every neighbour fetch inside it).
        connect_deadline_seconds: deadline of connection/Info calls and of start/close steps.
        retry_backoff_seconds: first delay before retrying an UNAVAILABLE fetch (doubles).
        max_retries: most retries of one fetch after UNAVAILABLE.
        retained_versions: versions kept per vector name (K).
        bandwidth_bytes_per_second: cap on bytes this peer sends; None = unlimited.
        parallel_streams: most concurrent byte-range streams per neighbour for large vectors.
        token: bearer token every request carries and the server requires; None = no token.
        tls: TLS/mTLS material; None = plaintext.
        max_message_bytes: largest gRPC message sent or received (must exceed chunk_bytes).
        manifest_digest: digest of the run manifest, reported by Info.
        close_grace_seconds: grace period for in-flight RPCs when closing.
        failure_detection_seconds: live membership: a neighbour that does not deliver within
            this many seconds (or refuses, or is UNAVAILABLE) is marked down and the exchange
            goes on without it. None: strict, the first failure fails the exchange (the
            library default; real peers take the manifest's ``exchange`` setting).
        probe_interval_seconds: least time between two probes of a down neighbour.
        known_names: regular expressions of every vector name this peer publishes; a Fetch
            of another, not yet published name is answered NOT_FOUND at once (None: any name
            is waited for).
        wire_dtype: element type float32 vectors travel in (``"float32"``, ``"bfloat16"``,
            ``"float16"``); the sender rounds once per published version and the receiver
            widens into its float32 buffer. Every peer of a run must use the same one.
        wire_codec: lossless chunk codec of floating-point payloads (``"none"``,
            ``"top-byte-huffman"``: about 0.83 of the float32 bytes, 0.67 of the bfloat16 ones,
            for ~2-4 ms of CPU per MB on each side; :mod:`~peer.transport.grpc.codec`). The
            reader asks for it and any current server codes on request, so peers with
            different settings interoperate.
        verify_checksums: checksum every received payload; None = verify on plaintext
            channels only (TLS records are already integrity-protected).
        channels_per_neighbor: TCP connections to each neighbour; the parallel range streams
            of a large fetch spread over them (one each up to ``parallel_streams``).
        blocking_receive: read Fetch streams in worker threads over synchronous grpc channels
            (about half the receiver's CPU per byte for a 100 MB vector in
            benchmarks/exchange.py, but one more thread competing with training for the GIL);
            False (default) reads them on the peer's event loop.
        stall_seconds: a neighbour with a fetch pending that sends nothing and answers no Info
            for this long is reported stalled (log, ``decentlam_neighbor_stalls_total``, the
            stall listener) until something arrives from it again; the fetch goes on.
        trace_dir: append one JSON line per completed fetch and per served version to
            ``trace_dir/exchanges-<rank>.jsonl`` (:mod:`~.trace`); None: no trace.
        tune_malloc: raise glibc's malloc trim threshold for the process so received chunks
            reuse warm memory instead of page-faulting (:mod:`~.allocator`; halves the
            client's CPU per large fetch here).

    Raises:
        ValueError: (a :class:`~topology.manifest.ManifestError`) a setting outside the
            manifest's range, or chunks that do not fit in ``max_message_bytes``.
    """

    chunk_bytes: int = _SPEC.chunk_bytes
    fetch_deadline_seconds: float = _SPEC.fetch_deadline_seconds
    connect_deadline_seconds: float = _SPEC.connect_deadline_seconds
    retry_backoff_seconds: float = _SPEC.retry_backoff_seconds
    max_retries: int = _SPEC.max_retries
    retained_versions: int = _SPEC.retained_versions
    bandwidth_bytes_per_second: float | None = _SPEC.bandwidth_bytes_per_second
    # 1: on the 2-core reference machine parallel range streams did not beat one stream
    # (benchmarks/exchange.py); raise it where cores and NICs are plentiful.
    parallel_streams: int = _SPEC.parallel_streams
    token: str | None = None
    tls: TlsConfig | None = None
    max_message_bytes: int = 2 * MAX_CHUNK_BYTES
    manifest_digest: str = ""
    close_grace_seconds: float = 1.0
    failure_detection_seconds: float | None = None
    probe_interval_seconds: float = 0.5
    known_names: tuple[str, ...] | None = None
    wire_dtype: str = _SPEC.wire_dtype
    wire_codec: str = _SPEC.wire_codec
    stall_seconds: float = _SPEC.stall_seconds
    verify_checksums: bool | None = _SPEC.verify_checksums
    tune_malloc: bool = True
    channels_per_neighbor: int = 1
    blocking_receive: bool = _SPEC.blocking_receive
    trace_dir: str | None = None

    @property
    def verifies_checksums(self) -> bool:
        """Whether received payloads are checksummed (see ``verify_checksums``)."""
        return self.tls is None if self.verify_checksums is None else self.verify_checksums

    def __post_init__(self) -> None:
        settings = {name: getattr(self, name) for name in MANIFEST_SETTINGS}
        bandwidth = settings["bandwidth_bytes_per_second"]
        if isinstance(bandwidth, float) and bandwidth.is_integer():
            settings["bandwidth_bytes_per_second"] = int(bandwidth)  # 20e6 from Python callers
        ExchangeSpec(**settings)  # the manifest's checks: ManifestError naming the field
        if self.chunk_bytes > self.max_message_bytes - MESSAGE_OVERHEAD_BYTES:
            raise ValueError(
                f"chunk_bytes {self.chunk_bytes} does not fit in a message of "
                f"max_message_bytes {self.max_message_bytes} (- {MESSAGE_OVERHEAD_BYTES})"
            )
        if self.failure_detection_seconds is not None and self.failure_detection_seconds <= 0:
            raise ValueError("failure_detection_seconds must be positive (or None)")
        if self.channels_per_neighbor < 1:
            raise ValueError(
                f"channels_per_neighbor must be >= 1, got {self.channels_per_neighbor}"
            )

    def membership_policy(self) -> MembershipPolicy | None:
        """The live-membership policy, or None in strict mode."""
        if self.failure_detection_seconds is None:
            return None
        return MembershipPolicy(
            detection_seconds=self.failure_detection_seconds,
            probe_interval_seconds=self.probe_interval_seconds,
            readmit_margin_steps=max(0, min(2, self.retained_versions - 2)),
            behind_steps=max(1, self.retained_versions),
        )

    @classmethod
    def from_spec(cls, spec: ExchangeSpec, **transport: Any) -> ExchangeConfig:
        """The config of a manifest's ``exchange`` section.

        Args:
            spec: the validated section.
            **transport: transport-internal fields (``token``, ``tls``, ``manifest_digest``...).
        """
        return cls(**{name: getattr(spec, name) for name in MANIFEST_SETTINGS}, **transport)


#: Fields of :class:`ExchangeConfig` that the manifest's ``exchange`` section sets.
MANIFEST_SETTINGS: tuple[str, ...] = (
    "chunk_bytes",
    "fetch_deadline_seconds",
    "connect_deadline_seconds",
    "retry_backoff_seconds",
    "max_retries",
    "retained_versions",
    "bandwidth_bytes_per_second",
    "parallel_streams",
    "wire_dtype",
    "wire_codec",
    "stall_seconds",
    "verify_checksums",
    "blocking_receive",
)


@dataclass
class Received:
    """One neighbour's vector as fetched: buffer, step served, latency, bytes, and the live
    in-neighbours the sender declared for that step (None: it declared none)."""

    tensor: torch.Tensor
    step: int
    latency_seconds: float
    nbytes: int
    live_neighbors: tuple[int, ...] | None = None


class Membership:
    """This peer's view of its neighbours (thread-safe; the decisions are :mod:`topology.live`).

    Written from the event loop (fetch outcomes, probe answers) and read from the training
    thread (the live set of a step), hence the lock.

    Args:
        policy: when to mark down, probe, re-admit.
        clock: the time source (``time.monotonic``; tests pass their own).
        on_change: called with ``(neighbor, up)`` after every transition.
    """

    def __init__(
        self,
        policy: MembershipPolicy,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[int, bool], None] | None = None,
    ) -> None:
        self.policy = policy
        self.clock = clock
        self.on_change = on_change
        self._lock = threading.Lock()
        self._status: dict[int, NeighborStatus] = {}
        self._declared: dict[tuple[int, frozenset[int]], frozenset[int]] = {}
        self.changes = 0

    def statuses(self) -> dict[int, NeighborStatus]:
        """A snapshot of every neighbour's status."""
        with self._lock:
            return dict(self._status)

    def declared(self, step: int, neighbors: frozenset[int]) -> frozenset[int]:
        """``L_i(step)``: the in-neighbours of ``neighbors`` mixed at ``step``, fixed at the
        first exchange of that step (every bucket of a step declares the same set)."""
        with self._lock:
            key = (step, neighbors)
            found = self._declared.get(key)
            if found is None:
                found = live_set(self._status, neighbors)
                self._declared[key] = found
                for old in [k for k in self._declared if k[0] < step - 16]:
                    del self._declared[old]
            return found

    def is_up(self, rank: int) -> bool:
        """Whether ``rank`` is currently mixed."""
        with self._lock:
            return self._status.get(rank, NeighborStatus()).up

    def _update(self, rank: int, new: NeighborStatus) -> None:
        old = self._status.get(rank, NeighborStatus())
        self._status[rank] = new
        if old.up != new.up:
            self.changes += 1
            logger.warning(
                "neighbour %d is %s%s",
                rank,
                "up again" if new.up else "down",
                f" ({new.reason})" if new.reason else "",
            )
            if self.on_change is not None:
                self.on_change(rank, new.up)

    def failed(self, rank: int, reason: str) -> None:
        """An exchange with ``rank`` failed: mark it down."""
        with self._lock:
            self._update(
                rank, mark_down(self._status.get(rank, NeighborStatus()), self.clock(), reason)
            )

    def served(self, rank: int, step: int) -> None:
        """``rank`` served a version of ``step``."""
        with self._lock:
            self._status[rank] = saw_step(self._status.get(rank, NeighborStatus()), step)

    def to_probe(self) -> list[int]:
        """Down neighbours due for a probe (recorded as probed now)."""
        now = self.clock()
        with self._lock:
            due = [r for r, s in self._status.items() if should_probe(s, now, self.policy)]
            for rank in due:
                self._status[rank] = probe_sent(self._status[rank], now)
            return due

    def answered(self, rank: int, their_step: int, own_step: int) -> None:
        """A probe of ``rank`` answered with its current step."""
        with self._lock:
            status = self._status.get(rank, NeighborStatus())
            new = probe_answered(status, self.clock(), their_step, own_step, self.policy)
            self._update(rank, new)


def skipped(error: StepEvicted, step: int) -> bool:
    """Whether an eviction means the neighbour skipped ``step`` (it jumped ahead by taking a
    neighbour's state) rather than that we are too far behind its retained window."""
    return error.oldest_step is not None and error.oldest_step <= step


class PeerNode:
    """The async core of a peer on its event loop: server, store and neighbour clients."""

    def __init__(self, rank: int, config: ExchangeConfig, served: ServedPeer) -> None:
        self.rank = rank
        self.config = config
        self.served = served
        self.server: Any = None
        self.port = 0
        self.clients: dict[int, PeerClient] = {}
        policy = config.membership_policy()
        self.membership = None if policy is None else Membership(policy)
        # Fault injection (peer.faults): (src, dst, step) -> True when the link is cut.
        self.link_cut: Callable[[int, int, int], bool] | None = None
        self._probes: set[asyncio.Task[None]] = set()
        self.progress = LinkProgress(config.stall_seconds)
        # Called on the event loop with (neighbour, True) when it stalls, (neighbour, False)
        # when it speaks again; must not block.
        self.stall_listener: Callable[[int, bool], None] | None = None
        self._stall_watch: asyncio.Task[None] | None = None

    @classmethod
    async def create(
        cls,
        rank: int,
        world_size: int,
        topology: TopologyLike | None,
        config: ExchangeConfig,
        bind: str,
        metrics: ExchangeMetrics,
    ) -> PeerNode:
        """Build the store and servicer and start the server on ``bind``."""
        if config.tune_malloc:
            tune_malloc()
        served = ServedPeer(
            rank=rank,
            world_size=world_size,
            store=VersionStore(config.retained_versions),
            policy=ReadPolicy(rank, world_size, topology),
            limiter=BandwidthLimiter(config.bandwidth_bytes_per_second),
            metrics=metrics,
            chunk_bytes=config.chunk_bytes,
            default_wait_seconds=config.fetch_deadline_seconds,
            manifest_digest=config.manifest_digest,
            software_version=__version__,
            name_patterns=(
                None
                if config.known_names is None
                else tuple(re.compile(pattern) for pattern in config.known_names)
            ),
            trace=None if config.trace_dir is None else ExchangeTrace(config.trace_dir, rank),
        )
        node = cls(rank, config, served)
        node.server, node.port = create_server(
            PeerServicer(served),
            bind,
            token=config.token,
            tls=config.tls,
            max_message_bytes=config.max_message_bytes,
        )
        await node.server.start()
        node._stall_watch = asyncio.ensure_future(node.watch_stalls())
        return node

    async def set_peers(self, peers: Mapping[int, str]) -> None:
        """Open channels to new or moved neighbours (and close the replaced ones)."""
        for rank, address in peers.items():
            if rank == self.rank or not address:
                continue
            old = self.clients.get(rank)
            if old is not None and old.address == address:
                continue
            self.clients[rank] = await PeerClient.create(
                self.rank,
                rank,
                address,
                token=self.config.token,
                tls=self.config.tls,
                max_message_bytes=self.config.max_message_bytes,
                metrics=self.served.metrics,
                channels=self.config.channels_per_neighbor,
                blocking_receive=self.config.blocking_receive,
                progress=self.progress,
            )
            if old is not None:
                await old.close()

    def client(self, rank: int, name: str, step: int) -> PeerClient:
        """The client of neighbour ``rank``; PeerUnavailable when no address is known."""
        try:
            return self.clients[rank]
        except KeyError:
            raise PeerUnavailable(
                f"no address known for peer {rank}", neighbor=rank, name=name, step=step
            ) from None

    async def fetch(
        self,
        src: int,
        name: str,
        step: int,
        min_step: int,
        like: torch.Tensor,
        deadline: float,
        max_retries: int | None = None,
        out: torch.Tensor | None = None,
    ) -> Received:
        """Fetch ``src``'s version into a buffer shaped like ``like`` (``max_retries`` after
        UNAVAILABLE: the config's unless given).

        ``out`` (a contiguous CPU tensor of ``like``'s shape and dtype) is written in place;
        without it a fresh buffer is allocated (pinned for CUDA destinations). Reusing one
        matters for large vectors: a fresh 100 MB buffer costs ~40 ms of page faults here.
        """
        started = time.perf_counter()
        trace = self.served.trace
        traced_start = trace.now() if trace is not None else 0.0
        client = self.client(src, name, step)
        if out is None:
            pinned = like.is_cuda and torch.cuda.is_available()
            dest = torch.empty(like.shape, dtype=like.dtype, pin_memory=pinned)
        else:
            if out.shape != like.shape or out.dtype != like.dtype:
                raise ValueError(
                    f"out is {out.dtype} {list(out.shape)}, "
                    f"expected {like.dtype} {list(like.shape)}"
                )
            if out.is_cuda or not out.is_contiguous():
                raise ValueError("out must be a contiguous CPU tensor")
            dest = out
        dtype = dtype_name(like.dtype)
        result = await client.fetch_into(
            name,
            step,
            min_step,
            byte_view(dest),
            dtype=dtype,
            shape=tuple(like.shape),
            chunk_bytes=self.config.chunk_bytes,
            parallel_streams=self.config.parallel_streams,
            deadline=deadline,
            backoff_seconds=self.config.retry_backoff_seconds,
            max_retries=self.config.max_retries if max_retries is None else max_retries,
            wire_dtype=wire_dtype_for(name, dtype, self.config.wire_dtype),
            widen_into=dest.reshape(-1),
            verify_checksum=self.config.verifies_checksums,
            wire_codec=self.config.wire_codec,
        )
        latency = time.perf_counter() - started
        self.served.metrics.fetched(src, latency, result.nbytes, result.chunks)
        if trace is not None:
            trace.fetched(
                src, name, result.step, traced_start, trace.now(), result.nbytes, result.retries
            )
        return Received(dest, result.step, latency, result.nbytes, result.live_neighbors)

    async def exchange(
        self,
        name: str,
        step: int,
        min_step: int,
        like: torch.Tensor,
        sources: list[int],
        deadline_seconds: float,
        pending: set[int],
    ) -> dict[int, Received]:
        """Fetch from every source in parallel; the first failure cancels the rest."""
        deadline = asyncio.get_running_loop().time() + deadline_seconds

        async def one(src: int) -> tuple[int, Received]:
            received = await self.fetch(src, name, step, min_step, like, deadline)
            pending.discard(src)
            return src, received

        tasks = [asyncio.ensure_future(one(src)) for src in sources]
        try:
            return dict(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

    async def exchange_live(
        self,
        name: str,
        step: int,
        min_step: int,
        like: torch.Tensor,
        sources: list[int],
        deadline_seconds: float,
        pending: set[int],
    ) -> tuple[dict[int, Received], dict[int, ExchangeError]]:
        """Fetch from every source in parallel; a failing source is marked down, not fatal.

        A source that has not delivered after half the detection delay is asked for Info
        (deadline: the other half): one that does not answer is down; one that answers is alive
        but blocked on its own neighbours (or slow), and is waited for, up to
        ``deadline_seconds`` in all. So a dead or stalled neighbour costs at most the detection
        delay, and the delay does not cascade to the neighbours of its neighbours. Returns the
        vectors that arrived and the error of every source that failed.
        """
        membership = self.membership
        if membership is None:
            raise RuntimeError("exchange_live needs failure_detection_seconds")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + deadline_seconds
        half = membership.policy.detection_seconds / 2
        # A neighbour alive (answering Info) but not delivering is waited for this long at
        # most: then it is down too, well before the exchange deadline would fail the step.
        patience = max(2 * half, deadline_seconds / 2)
        self.probe_down()

        async def one(src: int) -> Received:
            if self.link_cut is not None and self.link_cut(src, self.rank, step):
                raise PeerUnavailable(
                    f"link {src}->{self.rank} cut by fault injection at step {step}",
                    neighbor=src,
                    name=name,
                    step=step,
                )
            # A refused connection is a dead peer: a couple of quick retries, then down.
            retries = min(LIVE_MAX_RETRIES, self.config.max_retries)
            task = asyncio.ensure_future(
                self.fetch(src, name, step, min_step, like, deadline, retries)
            )
            try:
                waited = 0.0
                while True:
                    done, _ = await asyncio.wait((task,), timeout=half)
                    if done:
                        return task.result()
                    waited += half
                    if waited >= patience:
                        raise ExchangeTimeout(
                            f"no {name!r} step {step} from peer {src} within {waited:.3g} s "
                            "(it answers Info but makes no progress)",
                            neighbor=src,
                            name=name,
                            step=step,
                        )
                    try:
                        await self.client(src, name, step).call_info(half)
                    except ExchangeError as exc:
                        raise ExchangeTimeout(
                            f"no {name!r} step {step} from peer {src} within the detection "
                            f"delay ({2 * half:.3g} s) and no answer to Info ({exc})",
                            neighbor=src,
                            name=name,
                            step=step,
                        ) from None
            finally:
                task.cancel()
                pending.discard(src)

        results = await asyncio.gather(*(one(src) for src in sources), return_exceptions=True)
        received: dict[int, Received] = {}
        failed: dict[int, ExchangeError] = {}
        for src, result in zip(sources, results, strict=True):
            if isinstance(result, Received):
                received[src] = result
                membership.served(src, result.step)
            elif isinstance(result, StepEvicted) and not skipped(result, step):
                failed[src] = result  # we are behind: the caller takes a neighbour's state
            elif isinstance(result, ExchangeError):
                failed[src] = result
                membership.failed(src, f"{type(result).__name__}: {result}")
            elif isinstance(result, BaseException):
                raise result
        return received, failed

    def probe_down(self) -> None:
        """Start a probe (Info, short deadline) of every down neighbour that is due one."""
        if self.membership is None:
            return
        for rank in self.membership.to_probe():
            client = self.clients.get(rank)
            if client is not None:
                task = asyncio.ensure_future(self._probe(rank, client))
                self._probes.add(task)
                task.add_done_callback(self._probes.discard)

    async def _probe(self, rank: int, client: PeerClient) -> None:
        membership = self.membership
        if membership is None:
            return
        if self.link_cut is not None and self.link_cut(rank, self.rank, self.served.current_step):
            return
        timeout = min(1.0, membership.policy.detection_seconds)
        try:
            info = await client.call_info(timeout)
        except ExchangeError as exc:
            logger.debug("probe of peer %d: %s", rank, exc)
            return
        membership.answered(rank, info.current_step, self.served.current_step)

    async def watch_stalls(self) -> None:
        """Report stalled links until cancelled (runs on the loop from :meth:`create`)."""
        interval = min(STALL_CHECK_MAX_INTERVAL_SECONDS, self.config.stall_seconds / 4)
        while True:
            await asyncio.sleep(interval)
            try:
                self.check_stalls()
            except Exception:  # a broken listener must not end the watch
                logger.exception("peer %d: stall check failed", self.rank)

    def check_stalls(self) -> None:
        """One look at the fetches in flight: report transitions, start the probes asked for."""
        outcome = self.progress.check()
        for event in outcome.events:
            self._report_stall(event)
        for rank in outcome.probe:
            client = self.clients.get(rank)
            if client is None:
                self.progress.probe_done(rank)
                continue
            task = asyncio.ensure_future(self._probe_silent(rank, client))
            self._probes.add(task)
            task.add_done_callback(self._probes.discard)

    def _address(self, rank: int) -> str:
        client = self.clients.get(rank)
        return "no known address" if client is None else client.address

    def _report_stall(self, event: StallEvent) -> None:
        rank = event.neighbor
        if event.state is StallState.STALLED:
            self.served.metrics.stalled(rank)
            logger.warning(
                "neighbour %d (%s) silent for %.1f s with a fetch pending: stalled "
                "(exchange.stall_seconds %.3g; the fetch goes on)",
                rank, self._address(rank), event.silent_seconds, self.config.stall_seconds,
            )  # fmt: skip
        elif event.state is StallState.RESUMED:
            logger.warning(
                "neighbour %d (%s) speaks again after %.1f s of silence: stall over",
                rank, self._address(rank), event.silent_seconds,
            )  # fmt: skip
        else:
            logger.info(
                "neighbour %d (%s): the stalled fetch ended without data after %.1f s",
                rank, self._address(rank), event.silent_seconds,
            )  # fmt: skip
            return  # the fetch's own error path says what happened to the neighbour
        if self.stall_listener is not None:
            self.stall_listener(rank, event.state is StallState.STALLED)

    async def _probe_silent(self, rank: int, client: PeerClient) -> None:
        """Info to a neighbour silent with a fetch pending: an answer is progress (the client
        stamps it), so a neighbour that is alive but has not published yet is not stalled."""
        try:
            await client.call_info(self.config.stall_seconds / 2)
        except ExchangeError as exc:
            logger.debug("stall probe of peer %d: %s", rank, exc)
        finally:
            self.progress.probe_done(rank)

    async def close(self) -> None:
        """Stop the server (with grace), close every channel and release them, on the loop.

        Releasing matters: grpc.aio shuts its core down (joining its poller thread) when the
        last server or channel object is freed. Freed here, that happens while this loop still
        runs; left to interpreter exit, it happens after the loop is gone, which can hang the
        process (grpc/grpc#40447).
        """
        if self._stall_watch is not None:
            self._stall_watch.cancel()
            self._stall_watch = None
        for task in list(self._probes):
            task.cancel()
        server, self.server = self.server, None
        if server is not None:
            await server.stop(self.config.close_grace_seconds)
        clients = list(self.clients.values())
        self.clients.clear()
        for client in clients:
            await client.close()
        del server, clients
        if self.served.trace is not None:
            self.served.trace.close()
        gc.collect()  # grpc.aio objects sit in reference cycles: free them now, on the loop
