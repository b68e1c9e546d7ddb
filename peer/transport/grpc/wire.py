"""Protobuf <-> domain conversion, chunk framing, checksums and stream validation.

This module and the gRPC server/client are the only ones that import the generated
``*_pb2`` code. Everything else sees plain dataclasses (:class:`FetchQuery`,
:class:`VersionHeader`, :class:`PeerInfo`, :class:`PeerState`).

Chunk messages bypass protobuf on the hot path: a ``FetchResponse``/``GetStateResponse`` whose
only field is ``bytes chunk = 2`` is, on the wire, the tag byte ``0x12``, a varint length and the
payload. :func:`encode_chunk` writes exactly that from a memoryview slice of the retained
snapshot (one copy into the message bytes), and :func:`decode_fetch_response` recognises it and
returns a memoryview of the payload without a protobuf parse (which would copy it again). Any
other message goes through the generated protobuf code, so the stream stays valid protobuf for
every other client.

Wire dtypes: a float32 vector may travel rounded to bfloat16 or float16 (``exchange.wire_dtype``,
:data:`WIRE_DTYPES`). The header's ``dtype`` stays the vector's own type and ``wire_dtype`` names
the payload's element type; the receiver widens every chunk straight into its float32 buffer
(:class:`RangeAssembler`), so ``total_bytes``, ranges and checksums are all in wire bytes.

Checksums (CRC-32C, or zlib CRC-32 without the crc32c extension; the header names the
kind) cover the whole payload and are computed once per published version. A receiver
fetching the payload as several byte ranges in parallel checksums each range as it arrives and
folds the range CRCs together with :func:`peer.transport.grpc.framing.checksum_combine`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from google.protobuf.message import DecodeError

from peer.errors import WireError
from peer.transport.grpc.codec import CodecError, Coded, decode_into, parse
from peer.transport.grpc.framing import (
    CRC32,
    CRC32C,
    checksum_combine,
    checksum_extend,
    chunk_count,
    read_varint,
    varint,
)
from peer.transport.grpc.proto.decentlam.v1 import peer_pb2 as pb

logger = logging.getLogger(__name__)

CHUNK_TAG = 0x12  # field 2 (`chunk`), wire type 2 (length-delimited)
CHECKSUM_KINDS = {CRC32: pb.CHECKSUM_KIND_CRC32, CRC32C: pb.CHECKSUM_KIND_CRC32C}
CHECKSUM_NAMES = {value: name for name, value in CHECKSUM_KINDS.items()}
STATE_BLOB = pb.STATE_KIND_BLOB
STATE_TENSORS = pb.STATE_KIND_TENSORS

_DTYPES: dict[str, torch.dtype] = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}


# Encodings a float32 vector may travel in (exchange.wire_dtype); other dtypes travel as they are.
WIRE_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
# Wire dtypes a float32 receiver widens from: each chunk is viewed in place (torch.frombuffer)
# and converted straight into the float32 destination by torch (exact; ~25% less CPU than the
# numpy 16-bit shift it replaced for bfloat16).
_WIDEN_FROM = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# torch.frombuffer warns once per process that a read-only buffer (a received chunk) gives a
# writable tensor; the chunk views made here are only read.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


def element_size(name: str) -> int:
    """Bytes per element of wire dtype ``name``; raises :class:`WireError` for an unknown one."""
    return torch.empty((), dtype=parse_dtype(name)).element_size()


def dtype_name(dtype: torch.dtype) -> str:
    """Wire name of a torch dtype (``torch.float32`` -> ``"float32"``)."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    """Torch dtype of a wire name; raises :class:`WireError` for an unknown one."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise WireError(f"unsupported dtype {name!r} on the wire") from None


def encode_chunk(*parts: memoryview | bytes | bytearray) -> bytes:
    """Serialized ``{chunk: b"".join(parts)}`` message, built straight from buffer slices (one
    copy of each part: a coded chunk's pieces go in without being joined first)."""
    length = sum(len(part) for part in parts)
    return b"".join((bytes((CHUNK_TAG,)), varint(length), *parts))


def chunk_payload_length(message: bytes) -> int:
    """Content bytes of a chunk message built by :func:`encode_chunk` (framing excluded)."""
    chunk = _fast_chunk(message)
    return len(message) if chunk is None else len(chunk)


def serialize_message(message: object) -> bytes:
    """Response serializer: pre-encoded chunks pass through, protobuf messages serialize."""
    if isinstance(message, bytes):
        return message
    return message.SerializeToString()  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Malformed:
    """A message that could not be decoded; the assembler turns it into a :class:`WireError`."""

    reason: str


