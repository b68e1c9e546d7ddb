"""Retained versions of the vectors a peer publishes, and its state snapshots for GetState.

A published vector is snapshotted once (:func:`snapshot`) in the training thread and then
served to every neighbour from that snapshot. Each wire encoding of a version (:class:`Encoding`:
its own dtype, or a float32 vector rounded to bfloat16/float16 once per version) computes its
checksum once and keeps the encoded chunk messages it has built, so every further reader of the
newest version streams the same ``bytes`` objects (no per-request copy; older versions drop
their chunks, which bounds the extra memory to one encoded copy per name). Chunks in a lossless
wire codec (:meth:`Encoding.coded_chunks`, :mod:`peer.transport.grpc.codec`) are cached the same
way, each coded in a worker thread the first time a reader needs it. For a CUDA tensor
the snapshot is ONE device-to-host copy per published version into a pinned buffer, issued on a
side CUDA stream and fenced by an event; the CPU path is the same code with that copy skipped
(the device clone is the host buffer).

:class:`VersionStore` lives on the server's event loop. It keeps the last ``retained_versions``
steps per name, wakes the requests waiting for a name through that name's :class:`asyncio.Event` (no
polling), and
answers lookups with the peer.transport.base staleness semantics: exact step preferred, else the
freshest
retained step in ``[min_step, step]``, else :class:`~peer.errors.StepEvicted` when the step is
older than the oldest retained one, else "not yet" (wait).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from peer.errors import WireError
from peer.transport.base import GLOBAL_PREFIX, choose_step
from peer.transport.grpc import codec
from peer.transport.grpc.framing import DEFAULT_CHECKSUM, checksum, chunk_count
from peer.transport.grpc.wire import (
    WIRE_DTYPES,
    StateEntry,
    StateHeader,
    dtype_name,
    encode_chunk,
    parse_dtype,
)

logger = logging.getLogger(__name__)

# One CUDA copy stream per device, created on first use by whichever thread snapshots first
# (the training thread, or an autograd hook on backward's thread): guarded by a lock.
_side_streams: dict[int, torch.cuda.Stream] = {}
_side_streams_lock = threading.Lock()


def byte_view(tensor: torch.Tensor) -> memoryview:
    """Zero-copy byte view of a contiguous CPU tensor."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _side_streams_lock:
        stream = _side_streams.get(index)
        if stream is None:
            stream = _side_streams[index] = torch.cuda.Stream(device=index)
        return stream


class UnavailableEncoding(ValueError):
    """A reader asked for a wire dtype this version cannot be served in."""


