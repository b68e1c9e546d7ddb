"""The gRPC side of a peer: the ``decentlam.v1.Peer`` servicer, its server and its loop thread.

The servicer is thin: it turns protobuf requests into :mod:`peer.transport.grpc.wire`
domain
objects, asks the :class:`~peer.store.VersionStore` and the
:class:`~peer.transport.grpc.security.ReadPolicy`,
and streams the answer back. Fetch chunks bypass protobuf serialization: they are pre-encoded
from memoryview slices of the retained snapshot (:func:`peer.transport.grpc.wire.encode_chunk`),
once per version and chunk size, and shared by every reader
(:meth:`peer.transport.grpc.store.Encoding.encoded_chunks`); the response serializer passes bytes
through. A reader names the wire dtype it wants (``FetchRequest.wire_dtype``); a float32 vector
is rounded to it once per version. A reader may also ask for a lossless chunk codec
(``FetchRequest.wire_codec``, :mod:`peer.transport.grpc.codec`): floating-point chunks are then
coded in a worker thread, the next while the current one is sent, once per version and chunk
size (:meth:`peer.transport.grpc.store.Encoding.coded_chunks`).

The server runs on a :class:`LoopThread`, a background thread with its own asyncio event loop,
so the peer's plain synchronous training loop is never blocked and never async.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import logging
import re
import sys
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from peer.errors import StepEvicted, WireError
from peer.transport.grpc.codec import CodecError, codec_for
from peer.transport.grpc.framing import DEFAULT_CHECKSUM, checksum, chunk_count, iter_chunks
from peer.transport.grpc.metrics import ExchangeMetrics
from peer.transport.grpc.proto.decentlam.v1 import peer_pb2 as pb
from peer.transport.grpc.security import (
    AuthInterceptor,
    ReadPolicy,
    TlsConfig,
    caller_rank,
    server_credentials,
)
from peer.transport.grpc.service import server_handler
from peer.transport.grpc.store import (
    StateProvider,
    UnavailableEncoding,
    VersionStore,
    pack_state,
)
from peer.transport.grpc.throttle import BandwidthLimiter
from peer.transport.grpc.trace import ExchangeTrace
from peer.transport.grpc.wire import (
    PeerInfo,
    StateHeader,
    VersionHeader,
    chunk_payload_length,
    encode_chunk,
    header_to_pb,
    info_to_pb,
    query_from_pb,
    state_header_to_pb,
)

logger = logging.getLogger(__name__)

OLDEST_STEP_KEY = "x-decentlam-oldest-step"
PR_SET_NAME = 15  # <linux/prctl.h>
# The server lets clients ping every 10 s without data; clients ping every 20 s (client.py), so
# neighbours never earn a GOAWAY "too_many_pings".
SERVER_MIN_PING_INTERVAL_MS = 10_000
SERVER_KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", SERVER_MIN_PING_INTERVAL_MS),
    ("grpc.http2.max_ping_strikes", 2),
)

# Hardening against hostile or broken callers: a chunk is never smaller than this (unless the
# server's own chunk size is), so `max_chunk_bytes: 1` cannot turn a vector into one message
# per byte; and one caller holds at most this many Fetch/GetState streams at once (a peer
# needs one per bucket and range stream).
MIN_CHUNK_BYTES = 64 << 10
MAX_STREAMS_PER_CALLER = 64
# Under a bandwidth cap a chunk goes out only once the cap has admitted all of it, so a stream
# is silent for chunk / rate seconds: chunks are cut to this much of the cap (at least
# MIN_CHUNK_BYTES) to keep that well under the readers' stall threshold (exchange.stall_seconds).
CAPPED_CHUNK_SECONDS = 0.25
# Coded streams (FetchRequest.wire_codec) cut chunks to at most this: the first leaves after
# ~1 ms of coding instead of ~3 ms per MiB, and the rest is coded while it is sent. It matters
# where peers share cores: 8 peers coding 1 MiB chunks at once on 2 cores delayed every first
# chunk by ~13 ms (benchmarks/scaling.py, 100 Mbit/s).
CODED_CHUNK_BYTES = 256 << 10

T = TypeVar("T")


@dataclass
class ServedPeer:
    """Everything the servicer serves from, owned by the peer's node.

    Attributes:
        rank: this peer.
        world_size: number of peers in the run.
        store: retained versions.
        policy: who may read what.
        limiter: bandwidth cap on chunk sends.
        metrics: collectors.
        chunk_bytes: default chunk size.
        default_wait_seconds: longest wait for a step when the request has no deadline.
        manifest_digest: digest of the run manifest (Info).
        software_version: decentlam version (Info).
        current_step: last step reported by the training loop (Info).
        state_provider: GetState callback, or None.
        trace: per-transfer trace (:mod:`~.trace`), or None.
        name_patterns: the vector names this peer will ever publish (regular expressions);
            a Fetch for any other name not yet published is answered NOT_FOUND at once.
            None: every name may still come (it is waited for).
    """

    rank: int
    world_size: int
    store: VersionStore
    policy: ReadPolicy
    limiter: BandwidthLimiter
    metrics: ExchangeMetrics
    chunk_bytes: int
    default_wait_seconds: float
    manifest_digest: str = ""
    software_version: str = ""
    current_step: int = 0
    state_provider: StateProvider | None = field(default=None, repr=False)
    name_patterns: tuple[re.Pattern[str], ...] | None = None
    trace: ExchangeTrace | None = None
    streams: dict[int, int] = field(default_factory=dict, repr=False)

    def may_publish(self, name: str) -> bool:
        """Whether ``name`` is (or may become) one of this peer's vectors."""
        if self.name_patterns is None or name in self.store.retained_steps():
            return True
        return any(pattern.fullmatch(name) for pattern in self.name_patterns)