def _fast_chunk(data: bytes) -> memoryview | None:
    if len(data) < 2 or data[0] != CHUNK_TAG:
        return None
    parsed = read_varint(data, 1)
    if parsed is None or parsed[0] + parsed[1] != len(data):
        return None
    return memoryview(data)[parsed[1] :]


@dataclass(frozen=True)
class FetchQuery:
    """A Fetch request: the freshest version of ``name`` with step in ``[min_step, step]``."""

    caller_rank: int
    name: str
    step: int
    min_step: int
    max_chunk_bytes: int = 0
    range_offset: int = 0
    range_length: int = 0
    # Element type the caller wants the payload in; "" = the vector's own dtype (version 1).
    wire_dtype: str = ""
    # Lossless chunk codec the caller wants (peer.transport.grpc.codec); "" = raw chunks.
    wire_codec: str = ""


def query_to_pb(query: FetchQuery) -> pb.FetchRequest:
    """Protobuf form of a :class:`FetchQuery`."""
    return pb.FetchRequest(
        caller_rank=query.caller_rank,
        name=query.name,
        step=query.step,
        min_step=query.min_step,
        max_chunk_bytes=query.max_chunk_bytes,
        range_offset=query.range_offset,
        range_length=query.range_length,
        wire_dtype=query.wire_dtype,
        wire_codec=query.wire_codec,
    )


def query_from_pb(request: pb.FetchRequest) -> FetchQuery:
    """Domain form of a ``FetchRequest``; raises :class:`WireError` for an impossible one."""
    if not request.name:
        raise WireError("fetch request without a vector name")
    if request.min_step > request.step:
        raise WireError(f"min_step {request.min_step} is after step {request.step}")
    return FetchQuery(
        caller_rank=request.caller_rank,
        name=request.name,
        step=request.step,
        min_step=request.min_step,
        max_chunk_bytes=request.max_chunk_bytes,
        range_offset=request.range_offset,
        range_length=request.range_length,
        wire_dtype=request.wire_dtype,
        wire_codec=request.wire_codec,
    )


@dataclass(frozen=True)
class VersionHeader:
    """Domain form of ``FetchHeader``: the version served and the chunks that follow."""

    sender_rank: int
    step: int
    name: str
    dtype: str
    shape: tuple[int, ...]
    total_bytes: int
    checksum: int
    range_offset: int
    range_length: int
    chunk_count: int
    chunk_bytes: int
    checksum_kind: str = CRC32
    # The sender's live in-neighbours at `step`; None when it declared none (older peers).
    live_neighbors: tuple[int, ...] | None = None
    # Element type of the payload bytes; "" = ``dtype`` (no rounding on the wire).
    wire_dtype: str = ""
    # Lossless codec of the chunk messages; "" = raw payload bytes.
    wire_codec: str = ""

    @property
    def payload_dtype(self) -> str:
        """Element type of the payload bytes (``wire_dtype``, else ``dtype``)."""
        return self.wire_dtype or self.dtype


def header_to_pb(header: VersionHeader) -> pb.FetchResponse:
    """The first message of a Fetch stream."""
    return pb.FetchResponse(
        header=pb.FetchHeader(
            sender_rank=header.sender_rank,
            step=header.step,
            name=header.name,
            dtype=header.dtype,
            shape=list(header.shape),
            total_bytes=header.total_bytes,
            checksum_kind=CHECKSUM_KINDS[header.checksum_kind],
            checksum=header.checksum,
            range_offset=header.range_offset,
            range_length=header.range_length,
            chunk_count=header.chunk_count,
            chunk_bytes=header.chunk_bytes,
            live_neighbors=list(header.live_neighbors or ()),
            live_view_sent=header.live_neighbors is not None,
            # Left empty without rounding, so version-1 receivers see a plain version-1 header.
            wire_dtype="" if header.payload_dtype == header.dtype else header.payload_dtype,
            wire_codec=header.wire_codec,
        )
    )


def _decode_header_or_chunk(data: bytes, message_type: Any, rpc: str) -> Any:
    """The header message of a Fetch/GetState response, its chunk payload, or :class:`Malformed`.

    Both responses are ``oneof payload { header; chunk }``; chunks take the fast path.
    """
    chunk = _fast_chunk(data)
    if chunk is not None:
        return chunk
    try:
        message = message_type.FromString(data)
    except (DecodeError, ValueError) as exc:
        return Malformed(f"undecodable {rpc} message ({exc})")
    kind = message.WhichOneof("payload")
    if kind == "chunk":
        return memoryview(message.chunk)
    if kind != "header":
        return Malformed(f"{rpc} message with neither header nor chunk")
    return message.header