@dataclass(eq=False)
class Encoding:
    """One version's payload in one wire dtype, with its checksum and shared chunk messages.

    Attributes:
        dtype: element type of the payload bytes.
        tensor: the payload as a flat tensor (keeps ``payload``'s memory alive).
        payload: byte view of ``tensor``.
    """

    dtype: str
    tensor: torch.Tensor
    payload: memoryview
    _checksum: asyncio.Future[int] | None = field(default=None, repr=False)
    _chunk_bytes: int = field(default=0, repr=False)
    _chunks: list[bytes | None] = field(default_factory=list, repr=False)
    _coded: dict[str, _CodedGrid] = field(default_factory=dict, repr=False)

    @property
    def total_bytes(self) -> int:
        """Payload size in bytes."""
        return len(self.payload)

    @property
    def element_bytes(self) -> int:
        """Bytes per element (chunks and ranges are multiples of it)."""
        return self.tensor.element_size()

    def checksum(self) -> asyncio.Future[int]:
        """Checksum (:data:`~peer.transport.grpc.framing.DEFAULT_CHECKSUM`) of the payload,
        computed once in a worker thread (both CRC implementations release the GIL)."""
        if self._checksum is None:
            self._checksum = asyncio.ensure_future(
                asyncio.to_thread(checksum, DEFAULT_CHECKSUM, self.payload)
            )
        return self._checksum

    def drop_chunks(self) -> None:
        """Forget the cached chunk messages (they are rebuilt on demand)."""
        self._chunk_bytes, self._chunks, self._coded = 0, [], {}

    async def coded_chunks(
        self, wire_codec: str, offset: int, length: int, chunk_bytes: int
    ) -> AsyncIterator[bytes]:
        """Chunk messages of payload bytes ``[offset, offset + length)`` in ``wire_codec``.

        Every chunk covers ``chunk_bytes`` payload bytes (the last may be shorter) and is coded
        in a worker thread, the next one while the current one is sent. Chunks on the whole
        payload's grid are coded once per codec and chunk size and shared by every reader.
        """
        grid = self._coded.get(wire_codec)
        if grid is None or grid.chunk_bytes != chunk_bytes:
            grid = _CodedGrid(self.payload, self.element_bytes, chunk_bytes)
            self._coded[wire_codec] = grid
        end = offset + length
        starts = range(offset, end, chunk_bytes)
        pending = self._coded_chunk(grid, starts[0], end) if starts else None
        for start in starts:
            assert pending is not None
            current = pending
            following = start + chunk_bytes
            pending = self._coded_chunk(grid, following, end) if following < end else None
            yield await asyncio.shield(current)  # shared: one reader's cancel is not theirs

    def _grid_index(self, start: int, stop: int, chunk_bytes: int) -> int | None:
        """Index of ``[start, stop)`` on the whole payload's chunk grid; None when off it."""
        index, aligned = divmod(start, chunk_bytes)
        whole = stop - start == chunk_bytes or stop == self.total_bytes
        return index if not aligned and whole else None

    def _coded_chunk(self, grid: _CodedGrid, start: int, end: int) -> asyncio.Future[bytes]:
        stop = min(start + grid.chunk_bytes, end)
        index = self._grid_index(start, stop, grid.chunk_bytes)
        if index is not None:
            return grid.message(index)
        return asyncio.ensure_future(
            asyncio.to_thread(_coded_message, self.payload[start:stop], self.element_bytes)
        )

    def encoded_chunks(self, offset: int, length: int, chunk_bytes: int) -> Iterator[bytes]:
        """Chunk messages of payload bytes ``[offset, offset + length)``, ``chunk_bytes`` each.

        Chunks aligned with the whole payload's chunk grid are built once and shared by every
        reader asking for the same chunk size; the others are encoded per request.
        """
        if chunk_bytes != self._chunk_bytes:
            if self._chunk_bytes and any(c is not None for c in self._chunks):
                cache: list[bytes | None] | None = None  # another size is cached: keep it
            else:
                self._chunk_bytes = chunk_bytes
                self._chunks = [None] * chunk_count(self.total_bytes, chunk_bytes)
                cache = self._chunks
        else:
            cache = self._chunks
        end = offset + length
        for start in range(offset, end, chunk_bytes):
            stop = min(start + chunk_bytes, end)
            index = self._grid_index(start, stop, chunk_bytes)
            if cache is None or index is None:
                yield encode_chunk(self.payload[start:stop])
                continue
            message = cache[index]
            if message is None:
                message = cache[index] = encode_chunk(self.payload[start:stop])
            yield message


def _coded_message(payload: memoryview, itemsize: int) -> bytes:
    return encode_chunk(*codec.encode_parts(payload, itemsize))


class _CodedGrid:
    """Coded chunk messages of a whole payload on one chunk grid, each coded once on demand."""

    def __init__(self, payload: memoryview, itemsize: int, chunk_bytes: int) -> None:
        self.payload, self.itemsize, self.chunk_bytes = payload, itemsize, chunk_bytes
        self._messages: list[asyncio.Future[bytes] | None] = [None] * chunk_count(
            len(payload), chunk_bytes
        )

    def message(self, index: int) -> asyncio.Future[bytes]:
        """Chunk ``index``'s message, coded in a worker thread the first time it is asked."""
        message = self._messages[index]
        if message is None or (
            message.done() and (message.cancelled() or message.exception() is not None)
        ):
            start = index * self.chunk_bytes
            piece = self.payload[start : start + self.chunk_bytes]
            message = asyncio.ensure_future(asyncio.to_thread(_coded_message, piece, self.itemsize))
            self._messages[index] = message
        return message