async def _require(request: object, context: grpc.aio.ServicerContext) -> None:
    if request is None:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "undecodable request")


class PeerServicer:
    """Handlers of ``decentlam.v1.Peer`` (``rpc_*``) over a :class:`ServedPeer`."""

    def __init__(self, peer: ServedPeer) -> None:
        self.peer = peer

    def _chunk_bytes(self, requested: int) -> int:
        own = self.peer.chunk_bytes
        rate = self.peer.limiter.bytes_per_second
        if rate is not None:
            own = min(own, max(MIN_CHUNK_BYTES, int(rate * CAPPED_CHUNK_SECONDS)))
        if requested <= 0:
            return own
        return min(max(requested, MIN_CHUNK_BYTES), own)

    @contextlib.contextmanager
    def _stream_slot(self, caller: int) -> Iterator[bool]:
        """Count one stream of ``caller``; yields False when it holds too many already."""
        streams = self.peer.streams
        if streams.get(caller, 0) >= MAX_STREAMS_PER_CALLER:
            yield False
            return
        streams[caller] = streams.get(caller, 0) + 1
        try:
            yield True
        finally:
            streams[caller] -= 1
            if not streams[caller]:
                del streams[caller]

    async def _refuse_busy(self, caller: int, context: grpc.aio.ServicerContext) -> None:
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"peer {caller} already holds {MAX_STREAMS_PER_CALLER} streams on peer "
            f"{self.peer.rank}",
        )

    async def rpc_fetch(
        self, request: pb.FetchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes | pb.FetchResponse]:
        """Stream the freshest retained version in ``[min_step, step]``: header, then chunks."""
        started = time.perf_counter()
        await _require(request, context)
        peer = self.peer
        caller = caller_rank(context.invocation_metadata())
        try:
            query = query_from_pb(request)
        except WireError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return  # abort raises; the return says so to readers and type checkers
        if (
            caller is None
            or query.caller_rank != caller
            or not peer.policy.may_read(caller, query.name)
        ):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"peer {caller} may not read {query.name!r} from peer {peer.rank}",
            )
            return
        if not peer.may_publish(query.name):
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"peer {peer.rank} never publishes {query.name!r}"
            )
            return
        with self._stream_slot(caller) as admitted:
            if not admitted:
                await self._refuse_busy(caller, context)
                return
            async for message in self._serve_fetch(query, caller, context, started):
                yield message

    async def _serve_fetch(
        self, query: Any, caller: int, context: grpc.aio.ServicerContext, started: float
    ) -> AsyncIterator[bytes | pb.FetchResponse]:
        peer = self.peer
        remaining = context.time_remaining()
        wait_seconds = peer.default_wait_seconds if remaining is None else remaining
        try:
            version = await peer.store.wait_for(
                query.name, query.step, query.min_step, wait_seconds
            )
        except StepEvicted as exc:
            context.set_trailing_metadata(((OLDEST_STEP_KEY, str(exc.oldest_step)),))
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, f"peer {peer.rank}: {exc}")
            return
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"peer {peer.rank} published no {query.name!r} in steps "
                f"[{query.min_step}, {query.step}] within {wait_seconds:.3g} s",
            )
            return
        try:
            encoding = await version.encoding(query.wire_dtype)
        except UnavailableEncoding as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"peer {peer.rank}: {exc}")
            return
        total = encoding.total_bytes
        offset = query.range_offset
        length = query.range_length or max(0, total - offset)
        item = encoding.element_bytes
        if offset + length > total or (offset >= total and total > 0) or offset % item:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"range {offset}+{length} outside the {total}-byte {encoding.dtype} payload of "
                f"{query.name!r} or not on an element boundary",
            )
            return
        try:
            wire_codec = codec_for(encoding.dtype, query.wire_codec)
        except CodecError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"peer {peer.rank}: {exc}")
            return
        chunk_bytes = self._chunk_bytes(query.max_chunk_bytes)
        if wire_codec:
            chunk_bytes = min(chunk_bytes, CODED_CHUNK_BYTES)
        chunk_bytes = max(item, chunk_bytes - chunk_bytes % item)  # whole elements per chunk
        header = VersionHeader(
            sender_rank=peer.rank,
            step=version.step,
            name=version.name,
            dtype=version.dtype,
            shape=version.shape,
            total_bytes=total,
            checksum=await encoding.checksum(),
            range_offset=offset,
            range_length=length,
            chunk_count=chunk_count(length, chunk_bytes),
            chunk_bytes=chunk_bytes,
            checksum_kind=DEFAULT_CHECKSUM,
            live_neighbors=version.live_neighbors,
            wire_dtype=encoding.dtype,
            wire_codec=wire_codec,
        )
        traced_start = peer.trace.now() if peer.trace is not None else 0.0
        yield header_to_pb(header)
        chunks: Iterable[bytes] | AsyncIterable[bytes] = (
            encoding.coded_chunks(wire_codec, offset, length, chunk_bytes)
            if wire_codec
            else encoding.encoded_chunks(offset, length, chunk_bytes)
        )
        sent = 0  # payload bytes as they go out: `length` raw, less when coded
        async for message in peer.limiter.paced(chunks, priority=version.step):
            sent += chunk_payload_length(message)
            yield message
        peer.metrics.served(caller, sent, header.chunk_count)
        peer.metrics.handled("Fetch", time.perf_counter() - started)
        if peer.trace is not None:
            peer.trace.served(
                caller, version.name, version.step, traced_start, peer.trace.now(), sent
            )

    async def rpc_info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> Any:
        """Identity and health of this peer."""
        started = time.perf_counter()
        await _require(request, context)
        peer = self.peer
        info = PeerInfo(
            rank=peer.rank,
            current_step=peer.current_step,
            manifest_digest=peer.manifest_digest,
            software_version=peer.software_version,
            world_size=peer.world_size,
            retained=peer.store.retained_steps(),
            state_available=peer.state_provider is not None,
        )
        peer.metrics.handled("Info", time.perf_counter() - started)
        return info_to_pb(info)

    async def rpc_get_state(
        self, request: pb.GetStateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes | pb.GetStateResponse]:
        """Stream the state returned by the registered provider: header, then chunks."""
        started = time.perf_counter()
        await _require(request, context)
        peer = self.peer
        caller = caller_rank(context.invocation_metadata())
        if caller is None or request.caller_rank != caller:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"GetState caller_rank {request.caller_rank} does not match the metadata rank "
                f"{caller}",
            )
            return
        provider = peer.state_provider
        if provider is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"peer {peer.rank} has no state provider registered "
                "(the training loop must call set_state_provider first)",
            )
            return
        with self._stream_slot(caller) as admitted:
            if not admitted:
                await self._refuse_busy(caller, context)
                return
            try:
                step, state = await asyncio.to_thread(provider)
            except Exception as exc:  # the provider's failure must not take the peer down
                logger.warning("GetState for peer %d failed: %s", caller, exc)
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE, f"peer {peer.rank} has no state to give: {exc}"
                )
                return
            async for message in self._serve_state(request, step, state):
                yield message
        peer.metrics.handled("GetState", time.perf_counter() - started)

    async def _serve_state(
        self, request: pb.GetStateRequest, step: int, state: Any
    ) -> AsyncIterator[bytes | pb.GetStateResponse]:
        peer = self.peer
        is_blob, entries, payload = await asyncio.to_thread(pack_state, state)
        chunk_bytes = self._chunk_bytes(request.max_chunk_bytes)
        header = StateHeader(
            sender_rank=peer.rank,
            step=int(step),
            is_blob=is_blob,
            entries=entries,
            total_bytes=len(payload),
            checksum=await asyncio.to_thread(checksum, DEFAULT_CHECKSUM, payload),
            checksum_kind=DEFAULT_CHECKSUM,
            chunk_count=chunk_count(len(payload), chunk_bytes),
            chunk_bytes=chunk_bytes,
        )
        yield state_header_to_pb(header)
        chunks = (encode_chunk(piece) for piece in iter_chunks(payload, chunk_bytes))
        async for message in peer.limiter.paced(chunks, priority=header.step):
            yield message

    def generic_handler(self) -> grpc.GenericRpcHandler:
        """Method handlers of the service (:func:`peer.transport.grpc.service.server_handler`)."""
        return server_handler(
            {"Fetch": self.rpc_fetch, "Info": self.rpc_info, "GetState": self.rpc_get_state}
        )