def decode_fetch_response(data: bytes) -> VersionHeader | memoryview | Malformed:
    """Response deserializer of Fetch: a header, a chunk payload, or :class:`Malformed`.

    Never raises: gRPC would turn a deserializer exception into an opaque INTERNAL status.
    """
    h = _decode_header_or_chunk(data, pb.FetchResponse, "Fetch")
    if isinstance(h, (memoryview, Malformed)):
        return h
    if h.checksum_kind not in CHECKSUM_NAMES:
        return Malformed(f"unsupported checksum kind {h.checksum_kind}")
    return VersionHeader(
        sender_rank=h.sender_rank,
        step=h.step,
        name=h.name,
        dtype=h.dtype,
        shape=tuple(h.shape),
        total_bytes=h.total_bytes,
        checksum=h.checksum,
        range_offset=h.range_offset,
        range_length=h.range_length,
        chunk_count=h.chunk_count,
        chunk_bytes=h.chunk_bytes,
        checksum_kind=CHECKSUM_NAMES[h.checksum_kind],
        live_neighbors=tuple(h.live_neighbors) if h.live_view_sent else None,
        wire_dtype=h.wire_dtype,
        wire_codec=h.wire_codec,
    )


@dataclass(frozen=True)
class Expectation:
    """What a receiver expects of one Fetch stream, checked message by message."""

    sender_rank: int
    name: str
    min_step: int
    step: int
    dtype: str
    shape: tuple[int, ...]
    range_offset: int
    range_length: int
    max_chunk_bytes: int
    # Element type of the payload bytes; "" = ``dtype``. Ranges are in payload bytes.
    wire_dtype: str = ""
    # Whether to checksum the received bytes (off where TLS already protects them).
    verify: bool = True
    # Lossless chunk codec expected (codec.codec_for of the payload dtype); "" = raw chunks.
    wire_codec: str = ""

    @property
    def payload_dtype(self) -> str:
        """Element type of the payload bytes (``wire_dtype``, else ``dtype``)."""
        return self.wire_dtype or self.dtype


