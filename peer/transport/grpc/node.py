"""The async core of a gRPC peer (:class:`PeerNode`) and its :class:`ExchangeConfig`.

:class:`PeerNode` lives on the peer's event loop (built with ``await PeerNode.create(...)``): it
owns the gRPC server, the retained versions and one :class:`~peer.transport.grpc.client.PeerClient`
per
neighbour, and runs the parallel neighbour fetches of one exchange. The synchronous facade the
training loop uses is :class:`peer.transport.grpc.communicator.GrpcCommunicator`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from peer import __version__
from peer.errors import PeerUnavailable
from peer.transport.base import TopologyLike
from peer.transport.grpc.client import PeerClient
from peer.transport.grpc.metrics import ExchangeMetrics
from peer.transport.grpc.security import ReadPolicy, TlsConfig
from peer.transport.grpc.server import PeerServicer, ServedPeer, create_server
from peer.transport.grpc.store import VersionStore, byte_view
from peer.transport.grpc.throttle import BandwidthLimiter
from peer.transport.grpc.wire import dtype_name
from topology.manifest import MAX_CHUNK_BYTES, ExchangeSpec

logger = logging.getLogger(__name__)

MIB = 1 << 20


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
)


@dataclass
class Received:
    """One neighbour's vector as fetched: buffer, step served, latency, bytes."""

    tensor: torch.Tensor
    step: int
    latency_seconds: float
    nbytes: int


class PeerNode:
    """The async core of a peer on its event loop: server, store and neighbour clients."""

    def __init__(self, rank: int, config: ExchangeConfig, served: ServedPeer) -> None:
        self.rank = rank
        self.config = config
        self.served = served
        self.server: Any = None
        self.port = 0
        self.clients: dict[int, PeerClient] = {}

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
        self, src: int, name: str, step: int, min_step: int, like: torch.Tensor, deadline: float
    ) -> Received:
        """Fetch ``src``'s version into a preallocated buffer shaped like ``like``."""
        started = time.perf_counter()
        client = self.client(src, name, step)
        pinned = like.is_cuda and torch.cuda.is_available()
        dest = torch.empty(like.shape, dtype=like.dtype, pin_memory=pinned)
        result = await client.fetch_into(
            name,
            step,
            min_step,
            byte_view(dest),
            dtype=dtype_name(like.dtype),
            shape=tuple(like.shape),
            chunk_bytes=self.config.chunk_bytes,
            parallel_streams=self.config.parallel_streams,
            deadline=deadline,
            backoff_seconds=self.config.retry_backoff_seconds,
            max_retries=self.config.max_retries,
        )
        latency = time.perf_counter() - started
        self.served.metrics.fetched(src, latency, result.nbytes, result.chunks)
        return Received(dest, result.step, latency, result.nbytes)

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

    async def close(self) -> None:
        """Stop the server (with grace), close every channel and release them, on the loop.

        Releasing matters: grpc.aio shuts its core down (joining its poller thread) when the
        last server or channel object is freed. Freed here, that happens while this loop still
        runs; left to interpreter exit, it happens after the loop is gone, which can hang the
        process (grpc/grpc#40447).
        """
        server, self.server = self.server, None
        if server is not None:
            await server.stop(self.config.close_grace_seconds)
        clients = list(self.clients.values())
        self.clients.clear()
        for client in clients:
            await client.close()
        del server, clients
        gc.collect()  # grpc.aio objects sit in reference cycles: free them now, on the loop