def create_server(
    servicer: PeerServicer,
    bind: str,
    *,
    token: str | None = None,
    tls: TlsConfig | None = None,
    max_message_bytes: int = 64 << 20,
) -> tuple[grpc.aio.Server, int]:
    """Build the peer's gRPC server (unstarted); call from the event loop it will run on.

    Args:
        servicer: the handlers.
        bind: ``host:port`` to listen on; port 0 picks a free port.
        token: bearer token every request must carry (None: no token check).
        tls: TLS material; None serves plaintext.
        max_message_bytes: largest message sent or received.

    Returns:
        ``(server, port)``: the unstarted server and the port it is bound to.
    """
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
        *SERVER_KEEPALIVE_OPTIONS,
    ]
    server = grpc.aio.server(
        interceptors=[AuthInterceptor(token, servicer.peer.policy)], options=options
    )
    server.add_generic_rpc_handlers((servicer.generic_handler(),))
    if tls is None:
        port = server.add_insecure_port(bind)
    else:
        port = server.add_secure_port(bind, server_credentials(tls))
    if port == 0:
        raise OSError(f"could not bind the peer server to {bind}")
    return server, port


def set_os_thread_name(name: str) -> bool:
    """Give the calling thread ``name`` (cut to 15 bytes) in the kernel, where ``top -H``,
    ``ps -L`` and ``/proc/<pid>/task/<tid>/comm`` show it; Python's own thread names stay
    inside the interpreter. Returns False where ``prctl`` is unavailable (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class LoopThread:
    """A daemon thread running its own asyncio event loop.

    Args:
        name: thread name (shows in stack dumps).
        os_name: the name the kernel shows (``top -H``, ``/proc``; at most 15 bytes); default
            ``name``.
    """

    def __init__(self, name: str, os_name: str | None = None) -> None:
        self._os_name = name if os_name is None else os_name
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        set_os_thread_name(self._os_name)
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
            for task in pending:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
            self.loop.close()

    @property
    def alive(self) -> bool:
        """Whether the loop thread is still running."""
        return self._thread.is_alive()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop from any thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the loop and wait for its result (at most ``timeout`` seconds)."""
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"loop call did not finish within {timeout:.3g} s") from None

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop (cancelling what still runs) and join the thread; idempotent."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning(
                    "loop thread %s did not stop within %.3g s", self._thread.name, timeout
                )
