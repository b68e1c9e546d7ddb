"""The client side of a peer: one reused channel per neighbour, and fetches with deadlines.

:class:`PeerClient` wraps one ``grpc.aio`` channel to one neighbour (``call_*`` methods).
A fetch writes the received chunks straight into a preallocated buffer (the chunk deserializer
returns memoryviews of the received message, no protobuf parse; a payload rounded to a narrower
wire dtype is widened chunk by chunk into the same buffer), validates every message with
:class:`peer.transport.grpc.wire.RangeAssembler`, and, for large vectors, splits the payload into
byte ranges fetched as parallel streams on the same channel. UNAVAILABLE is retried with
exponential backoff inside the fetch deadline; every other failure maps to a typed
:mod:`peer.errors` exception. Every message and answer that arrives, and every fetch in flight,
is reported to the peer's :class:`~peer.transport.grpc.progress.LinkProgress` (stall detection).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import grpc
import torch

from peer.errors import (
    AuthError,
    ExchangeError,
    ExchangeTimeout,
    PeerUnavailable,
    StepEvicted,
    WireError,
)
from peer.transport.grpc.codec import codec_for
from peer.transport.grpc.framing import checksum, chunk_count, split_ranges
from peer.transport.grpc.metrics import ExchangeMetrics
from peer.transport.grpc.progress import LinkProgress
from peer.transport.grpc.proto.decentlam.v1 import peer_pb2 as pb
from peer.transport.grpc.security import TlsConfig, call_metadata, channel_credentials
from peer.transport.grpc.server import OLDEST_STEP_KEY, SERVER_MIN_PING_INTERVAL_MS
from peer.transport.grpc.service import client_callables
from peer.transport.grpc.store import PeerState, unpack_state
from peer.transport.grpc.wire import (
    Expectation,
    FetchQuery,
    Malformed,
    PeerInfo,
    RangeAssembler,
    StateHeader,
    VersionHeader,
    decode_fetch_response,
    decode_state_response,
    element_size,
    info_from_pb,
    query_to_pb,
    verify_checksum,
)

logger = logging.getLogger(__name__)

CLIENT_KEEPALIVE_TIME_MS = 2 * SERVER_MIN_PING_INTERVAL_MS
CLIENT_KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", CLIENT_KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Reconnect quickly to a neighbour that comes up late; fetch retries do the rest.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
)
# Ranges smaller than this are not worth a stream of their own.
MIN_RANGE_BYTES = 4 << 20


@dataclass(frozen=True)
class FetchResult:
    """What one successful fetch produced."""

    step: int
    # Chunk bytes received as they crossed the wire (after the wire codec, if any).
    nbytes: int
    chunks: int
    retries: int
    live_neighbors: tuple[int, ...] | None = None


def as_aio_error(exc: grpc.RpcError) -> grpc.aio.AioRpcError:
    """The asyncio form of a synchronous call's error (one error path for both readers)."""
    call: Any = exc  # a failed synchronous call is both the error and the call
    trailing = tuple(call.trailing_metadata() or ())
    return grpc.aio.AioRpcError(
        call.code(), grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), call.details()
    )


def to_exchange_error(
    exc: grpc.aio.AioRpcError, neighbor: int, name: str | None, step: int | None, what: str
) -> ExchangeError:
    """Typed exchange error for a failed RPC to ``neighbor``."""
    code = exc.code()
    message = f"{what} from peer {neighbor} failed: {code.name}: {exc.details()}"
    if code == grpc.StatusCode.OUT_OF_RANGE:
        oldest = dict(exc.trailing_metadata() or ()).get(OLDEST_STEP_KEY)
        oldest_step = int(oldest) if oldest is not None and str(oldest).isdigit() else None
        return StepEvicted(
            message, oldest_step=oldest_step, neighbor=neighbor, name=name, step=step
        )
    kind: type[ExchangeError] = ExchangeError
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        kind = ExchangeTimeout
    elif code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        kind = AuthError
    elif code == grpc.StatusCode.UNAVAILABLE:
        kind = PeerUnavailable
    elif code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL):
        kind = WireError
    return kind(message, neighbor=neighbor, name=name, step=step)


