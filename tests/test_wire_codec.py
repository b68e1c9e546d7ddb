"""The lossless ``top-byte-huffman`` wire codec: bit-exact round trips, in unit and through gRPC
peers, and clear errors (never a crash) for every kind of corrupt coded chunk.

Reference: a coded chunk decodes to exactly the bytes that were encoded, so a receiver holds the
sender's vector bit for bit (NaN payloads, signed zeros and subnormals included).
"""

from __future__ import annotations

import typing
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peer.errors import WireError
from peer.transport.base import weighted_sum
from peer.transport.grpc import codec
from peer.transport.grpc.communicator import ExchangeConfig, GrpcCommunicator
from peer.transport.grpc.framing import DEFAULT_CHECKSUM, checksum, varint
from peer.transport.grpc.server import CODED_CHUNK_BYTES
from peer.transport.grpc.store import VersionStore, snapshot
from peer.transport.grpc.wire import (
    Expectation,
    RangeAssembler,
    VersionHeader,
    decode_fetch_response,
    verify_checksum,
)
from tests.conftest import GrpcPeers
from topology.manifest_specs import WireCodec

CODEC = codec.TOP_BYTE_HUFFMAN
FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _round_trip(payload: bytes, itemsize: int) -> tuple[bytes, bytes]:
    coded = bytes(codec.encode(payload, itemsize))
    parsed = codec.parse(coded, itemsize)
    out = bytearray(parsed.size)
    codec.decode_into(parsed, memoryview(out))
    return coded, bytes(out)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_round_trip_is_bit_exact_including_special_values(dtype: torch.dtype) -> None:
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -1e-45])
    x = torch.cat([torch.randn(50_000) * 0.05, special.to(torch.float64).float()]).to(dtype)
    nan_payload = torch.tensor([0x7FC00001, -0x7FFFFF], dtype=torch.int32).view(torch.float32)
    payload = _bytes(x) + (_bytes(nan_payload) if dtype == torch.float32 else b"")
    coded, decoded = _round_trip(payload, x.element_size())
    assert decoded == payload
    assert coded[0] == codec.DEFLATED
    # Trained-network-like values: the sign/exponent byte is few-valued and codes well.
    expected = {torch.float32: 0.86, torch.bfloat16: 0.70, torch.float16: 0.87, torch.float64: 0.91}
    assert len(coded) < expected[dtype] * len(payload)