@dataclass
class RangeAssembler:
    """Validates one Fetch stream and writes its chunks into a preallocated buffer.

    Args:
        expect: the request's expectations (sender, name, step window, dtype, shape, range).
        dest: byte view of the WHOLE destination buffer; chunks land at their range offset.
        widen_into: the destination as a flat tensor of ``expect.dtype``; required when the
            payload travels in another ``wire_dtype``: every chunk is widened straight into it
            (one pass, no intermediate buffer).
    """

    expect: Expectation
    dest: memoryview
    widen_into: torch.Tensor | None = None
    header: VersionHeader | None = None
    received_bytes: int = 0
    received_chunks: int = 0
    range_crc: int = 0
    # Bytes of chunk content as they crossed the wire (after the codec; = received_bytes raw).
    wire_bytes: int = 0
    payload_bytes: int = field(default=0, init=False)
    _payload_itemsize: int = field(default=0, init=False, repr=False)
    _cursor: int = field(default=0, repr=False)
    _wire_itemsize: int = field(default=0, init=False, repr=False)
    _wide: torch.Tensor | None = field(default=None, init=False, repr=False)
    _wire_torch: torch.dtype | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        e = self.expect
        if e.wire_codec:
            self._payload_itemsize = element_size(e.payload_dtype)
        if e.payload_dtype == e.dtype:
            self.payload_bytes = len(self.dest)
            return
        if (
            self.widen_into is None
            or e.dtype != "float32"
            or self.widen_into.dtype != torch.float32
            or e.payload_dtype not in _WIDEN_FROM
        ):
            raise ValueError(f"widening {e.payload_dtype} needs a float32 widen_into tensor")
        self._wire_torch = _WIDEN_FROM[e.payload_dtype]
        self._wide = self.widen_into.reshape(-1)
        self._wire_itemsize = element_size(e.payload_dtype)
        self.payload_bytes = self.widen_into.numel() * self._wire_itemsize

    def _fail(self, reason: str) -> WireError:
        e = self.expect
        return WireError(
            f"bad Fetch stream from peer {e.sender_rank} for {e.name!r} step {e.step}: {reason}",
            neighbor=e.sender_rank,
            name=e.name,
            step=e.step,
        )

    def feed(self, message: VersionHeader | memoryview | Malformed) -> None:
        """Consume one decoded message; raises :class:`WireError` on anything unexpected."""
        if isinstance(message, Malformed):
            raise self._fail(message.reason)
        if isinstance(message, VersionHeader):
            if self.header is not None:
                raise self._fail("second header in one stream")
            self._check_header(message)
            self.header = message
            self._cursor = self.expect.range_offset
            return
        if self.header is None:
            raise self._fail("chunk before the header")
        coded: Coded | None = None
        if self.header.wire_codec:
            try:
                coded = parse(message, self._payload_itemsize)
            except CodecError as exc:
                raise self._fail(f"{self.header.wire_codec} chunk: {exc}") from None
            size = coded.size
        else:
            size = len(message)
        if size == 0 or size > self.header.chunk_bytes:
            raise self._fail(f"chunk of {size} bytes (chunk size {self.header.chunk_bytes})")
        if self.received_bytes + size > self.expect.range_length:
            raise self._fail(f"oversized stream: more than {self.expect.range_length} bytes")
        if self._wide is None or self._wire_torch is None:
            payload = self.dest[self._cursor : self._cursor + size]
            if coded is None:
                payload[:] = message
            else:
                self._decode(coded, payload)
        else:
            if size % self._wire_itemsize:
                raise self._fail(f"chunk of {size} bytes splits a {self.expect.payload_dtype}")
            payload = message
            if coded is not None:
                payload = memoryview(bytearray(size))
                self._decode(coded, payload)
            first = self._cursor // self._wire_itemsize
            narrow = torch.frombuffer(payload, dtype=self._wire_torch)
            self._wide[first : first + narrow.numel()].copy_(narrow)
        if self.expect.verify:
            self.range_crc = checksum_extend(self.header.checksum_kind, self.range_crc, payload)
        self.wire_bytes += len(message)
        self._cursor += size
        self.received_bytes += size
        self.received_chunks += 1

    def _decode(self, coded: Coded, out: memoryview) -> None:
        assert self.header is not None  # feed() checked it
        try:
            decode_into(coded, out)
        except CodecError as exc:
            raise self._fail(f"{self.header.wire_codec} chunk: {exc}") from None

    def _check_header(self, h: VersionHeader) -> None:
        e = self.expect
        problems = []
        if h.sender_rank != e.sender_rank:
            problems.append(f"sender rank {h.sender_rank}")
        if h.name != e.name:
            problems.append(f"name {h.name!r}")
        if not e.min_step <= h.step <= e.step:
            problems.append(f"step {h.step} outside [{e.min_step}, {e.step}]")
        if h.dtype != e.dtype:
            problems.append(f"dtype {h.dtype!r} (expected {e.dtype!r})")
        if h.payload_dtype != e.payload_dtype:
            problems.append(
                f"wire dtype {h.payload_dtype!r} (expected {e.payload_dtype!r}: "
                "set the same exchange.wire_dtype on every peer)"
            )
        if h.wire_codec != e.wire_codec:
            problems.append(
                f"wire codec {h.wire_codec or 'none'!r} (expected {e.wire_codec or 'none'!r}: "
                "the sender predates exchange.wire_codec; upgrade it or set wire_codec: none)"
            )
        if h.shape != e.shape:
            problems.append(f"shape {list(h.shape)} (expected {list(e.shape)})")
        if h.total_bytes != self.payload_bytes:
            problems.append(f"total_bytes {h.total_bytes} (expected {self.payload_bytes})")
        if (h.range_offset, h.range_length) != (e.range_offset, e.range_length):
            problems.append(f"range {h.range_offset}+{h.range_length}")
        if not 0 < h.chunk_bytes <= e.max_chunk_bytes:
            problems.append(f"chunk size {h.chunk_bytes} (at most {e.max_chunk_bytes})")
        elif h.chunk_count != chunk_count(e.range_length, h.chunk_bytes):
            problems.append(f"chunk count {h.chunk_count}")
        if problems:
            raise self._fail("header has " + ", ".join(problems))

    def finish(self) -> VersionHeader:
        """Check the stream ended complete; returns its header."""
        if self.header is None:
            raise self._fail("stream ended without a header")
        if (
            self.received_bytes != self.expect.range_length
            or self.received_chunks != self.header.chunk_count
        ):
            raise self._fail(
                f"truncated stream: {self.received_bytes}/{self.expect.range_length} bytes in "
                f"{self.received_chunks}/{self.header.chunk_count} chunks"
            )
        return self.header