class PeerClient:
    """One channel to one neighbour, reused by every call. Build with ``await create(...)``.

    ``range_channels`` are extra channels (each its own TCP connection) that parallel range
    streams of one fetch spread over; the first range always uses the main channel.
    ``blocking_channels`` (synchronous grpc channels), when given, carry every Fetch stream
    instead: each range is read by a worker thread blocked in grpc's C core, which costs less CPU
    per byte than the asyncio reader here (no event-loop wake-up per message;
    benchmarks/exchange.py, README "Exchange engine").
    ``progress``, when given, is stamped with every message or answer that arrives from the
    neighbour and told of every fetch in flight to it.
    """

    def __init__(
        self,
        rank: int,
        neighbor: int,
        address: str,
        channel: grpc.aio.Channel,
        token: str | None,
        metrics: ExchangeMetrics,
        range_channels: tuple[grpc.aio.Channel, ...] = (),
        blocking_channels: tuple[grpc.Channel, ...] = (),
        progress: LinkProgress | None = None,
    ) -> None:
        self.rank = rank
        self.progress = progress
        self.neighbor = neighbor
        self.address = address
        self.metrics = metrics
        self._channel = channel
        self._range_channels = range_channels
        self._metadata = call_metadata(token, rank)
        deserializers: dict[str, Callable[[bytes], Any]] = {
            "Fetch": decode_fetch_response,
            "Info": pb.InfoResponse.FromString,
            "GetState": decode_state_response,
        }
        rpcs = client_callables(channel, deserializers)
        self._fetch, self._info, self._get_state = rpcs["Fetch"], rpcs["Info"], rpcs["GetState"]
        self._fetches = [self._fetch] + [
            client_callables(c, deserializers)["Fetch"] for c in range_channels
        ]
        self._blocking_channels = blocking_channels
        # Synchronous channels have the same multi-callable factories as asyncio ones.
        self._blocking_fetches = [
            client_callables(cast(grpc.aio.Channel, c), deserializers)["Fetch"]
            for c in blocking_channels
        ]

    @classmethod
    async def create(
        cls,
        rank: int,
        neighbor: int,
        address: str,
        *,
        token: str | None,
        tls: TlsConfig | None,
        max_message_bytes: int,
        metrics: ExchangeMetrics,
        channels: int = 1,
        blocking_receive: bool = False,
        progress: LinkProgress | None = None,
    ) -> PeerClient:
        """Open the channel(s) to ``neighbor`` at ``address`` (connect lazily).

        Args:
            rank: this peer (sent in metadata).
            neighbor: the neighbour's rank.
            address: its ``host:port``.
            token: bearer token, or None.
            tls: TLS material, or None for plaintext.
            max_message_bytes: largest message sent or received.
            metrics: collectors of this peer.
            channels: TCP connections to open; parallel range streams spread over them.
            blocking_receive: read Fetch streams in worker threads over synchronous channels
                (``channels`` of them, besides the asyncio channel kept for the other calls).
            progress: this peer's link progress tracker, or None.

        Returns:
            The client.
        """
        options: list[tuple[str, int | str]] = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            *CLIENT_KEEPALIVE_OPTIONS,
        ]
        if tls is not None and tls.server_name_override:
            options.append(("grpc.ssl_target_name_override", tls.server_name_override))

        def open_channel(extra: list[tuple[str, int | str]]) -> grpc.aio.Channel:
            if tls is None:
                return grpc.aio.insecure_channel(address, options=options + extra)
            return grpc.aio.secure_channel(
                address, channel_credentials(tls), options=options + extra
            )

        def open_blocking_channel() -> grpc.Channel:
            extra = [*options, ("grpc.use_local_subchannel_pool", 1)]
            if tls is None:
                return grpc.insecure_channel(address, options=extra)
            return grpc.secure_channel(address, channel_credentials(tls), options=extra)

        channel = open_channel([])
        # A local subchannel pool gives each extra channel a TCP connection of its own (channels
        # with equal arguments would otherwise share one).
        if blocking_receive:
            blocking = tuple(open_blocking_channel() for _ in range(channels))
            return cls(rank, neighbor, address, channel, token, metrics, (), blocking, progress)
        extra = tuple(
            open_channel([("grpc.use_local_subchannel_pool", 1)]) for _ in range(channels - 1)
        )
        return cls(rank, neighbor, address, channel, token, metrics, extra, (), progress)

    async def close(self) -> None:
        """Close the channel(s) (in-flight calls are cancelled)."""
        await self._channel.close()
        for channel in self._range_channels:
            await channel.close()
        for blocking in self._blocking_channels:
            blocking.close()

    async def call_info(self, timeout: float) -> PeerInfo:
        """The neighbour's :class:`PeerInfo`; waits for the connection up to ``timeout``."""
        try:
            response = await self._info(
                pb.InfoRequest(caller_rank=self.rank),
                timeout=timeout,
                metadata=self._metadata,
                wait_for_ready=True,
            )
        except grpc.aio.AioRpcError as exc:
            raise to_exchange_error(exc, self.neighbor, None, None, "Info") from None
        self._arrived()
        return info_from_pb(response)

    def _arrived(self) -> None:
        """Something came from the neighbour: stamp the progress tracker."""
        if self.progress is not None:
            self.progress.arrived(self.neighbor)

    async def _stream_range(
        self,
        query: FetchQuery,
        assembler: RangeAssembler,
        timeout: float,
        header_seen: asyncio.Future[int] | None = None,
        channel_index: int = 0,
    ) -> None:
        if self._blocking_fetches:
            await self._stream_range_in_thread(
                query, assembler, timeout, header_seen, channel_index
            )
            return
        fetch = self._fetches[channel_index % len(self._fetches)]
        call = fetch(query_to_pb(query), timeout=timeout, metadata=self._metadata)
        try:
            async for message in call:
                self._arrived()
                assembler.feed(message)
                header = assembler.header  # feed() accepts chunks only after the header
                if header_seen is not None and header is not None and not header_seen.done():
                    header_seen.set_result(header.step)
            assembler.finish()
        finally:
            if not call.done():
                call.cancel()

    async def _stream_range_in_thread(
        self,
        query: FetchQuery,
        assembler: RangeAssembler,
        timeout: float,
        header_seen: asyncio.Future[int] | None,
        channel_index: int,
    ) -> None:
        """:meth:`_stream_range` over a synchronous channel, read by a worker thread.

        A cancelled await cancels the call, which ends the thread's read at the next message.
        """
        loop = asyncio.get_running_loop()
        fetch = self._blocking_fetches[channel_index % len(self._blocking_fetches)]
        call = fetch(query_to_pb(query), timeout=timeout, metadata=self._metadata)

        def header_arrived(step: int) -> None:
            if header_seen is not None and not header_seen.done():
                header_seen.set_result(step)

        def read() -> None:
            try:
                for message in call:
                    self._arrived()
                    assembler.feed(message)
                    if header_seen is not None and assembler.received_chunks == 0:
                        assert assembler.header is not None  # feed() requires it first
                        loop.call_soon_threadsafe(header_arrived, assembler.header.step)
                assembler.finish()
            except grpc.RpcError as exc:
                raise as_aio_error(exc) from None

        try:
            await asyncio.to_thread(read)
        finally:
            call.cancel()  # no-op once the call completed

    async def _fetch_once(
        self,
        name: str,
        step: int,
        min_step: int,
        dest: memoryview,
        expect_like: Expectation,
        chunk_bytes: int,
        parallel_streams: int,
        timeout: float,
        widen_into: torch.Tensor | None,
    ) -> tuple[VersionHeader, int, int]:
        wire = expect_like.payload_dtype
        total = len(dest) if widen_into is None else widen_into.numel() * element_size(wire)
        parts = max(1, min(parallel_streams, total // MIN_RANGE_BYTES))
        ranges = split_ranges(total, parts, chunk_bytes)

        def assembler_for(offset: int, length: int, lo: int, hi: int) -> RangeAssembler:
            expect = Expectation(
                sender_rank=self.neighbor,
                name=name,
                min_step=lo,
                step=hi,
                dtype=expect_like.dtype,
                shape=expect_like.shape,
                range_offset=offset,
                range_length=length,
                max_chunk_bytes=chunk_bytes,
                wire_dtype=expect_like.wire_dtype,
                verify=expect_like.verify,
                wire_codec=expect_like.wire_codec,
            )
            return RangeAssembler(expect, dest, widen_into)

        def query_for(offset: int, length: int, lo: int, hi: int) -> FetchQuery:
            # The last range asks "to the end" so a size mismatch is reported from the header
            # (shape, dtype, total_bytes) instead of as a range the server refuses.
            open_ended = 0 if offset + length == total else length
            return FetchQuery(
                self.rank, name, hi, lo, chunk_bytes, offset, open_ended,
                expect_like.wire_dtype, expect_like.wire_codec,
            )  # fmt: skip

        first = assembler_for(*ranges[0], min_step, step)
        header_seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        tasks = [
            asyncio.ensure_future(
                self._stream_range(
                    query_for(*ranges[0], min_step, step), first, timeout, header_seen
                )
            )
        ]
        assemblers = [first]
        try:
            if len(ranges) > 1:
                # Learn which step is served, then pin the other ranges to that exact step.
                await asyncio.wait((tasks[0], header_seen), return_when=asyncio.FIRST_COMPLETED)
                if not header_seen.done():
                    await tasks[0]  # raises the first stream's error
                served = header_seen.result()
                for index, (offset, length) in enumerate(ranges[1:], start=1):
                    assembler = assembler_for(offset, length, served, served)
                    assemblers.append(assembler)
                    query = query_for(offset, length, served, served)
                    tasks.append(
                        asyncio.ensure_future(
                            self._stream_range(query, assembler, timeout, channel_index=index)
                        )
                    )
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
        verify_checksum(assemblers, name)
        header = first.header
        if header is None:  # finish() refuses a stream without a header: cannot happen
            raise WireError(f"no header in the {name!r} stream from peer {self.neighbor}")
        received = sum(a.wire_bytes for a in assemblers)
        return header, received, sum(a.received_chunks for a in assemblers)

    async def fetch_into(
        self,
        name: str,
        step: int,
        min_step: int,
        dest: memoryview,
        *,
        dtype: str,
        shape: tuple[int, ...],
        chunk_bytes: int,
        parallel_streams: int,
        deadline: float,
        backoff_seconds: float,
        max_retries: int,
        wire_dtype: str = "",
        widen_into: torch.Tensor | None = None,
        verify_checksum: bool = True,
        wire_codec: str = "",
    ) -> FetchResult:
        """Fetch the neighbour's ``name`` with step in ``[min_step, step]`` into ``dest``.

        Args:
            name: vector name.
            step: newest acceptable step.
            min_step: oldest acceptable step.
            dest: writable byte view of the preallocated destination (its full size).
            dtype: expected wire dtype.
            shape: expected shape.
            chunk_bytes: largest chunk accepted.
            parallel_streams: most concurrent range streams.
            deadline: ``loop.time()`` by which the fetch must be complete.
            backoff_seconds: first retry delay after UNAVAILABLE (doubles each retry).
            max_retries: most retries after UNAVAILABLE.
            wire_dtype: element type to ask the payload in ("" = ``dtype``).
            widen_into: ``dest`` as a flat ``dtype`` tensor; required when ``wire_dtype``
                differs from ``dtype`` (received chunks are widened into it).
            verify_checksum: checksum the received bytes against the header (False where TLS
                already protects them or the user opted out).
            wire_codec: lossless chunk codec to ask for (``exchange.wire_codec``); applied
                to floating-point payloads only (:func:`~peer.transport.grpc.codec.codec_for`).

        Returns:
            The step served, wire bytes (after the codec) and chunks received and retries used.

        Raises:
            ExchangeTimeout, StepEvicted, AuthError, WireError, PeerUnavailable.
        """
        wire = "" if wire_dtype in ("", dtype) else wire_dtype
        if wire and widen_into is None:
            raise ValueError(f"a {wire} wire payload needs widen_into (the {dtype} tensor)")
        item = element_size(wire or dtype)
        chunk_bytes = max(item, chunk_bytes - chunk_bytes % item)  # whole elements, as the server
        like = Expectation(
            self.neighbor, name, min_step, step, dtype, shape, 0, 0, chunk_bytes,
            wire_dtype=wire, verify=verify_checksum,
            wire_codec=codec_for(wire or dtype, wire_codec),
        )  # fmt: skip
        if self.progress is not None:
            self.progress.fetch_started(self.neighbor)
        try:
            return await self._fetch_with_retries(
                name, step, min_step, dest, like, chunk_bytes, parallel_streams, deadline,
                backoff_seconds, max_retries, widen_into if wire else None,
            )  # fmt: skip
        finally:
            if self.progress is not None:
                self.progress.fetch_ended(self.neighbor)

    async def _fetch_with_retries(
        self,
        name: str,
        step: int,
        min_step: int,
        dest: memoryview,
        like: Expectation,
        chunk_bytes: int,
        parallel_streams: int,
        deadline: float,
        backoff_seconds: float,
        max_retries: int,
        widen_into: torch.Tensor | None,
    ) -> FetchResult:
        """:meth:`fetch_into`'s attempts: UNAVAILABLE retried with backoff inside ``deadline``."""
        loop = asyncio.get_running_loop()
        retries = 0
        while True:
            timeout = deadline - loop.time()
            try:
                if timeout <= 0:
                    raise ExchangeTimeout(
                        f"no {name!r} step {step} from peer {self.neighbor} before the deadline",
                        neighbor=self.neighbor,
                        name=name,
                        step=step,
                    )
                header, nbytes, chunks = await self._fetch_once(
                    name,
                    step,
                    min_step,
                    dest,
                    like,
                    chunk_bytes,
                    parallel_streams,
                    timeout,
                    widen_into,
                )
                return FetchResult(header.step, nbytes, chunks, retries, header.live_neighbors)
            except grpc.aio.AioRpcError as exc:
                retry_in = backoff_seconds * (2**retries)
                if (
                    exc.code() == grpc.StatusCode.UNAVAILABLE
                    and retries < max_retries
                    and loop.time() + retry_in < deadline
                ):
                    retries += 1
                    self.metrics.retried(self.neighbor)
                    logger.debug("peer %d unavailable, retry %d", self.neighbor, retries)
                    await asyncio.sleep(retry_in)
                    continue
                self.metrics.failed(self.neighbor, exc.code().name)
                what = f"fetch of {name!r} step {step}"
                error = to_exchange_error(exc, self.neighbor, name, step, what)
                if isinstance(error, PeerUnavailable) and loop.time() + retry_in >= deadline:
                    error = ExchangeTimeout(
                        f"no {name!r} step {step} from peer {self.neighbor} before the deadline "
                        f"(unavailable after {retries} retries)",
                        neighbor=self.neighbor,
                        name=name,
                        step=step,
                    )
                raise error from None
            except ExchangeError as exc:
                code = "DEADLINE_EXCEEDED" if isinstance(exc, ExchangeTimeout) else "DATA_LOSS"
                self.metrics.failed(self.neighbor, code)
                raise

    async def call_get_state(self, timeout: float, chunk_bytes: int) -> PeerState:
        """The neighbour's training state (GetState), validated and unpacked."""
        call = self._get_state(
            pb.GetStateRequest(caller_rank=self.rank, max_chunk_bytes=chunk_bytes),
            timeout=timeout,
            metadata=self._metadata,
        )
        header: StateHeader | None = None
        payload = bytearray()
        received_chunks = 0

        def fail(reason: str) -> WireError:
            return WireError(
                f"bad GetState stream from peer {self.neighbor}: {reason}", neighbor=self.neighbor
            )

        try:
            async for message in call:
                if isinstance(message, Malformed):
                    raise fail(message.reason)
                if isinstance(message, StateHeader):
                    if header is not None or not 0 < message.chunk_bytes <= chunk_bytes:
                        raise fail("duplicate header or bad chunk size")
                    if message.chunk_count != chunk_count(message.total_bytes, message.chunk_bytes):
                        raise fail(f"chunk count {message.chunk_count}")
                    header = message
                    continue
                if header is None:
                    raise fail("chunk before the header")
                if (
                    len(message) > header.chunk_bytes
                    or len(payload) + len(message) > header.total_bytes
                ):
                    raise fail("oversized stream")
                payload += message
                received_chunks += 1
        except grpc.aio.AioRpcError as exc:
            raise to_exchange_error(exc, self.neighbor, None, None, "GetState") from None
        finally:
            if not call.done():
                call.cancel()
        if (
            header is None
            or len(payload) != header.total_bytes
            or received_chunks != header.chunk_count
        ):
            raise fail("truncated stream")
        if checksum(header.checksum_kind, payload) != header.checksum:
            raise fail("checksum mismatch")
        return unpack_state(header, payload)