@dataclass(eq=False)
class Version:
    """One published, immutable version of a named vector.

    Attributes:
        name: vector name.
        step: step it was published for.
        dtype: wire dtype name.
        shape: tensor shape.
        host: contiguous CPU tensor holding the payload (pinned for CUDA sources).
        payload: byte view of ``host``; served in slices.
        ready: CUDA event marking the end of the device-to-host copy (None on CPU).
        live_neighbors: in-neighbours the publisher mixes at this step (advertised in the
            Fetch header), or None when it declares none.
        wire_dtype: encoding prepared eagerly when the version is retained (the peer's
            ``exchange.wire_dtype`` for float32 vectors, else ``dtype``); readers may ask for
            any other encoding :func:`encodable` allows, built on first request.
    """

    name: str
    step: int
    dtype: str
    shape: tuple[int, ...]
    host: torch.Tensor
    payload: memoryview
    ready: torch.cuda.Event | None = None
    live_neighbors: tuple[int, ...] | None = None
    _checksum: asyncio.Future[int] | None = field(default=None, repr=False)
    wire_dtype: str = ""
    _encodings: dict[str, asyncio.Future[Encoding]] = field(default_factory=dict, repr=False)

    @property
    def total_bytes(self) -> int:
        """Payload size in bytes."""
        return len(self.payload)

    async def wait_ready(self) -> None:
        """Wait (off the event loop thread) for the device-to-host copy, if any."""
        if self.ready is not None and not self.ready.query():
            await asyncio.to_thread(self.ready.synchronize)

    def encoding(self, wire_dtype: str = "") -> asyncio.Future[Encoding]:
        """The payload in ``wire_dtype`` ("" = ``dtype``), prepared once: rounded in a worker
        thread when it differs from ``dtype``, and its checksum started.

        Raises:
            UnavailableEncoding: ``wire_dtype`` is not one this version can travel in.
        """
        wire = wire_dtype or self.dtype
        if not encodable(self.dtype, wire):
            raise UnavailableEncoding(
                f"{self.name!r} ({self.dtype}) cannot travel as {wire!r}: a float32 vector may "
                f"use one of {', '.join(WIRE_DTYPES)}, other dtypes only their own"
            )
        if wire not in self._encodings:
            self._encodings[wire] = asyncio.ensure_future(self._encode(wire))
        return self._encodings[wire]

    async def _encode(self, wire: str) -> Encoding:
        await self.wait_ready()
        flat = self.host.reshape(-1)
        if wire != self.dtype:
            target = parse_dtype(wire)
            flat = await asyncio.to_thread(flat.to, target)
        encoding = Encoding(wire, flat, byte_view(flat))
        await encoding.checksum()
        return encoding

    def drop_chunks(self) -> None:
        """Forget every encoding's cached chunk messages (a newer version took over)."""
        for future in self._encodings.values():
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().drop_chunks()


def wire_dtype_for(name: str, dtype: str, configured: str) -> str:
    """The encoding a vector travels in under a peer's ``exchange.wire_dtype`` (``configured``).

    Only float32 partial-average vectors are rounded: global averages (``global/*``) stay exact,
    so that they remain bit-identical on every peer, and other dtypes travel as they are.
    """
    if name.startswith(GLOBAL_PREFIX) or not encodable(dtype, configured):
        return dtype
    return configured


def encodable(dtype: str, wire_dtype: str) -> bool:
    """Whether a vector of ``dtype`` may travel as ``wire_dtype`` (float32 may be rounded)."""
    return wire_dtype == dtype or (dtype == "float32" and wire_dtype in WIRE_DTYPES)