def test_incompressible_top_planes_are_stored_and_tiny_chunks_work() -> None:
    noise = torch.randint(
        0, 256, (40_000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    coded, decoded = _round_trip(_bytes(noise), 4)
    assert decoded == _bytes(noise) and coded[0] == codec.STORED
    assert len(coded) <= len(noise) + 4  # flag and varint: never more than a few bytes larger
    for payload in (b"", b"\x01\x02\x03\x04", b"\xff" * 8):
        assert _round_trip(payload, 4)[1] == payload
    with pytest.raises(ValueError, match="whole elements"):
        codec.encode(b"\x00" * 6, 4)


def _coded(x: torch.Tensor) -> bytes:
    return bytes(codec.encode(_bytes(x), x.element_size()))


@pytest.mark.parametrize(
    ("mangle", "match"),
    [
        (lambda c: b"\x07" + c[1:], "unknown flag"),
        (lambda c: b"\x01", "no header"),
        (lambda c: b"\x01\xff\xff", "truncated plane length"),
        (lambda c: c[:40], "truncated: top plane"),
        (lambda c: c + b"\x00", "splits a 4-byte element"),
        (lambda c: c[:-3], "inflates to"),  # one element fewer than the plane says
        (lambda c: c + b"\x00\x00\x00", "inflates to"),  # one element more
        (lambda c: c[:4] + bytes(b ^ 0x5A for b in c[4:30]) + c[30:], "corrupt|inflates to"),
        (lambda c: b"\x00" + c[1:], "stored top plane"),
    ],
)
def test_corrupt_coded_chunks_raise_codec_errors(
    mangle: typing.Callable[[bytes], bytes], match: str
) -> None:
    coded = _coded(torch.randn(1000) * 0.1)
    bad = mangle(coded)
    with pytest.raises(codec.CodecError, match=match):
        parsed = codec.parse(bad, 4)
        codec.decode_into(parsed, memoryview(bytearray(parsed.size)))


def test_a_plane_that_would_inflate_past_its_elements_stops_at_them() -> None:
    # A deflate "bomb" claiming a few elements: inflation is capped at one byte per element.
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = packer.compress(b"\x00" * 10_000_000) + packer.flush()
    coded = b"\x01" + varint(len(bomb)) + bomb + b"\x00" * 3 * 4
    parsed = codec.parse(coded, 4)
    with pytest.raises(codec.CodecError, match=r"inflates to 4\+ bytes"):
        codec.decode_into(parsed, memoryview(bytearray(parsed.size)))


def test_codec_applies_to_floating_payloads_and_names_unknown_ones() -> None:
    assert codec.codec_for("float32", CODEC) == CODEC
    assert codec.codec_for("bfloat16", CODEC) == CODEC
    assert codec.codec_for("int64", CODEC) == ""
    assert codec.codec_for("float32", "none") == "" and codec.codec_for("float32", "") == ""
    with pytest.raises(codec.CodecError, match="unsupported wire codec 'zstd'"):
        codec.codec_for("float32", "zstd")
    assert set(typing.get_args(WireCodec)) == set(codec.WIRE_CODECS)
    with pytest.raises(ValueError, match="wire_codec"):
        ExchangeConfig(wire_codec="zstd")


async def test_coded_chunks_are_coded_once_per_version_and_shared() -> None:
    store = VersionStore(retained_versions=2)
    x = torch.randn(1000) * 0.1
    _, version = snapshot(x, "p", 0)
    store.insert(version)
    encoding = await version.encoding()
    first = [m async for m in encoding.coded_chunks(CODEC, 0, encoding.total_bytes, 512)]
    again = [m async for m in encoding.coded_chunks(CODEC, 0, encoding.total_bytes, 512)]
    assert len(first) == 8 and all(m is n for m, n in zip(first, again, strict=True))

    def decoded(messages: list[bytes]) -> bytes:
        out = b""
        for message in messages:
            parsed = codec.parse(decode_fetch_response(message), 4)  # type: ignore[arg-type]
            piece = bytearray(parsed.size)
            codec.decode_into(parsed, memoryview(piece))
            out += piece
        return out

    assert decoded(first) == _bytes(x)
    off_grid = [m async for m in encoding.coded_chunks(CODEC, 100, 1000, 512)]
    assert decoded(off_grid) == _bytes(x)[100:1100]
    _, newer = snapshot(x + 1, "p", 1)
    store.insert(newer)  # the older version drops its coded chunks too
    rebuilt = [m async for m in encoding.coded_chunks(CODEC, 0, encoding.total_bytes, 512)]
    assert rebuilt == first and all(m is not n for m, n in zip(first, rebuilt, strict=True))


@pytest.mark.parametrize("blocking", [False, True], ids=["aio", "blocking"])
def test_grpc_round_trip_is_exact_and_counts_the_coded_bytes(
    grpc_peers: GrpcPeers, blocking: bool
) -> None:
    # 2.5M float32 = 10 MB: two parallel ranges of an odd chunk size aligned to whole elements.
    config = ExchangeConfig(
        wire_codec=CODEC, parallel_streams=2, chunk_bytes=1_000_001, blocking_receive=blocking,
        fetch_deadline_seconds=30,
    )  # fmt: skip
    a, b = grpc_peers(2, config=config)
    x = torch.randn(2_500_000) * 0.05
    x[::1000] = float("nan")
    b.publish("p", x, 3)
    step, received = a.fetch(1, "p", 3, like=torch.empty(2_500_000), timeout=30)
    assert step == 3 and _bytes(received) == _bytes(x)
    got = a.metrics.registry.get_sample_value(
        "decentlam_exchange_received_bytes_total", {"rank": "0", "neighbor": "1"}
    )
    sent = b.metrics.registry.get_sample_value(
        "decentlam_exchange_sent_bytes_total", {"rank": "1", "neighbor": "0"}
    )
    assert got == sent and got is not None and got < 0.86 * 4 * x.numel()
    chunks = a.metrics.registry.get_sample_value(
        "decentlam_exchange_received_chunks_total", {"rank": "0", "neighbor": "1"}
    )  # coded streams cut their chunks to CODED_CHUNK_BYTES whatever the reader allows
    assert chunks == 2 * -(-5_000_000 // CODED_CHUNK_BYTES)
    # Non-floating vectors travel raw under the same setting.
    b.publish("i", torch.arange(9), 0)
    assert torch.equal(a.fetch(1, "i", 0, like=torch.arange(9), timeout=5)[1], torch.arange(9))


def test_codec_on_a_bfloat16_wire_and_in_the_mixing(grpc_peers: GrpcPeers) -> None:
    config = ExchangeConfig(wire_codec=CODEC, wire_dtype="bfloat16", fetch_deadline_seconds=10)
    a, b = grpc_peers(2, config=config)
    xa, xb = torch.randn(5000), torch.randn(5000)
    b.publish("q", xb, 0)
    assert torch.equal(a.fetch(1, "q", 0, like=xa, timeout=5)[1], xb.bfloat16().float())
    exact = ExchangeConfig(wire_codec=CODEC, fetch_deadline_seconds=10)
    c, d = grpc_peers(2, config=exact)
    hc = c.neighbor_average_async("p", xa, 0, 0.25, {1: 0.75})
    hd = d.neighbor_average_async("p", xb, 0, 0.5, {0: 0.5})
    assert torch.equal(hc.wait(), weighted_sum(xa, 0.25, {1: xb}, {1: 0.75}, 0))
    assert torch.equal(hd.wait(), weighted_sum(xb, 0.5, {0: xa}, {0: 0.5}, 1))


def test_peers_with_different_codec_settings_interoperate() -> None:
    # The reader chooses: a server codes when asked, whatever its own setting.
    plain = GrpcCommunicator.start(0, {}, world_size=2, config=ExchangeConfig())
    coding = GrpcCommunicator.start(
        1, {0: plain.address}, world_size=2, config=ExchangeConfig(wire_codec=CODEC)
    )
    try:
        plain.update_peers({0: plain.address, 1: coding.address})
        x, y = torch.randn(4096) * 0.1, torch.randn(4096) * 0.1
        plain.publish("p", x, 0)
        coding.publish("p", y, 0)
        assert _bytes(coding.fetch(0, "p", 0, like=x, timeout=5)[1]) == _bytes(x)
        assert _bytes(plain.fetch(1, "p", 0, like=y, timeout=5)[1]) == _bytes(y)

        def received(comm: GrpcCommunicator, src: int) -> float:
            value = comm.metrics.registry.get_sample_value(
                "decentlam_exchange_received_bytes_total",
                {"rank": str(comm.rank), "neighbor": str(src)},
            )
            assert value is not None
            return value

        assert received(plain, 1) == 4 * 4096 and received(coding, 0) < 0.9 * 4 * 4096
    finally:
        coding.close()
        plain.close()


def _assembler() -> tuple[RangeAssembler, torch.Tensor]:
    dest = torch.zeros(256)
    expect = Expectation(1, "p", 0, 0, "float32", (256,), 0, 1024, 1024, wire_codec=CODEC)
    return RangeAssembler(expect, memoryview(dest.numpy()).cast("B")), dest


def _header(**overrides: object) -> VersionHeader:
    fields: dict[str, object] = {
        "sender_rank": 1, "step": 0, "name": "p", "dtype": "float32", "shape": (256,),
        "total_bytes": 1024, "checksum": 0, "range_offset": 0, "range_length": 1024,
        "chunk_count": 2, "chunk_bytes": 512, "checksum_kind": DEFAULT_CHECKSUM,
        "wire_codec": CODEC,
    }  # fmt: skip
    fields.update(overrides)
    return VersionHeader(**fields)  # type: ignore[arg-type]


def test_assembler_decodes_checks_and_names_bad_coded_chunks() -> None:
    x = torch.randn(256) * 0.1
    raw = _bytes(x)
    target, dest = _assembler()
    target.feed(_header(checksum=checksum(DEFAULT_CHECKSUM, raw)))
    for start in (0, 512):
        target.feed(memoryview(bytes(codec.encode(raw[start : start + 512], 4))))
    target.finish()
    verify_checksum([target], "p")
    assert _bytes(dest) == raw and target.received_bytes == 1024 and target.wire_bytes < 1024
    # A peer without the codec (raw header) is told apart from a corrupt stream.
    plain, _ = _assembler()
    with pytest.raises(WireError, match=r"wire codec 'none'.*predates exchange\.wire_codec"):
        plain.feed(_header(wire_codec=""))
    corrupt, _ = _assembler()
    corrupt.feed(_header())
    with pytest.raises(
        WireError, match=r"peer 1 .*top-byte-huffman chunk: coded chunk with unknown flag"
    ):
        corrupt.feed(memoryview(b"\x09\x00"))
    big, _ = _assembler()
    big.feed(_header())
    with pytest.raises(WireError, match="chunk of 1024 bytes"):  # decoded size over chunk_bytes
        big.feed(memoryview(bytes(codec.encode(raw, 4))))


@settings(max_examples=60, deadline=None)
@given(payload=st.binary(max_size=600), itemsize=st.sampled_from([2, 4, 8]))
def test_any_bytes_round_trip(payload: bytes, itemsize: int) -> None:
    payload = payload[: len(payload) - len(payload) % itemsize]
    assert _round_trip(payload, itemsize)[1] == payload


@settings(max_examples=80, deadline=None)
@given(
    chunks=st.lists(
        st.binary(max_size=64)
        | st.builds(lambda n: bytes(codec.encode(b"\x3f" * 4 * n, 4)), st.integers(0, 200)),
        max_size=6,
    )
)
def test_random_coded_streams_never_crash_the_assembler(chunks: list[bytes]) -> None:
    target, _ = _assembler()
    target.feed(_header())
    try:
        for chunk in chunks:
            target.feed(memoryview(chunk))
        target.finish()
    except WireError as exc:
        assert exc.neighbor == 1
    else:
        assert target.received_bytes == 1024
    assert len(target.dest) == 1024  # never written past its end