def verify_checksum(assemblers: list[RangeAssembler], expect_name: str) -> None:
    """Fold the range CRCs in offset order and compare with the header's whole-payload CRC.

    A no-op when the assemblers were told not to verify (``Expectation.verify``).
    """
    if not all(a.expect.verify for a in assemblers):
        return
    ordered = sorted(assemblers, key=lambda a: a.expect.range_offset)
    header = ordered[0].header
    assert header is not None  # finish() ran on every assembler
    kinds = {a.header.checksum_kind for a in ordered if a.header is not None}
    if len(kinds) != 1:
        raise ordered[0]._fail(f"ranges of {expect_name!r} use different checksums {kinds}")
    total = ordered[0].range_crc & 0xFFFFFFFF
    for assembler in ordered[1:]:
        total = checksum_combine(
            header.checksum_kind, total, assembler.range_crc & 0xFFFFFFFF, assembler.received_bytes
        )
    if total != header.checksum:
        raise ordered[0]._fail(
            f"checksum mismatch for {expect_name!r}: got {total:#010x}, "
            f"header says {header.checksum:#010x}"
        )


@dataclass(frozen=True)
class PeerInfo:
    """Domain form of ``InfoResponse``."""

    rank: int
    current_step: int
    manifest_digest: str
    software_version: str
    world_size: int
    retained: Mapping[str, list[int]]
    state_available: bool


def info_to_pb(info: PeerInfo) -> pb.InfoResponse:
    """Protobuf form of :class:`PeerInfo`."""
    return pb.InfoResponse(
        rank=info.rank,
        current_step=info.current_step,
        manifest_digest=info.manifest_digest,
        software_version=info.software_version,
        world_size=info.world_size,
        retained=[pb.RetainedSteps(name=n, steps=s) for n, s in sorted(info.retained.items())],
        state_available=info.state_available,
    )


def info_from_pb(response: pb.InfoResponse) -> PeerInfo:
    """Domain form of an ``InfoResponse``."""
    return PeerInfo(
        rank=response.rank,
        current_step=response.current_step,
        manifest_digest=response.manifest_digest,
        software_version=response.software_version,
        world_size=response.world_size,
        retained={r.name: list(r.steps) for r in response.retained},
        state_available=response.state_available,
    )


@dataclass(frozen=True)
class StateEntry:
    """One named tensor inside a tensors-kind state payload."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    length: int


@dataclass(frozen=True)
class StateHeader:
    """Domain form of ``StateHeader``: how to read the GetState payload that follows."""

    sender_rank: int
    step: int
    is_blob: bool
    entries: tuple[StateEntry, ...]
    total_bytes: int
    checksum: int
    chunk_count: int
    chunk_bytes: int
    checksum_kind: str = CRC32


def state_header_to_pb(header: StateHeader) -> pb.GetStateResponse:
    """The first message of a GetState stream."""
    return pb.GetStateResponse(
        header=pb.StateHeader(
            sender_rank=header.sender_rank,
            step=header.step,
            kind=STATE_BLOB if header.is_blob else STATE_TENSORS,
            entries=[
                pb.StateEntry(
                    name=e.name, dtype=e.dtype, shape=e.shape, offset=e.offset, length=e.length
                )
                for e in header.entries
            ],
            total_bytes=header.total_bytes,
            checksum_kind=CHECKSUM_KINDS[header.checksum_kind],
            checksum=header.checksum,
            chunk_count=header.chunk_count,
            chunk_bytes=header.chunk_bytes,
        )
    )


def decode_state_response(data: bytes) -> StateHeader | memoryview | Malformed:
    """Response deserializer of GetState (same chunk fast path as Fetch); never raises."""
    h = _decode_header_or_chunk(data, pb.GetStateResponse, "GetState")
    if isinstance(h, (memoryview, Malformed)):
        return h
    if h.checksum_kind not in CHECKSUM_NAMES or h.kind not in (STATE_BLOB, STATE_TENSORS):
        return Malformed(f"unsupported checksum kind {h.checksum_kind} or state kind {h.kind}")
    return StateHeader(
        sender_rank=h.sender_rank,
        step=h.step,
        is_blob=h.kind == STATE_BLOB,
        entries=tuple(
            StateEntry(e.name, e.dtype, tuple(e.shape), e.offset, e.length) for e in h.entries
        ),
        total_bytes=h.total_bytes,
        checksum=h.checksum,
        chunk_count=h.chunk_count,
        chunk_bytes=h.chunk_bytes,
        checksum_kind=CHECKSUM_NAMES[h.checksum_kind],
    )