def snapshot(
    tensor: torch.Tensor, name: str, step: int, *, copy: bool = True, wire_dtype: str = ""
) -> tuple[torch.Tensor, Version]:
    """Snapshot ``tensor`` for publishing; safe to mutate ``tensor`` right after.

    Args:
        tensor: the vector (any device, any layout).
        name: its name.
        step: its step.
        copy: ``False`` uses ``tensor`` itself when it is already contiguous (the caller hands
            it over and never modifies it again).
        wire_dtype: the peer's ``exchange.wire_dtype``; the encoding prepared as soon as the
            version is retained is :func:`wire_dtype_for` of it; "" = the vector's own dtype.

    Returns:
        ``(own, version)``: ``own`` is a contiguous clone on the tensor's device (the peer's own
        term of the average); ``version`` holds the host copy that neighbours are served from.
    """
    own = tensor.detach()
    if copy or not own.is_contiguous():
        own = own.clone(memory_format=torch.contiguous_format)
    ready = None
    if own.is_cuda:
        host = torch.empty(own.shape, dtype=own.dtype, pin_memory=True)
        side = _side_stream(own.device)
        side.wait_stream(torch.cuda.current_stream(own.device))
        with torch.cuda.stream(side):
            host.copy_(own, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(side)
        own.record_stream(side)  # keep `own` alive for the side stream's copy
    else:
        host = own
    dtype = dtype_name(own.dtype)
    wire = wire_dtype_for(name, dtype, wire_dtype or dtype)
    version = Version(
        name, step, dtype, tuple(own.shape), host, byte_view(host), ready, wire_dtype=wire
    )
    return own, version


class VersionStore:
    """Last ``retained_versions`` versions per name; lives on one event loop.

    Args:
        retained_versions: versions kept per name (K >= 1).
    """

    def __init__(self, retained_versions: int) -> None:
        if retained_versions < 1:
            raise ValueError(f"retained_versions must be >= 1, got {retained_versions}")
        self.retained_versions = retained_versions
        self._versions: dict[str, OrderedDict[int, Version]] = {}
        # Per name: set (and dropped) on every insert of that name; its waiters then re-check.
        self._published: dict[str, asyncio.Event] = {}

    def insert(self, version: Version) -> None:
        """Retain ``version`` (evicting the oldest beyond K) and wake waiting requests."""
        retained = self._versions.setdefault(version.name, OrderedDict())
        for older in retained.values():
            older.drop_chunks()  # readers move on to the new version: free its chunk copy
        retained[version.step] = version
        retained.move_to_end(version.step)
        while len(retained) > self.retained_versions:
            retained.popitem(last=False)
        version.encoding(version.wire_dtype)  # round + checksum now, ready when neighbours ask
        published = self._published.pop(version.name, None)
        if published is not None:
            published.set()

    def lookup(self, name: str, step: int, min_step: int) -> Version | None:
        """Freshest retained version with step in ``[min_step, step]``, or None if not yet
        (:func:`peer.transport.base.choose_step`).

        Raises:
            StepEvicted: ``step`` is older than the oldest retained step of ``name``.
        """
        retained = self._versions.get(name)
        if not retained:
            return None
        chosen = choose_step(list(retained), step, min_step, name=name)
        return None if chosen is None else retained[chosen]

    async def wait_for(self, name: str, step: int, min_step: int, timeout: float) -> Version:
        """Wait up to ``timeout`` seconds for an acceptable version (see :meth:`lookup`).

        Only publishes of ``name`` wake the wait.

        Raises:
            TimeoutError: none was published in time.
            StepEvicted: the step is already evicted.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            found = self.lookup(name, step, min_step)
            if found is not None:
                return found
            # No await between the lookup and taking the event: an insert cannot slip between.
            published = self._published.setdefault(name, asyncio.Event())
            await asyncio.wait_for(published.wait(), timeout=max(0.0, deadline - loop.time()))

    def export(self, min_step: int) -> dict[str, dict[int, Version]]:
        """Retained versions with step >= ``min_step``, per name (for checkpoints)."""
        return {
            name: {step: v for step, v in steps.items() if step >= min_step}
            for name, steps in self._versions.items()
            if any(step >= min_step for step in steps)
        }

    def retained_steps(self) -> dict[str, list[int]]:
        """Retained steps per name, oldest first."""
        return {name: list(steps) for name, steps in self._versions.items()}

    def retained_count(self) -> int:
        """Total number of retained versions (bounded by K times the number of names)."""
        return sum(len(steps) for steps in self._versions.values())


StateLike = bytes | Mapping[str, torch.Tensor]
StateProvider = Callable[[], tuple[int, StateLike]]


@dataclass
class PeerState:
    """A peer's training state as received by :meth:`GrpcCommunicator.fetch_state`.

    Attributes:
        step: training step of the state.
        blob: the opaque payload, when the provider returned bytes.
        tensors: the named tensors, when the provider returned a mapping.
    """

    step: int
    blob: bytes | None = None
    tensors: dict[str, torch.Tensor] | None = None


def pack_state(state: StateLike) -> tuple[bool, tuple[StateEntry, ...], memoryview]:
    """Lay a provider's state out as one payload.

    Returns:
        ``(is_blob, entries, payload)``: tensors go back to back in mapping order.
    """
    if isinstance(state, bytes | bytearray | memoryview):
        return True, (), memoryview(bytes(state))
    entries, parts, offset = [], [], 0
    for name, tensor in state.items():
        host = tensor.detach().to("cpu").contiguous()
        view = byte_view(host)
        entries.append(
            StateEntry(name, dtype_name(host.dtype), tuple(host.shape), offset, len(view))
        )
        parts.append(view)
        offset += len(view)
    return False, tuple(entries), memoryview(b"".join(parts))


def unpack_state(header: StateHeader, payload: bytearray) -> PeerState:
    """Rebuild a :class:`PeerState` from a validated payload; WireError on a bad layout."""
    if header.is_blob:
        return PeerState(step=header.step, blob=bytes(payload))
    tensors: dict[str, torch.Tensor] = {}
    for entry in header.entries:
        dtype = parse_dtype(entry.dtype)
        numel = 1
        for size in entry.shape:
            numel *= size
        itemsize = torch.empty((), dtype=dtype).element_size()
        end = entry.offset + entry.length
        if (
            numel * itemsize != entry.length
            or end > len(payload)
            or min(entry.shape, default=0) < 0
        ):
            raise WireError(f"state entry {entry.name!r} does not fit the payload")
        raw = torch.empty(0, dtype=torch.uint8)
        if entry.length:  # frombuffer refuses count=0
            raw = torch.frombuffer(
                payload, dtype=torch.uint8, count=entry.length, offset=entry.offset
            )
            raw = (
                raw.clone()
            )  # own the memory: the payload buffer is reused by nobody, but stay safe
        tensors[entry.name] = raw.view(dtype).reshape(entry.shape)
    return PeerState(step=header.step, tensors=tensors)
