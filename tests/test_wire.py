"""Chunk framing, checksums and stream validation, without a network."""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peer.errors import WireError
from peer.transport.grpc.framing import crc32, crc32_combine, iter_chunks, split_ranges
from peer.transport.grpc.proto.decentlam.v1 import peer_pb2 as pb
from peer.transport.grpc.wire import (
    Expectation,
    Malformed,
    RangeAssembler,
    VersionHeader,
    decode_fetch_response,
    encode_chunk,
    header_to_pb,
    verify_checksum,
)

PAYLOAD = bytes(range(256)) * 40  # 10240 bytes


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=300))
def test_crc32_combine_matches_zlib(a: bytes, b: bytes) -> None:
    assert crc32_combine(crc32(a), crc32(b), len(b)) == zlib.crc32(a + b)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 8), st.integers(1, 2048))
def test_split_ranges_cover_payload(total: int, parts: int, align: int) -> None:
    ranges = split_ranges(total, parts, align)
    assert ranges[0][0] == 0 and sum(length for _, length in ranges) == total
    for (offset, length), (next_offset, _) in itertools.pairwise(ranges):
        assert offset + length == next_offset and offset % align == 0


def test_chunk_encoding_is_valid_protobuf_and_fast_path_decodes_it() -> None:
    piece = memoryview(PAYLOAD)[100:5000]
    encoded = encode_chunk(piece)
    assert pb.FetchResponse.FromString(encoded).chunk == bytes(piece)
    decoded = decode_fetch_response(encoded)
    assert isinstance(decoded, memoryview) and bytes(decoded) == bytes(piece)
    assert isinstance(decode_fetch_response(b"\xff\xff\xff"), Malformed)
    assert isinstance(decode_fetch_response(b""), Malformed)


def header(**changes: object) -> VersionHeader:
    fields = dict(
        sender_rank=1,
        step=5,
        name="p",
        dtype="float32",
        shape=(2560,),
        total_bytes=len(PAYLOAD),
        checksum=crc32(PAYLOAD),
        range_offset=0,
        range_length=len(PAYLOAD),
        chunk_count=10,
        chunk_bytes=1024,
    )
    fields.update(changes)
    return VersionHeader(**fields)  # type: ignore[arg-type]


def assembler(offset: int = 0, length: int = len(PAYLOAD)) -> RangeAssembler:
    expect = Expectation(1, "p", 3, 5, "float32", (2560,), offset, length, 1024)
    return RangeAssembler(expect, memoryview(bytearray(len(PAYLOAD))))


def feed_all(target: RangeAssembler, head: VersionHeader, data: bytes, chunk: int = 1024) -> None:
    target.feed(decode_fetch_response(header_to_pb(head).SerializeToString()))
    for piece in iter_chunks(memoryview(data), chunk):
        target.feed(decode_fetch_response(encode_chunk(piece)))
    target.finish()


def test_two_ranges_reassemble_and_checksum() -> None:
    first, second = assembler(0, 4096), assembler(4096, 6144)
    second.dest = first.dest
    feed_all(first, header(range_length=4096, chunk_count=4), PAYLOAD[:4096])
    feed_all(second, header(range_offset=4096, range_length=6144, chunk_count=6), PAYLOAD[4096:])
    verify_checksum([second, first], "p")
    assert bytes(first.dest) == PAYLOAD


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"dtype": "float16"}, "dtype"),
        ({"shape": (2, 1280)}, "shape"),
        ({"step": 2}, "outside"),
        ({"step": 6}, "outside"),
        ({"sender_rank": 2}, "sender"),
        ({"name": "q"}, "name"),
        ({"total_bytes": 99}, "total_bytes"),
        ({"chunk_bytes": 4096}, "chunk size"),
        ({"chunk_count": 11}, "chunk count"),
    ],
)
def test_bad_header_is_rejected(change: dict[str, object], reason: str) -> None:
    with pytest.raises(WireError, match=reason):
        feed_all(assembler(), header(**change), PAYLOAD)


def test_truncated_oversized_and_corrupt_streams() -> None:
    with pytest.raises(WireError, match="truncated"):
        feed_all(assembler(), header(), PAYLOAD[:-1024])
    with pytest.raises(WireError, match="oversized"):
        feed_all(assembler(), header(), PAYLOAD + b"x" * 10)
    target = assembler()
    corrupt = bytearray(PAYLOAD)
    corrupt[77] ^= 1
    feed_all(target, header(), bytes(corrupt))
    with pytest.raises(WireError, match="checksum"):
        verify_checksum([target], "p")
    with pytest.raises(WireError, match="before the header"):
        assembler().feed(memoryview(b"abc"))
    with pytest.raises(WireError, match="without a header"):
        assembler().finish()


def test_tensor_bytes_round_trip_bit_exact() -> None:
    tensor = torch.randn(1000, dtype=torch.float64)
    data = tensor.numpy().tobytes()
    target = RangeAssembler(
        Expectation(0, "t", 0, 0, "float64", (1000,), 0, len(data), 512),
        memoryview(bytearray(len(data))),
    )
    head = VersionHeader(
        0, 0, "t", "float64", (1000,), len(data), crc32(data), 0, len(data), 16, 512
    )
    feed_all(target, head, data, chunk=512)
    verify_checksum([target], "t")
    back = torch.frombuffer(target.dest, dtype=torch.float64)
    assert torch.equal(back, tensor)


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=300))
def test_both_checksum_kinds_extend_and_combine(a: bytes, b: bytes) -> None:
    from peer.transport.grpc.framing import (
        CRC32,
        CRC32C,
        _crc32c_python,
        checksum,
        checksum_combine,
    )

    for kind in (CRC32, CRC32C):
        whole = checksum(kind, a + b)
        assert checksum_combine(kind, checksum(kind, a), checksum(kind, b), len(b)) == whole
    # the pure-Python fallback (used only without the extension) agrees with the extension
    assert _crc32c_python(0, a + b) == checksum(CRC32C, a + b)


def test_receiver_verifies_the_kind_the_header_names() -> None:
    from peer.transport.grpc.framing import CRC32, CRC32C, checksum

    data = bytes(range(256)) * 4
    for kind in (CRC32, CRC32C):
        head = VersionHeader(
            0, 0, "t", "uint8", (len(data),), len(data), checksum(kind, data), 0, len(data), 2,
            512, checksum_kind=kind,
        )  # fmt: skip
        decoded = decode_fetch_response(header_to_pb(head).SerializeToString())
        assert decoded == head
