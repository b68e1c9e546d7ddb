"""Compressed wire formats, shared chunk messages, optional checksums and receive buffers.

Reference equation of a rounded wire: the receiver holds exactly ``x.to(wire).to(float32)``
(round to nearest even once at the sender, exact widening at the receiver).
"""

from __future__ import annotations

import time
import typing

import grpc
import pytest
import torch

from peer.errors import ExchangeTimeout, WireError
from peer.transport.base import weighted_sum
from peer.transport.grpc.allocator import tune_malloc
from peer.transport.grpc.communicator import ExchangeConfig, GrpcCommunicator
from peer.transport.grpc.framing import DEFAULT_CHECKSUM, checksum
from peer.transport.grpc.security import TlsConfig
from peer.transport.grpc.store import UnavailableEncoding, VersionStore, snapshot
from peer.transport.grpc.wire import (
    WIRE_DTYPES,
    Expectation,
    FetchQuery,
    RangeAssembler,
    VersionHeader,
    decode_fetch_response,
    query_to_pb,
    verify_checksum,
)
from tests.conftest import GrpcPeers
from topology.manifest_specs import WireDtype

WIRES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@pytest.mark.parametrize("wire", sorted(WIRES))
def test_rounded_wire_round_trip_equals_reference(grpc_peers: GrpcPeers, wire: str) -> None:
    # 5M elements = 10 MB of 16-bit payload: two parallel ranges; an odd chunk size is aligned
    # down to whole elements by both ends.
    config = ExchangeConfig(wire_dtype=wire, parallel_streams=2, chunk_bytes=1_000_001)
    a, b = grpc_peers(2, config=config)
    x = torch.randn(5_000_000) * 1e3
    b.publish("p", x, 3)
    step, received = a.fetch(1, "p", 3, like=torch.empty(5_000_000), timeout=30)
    assert step == 3 and received.dtype == torch.float32
    assert torch.equal(received, x.to(WIRES[wire]).to(torch.float32))
    edge = {"rank": "0", "neighbor": "1"}
    assert a.metrics.registry.get_sample_value("decentlam_exchange_received_bytes_total", edge) == (
        2 * x.numel()
    )
    assert b.metrics.registry.get_sample_value(
        "decentlam_exchange_sent_bytes_total", {"rank": "1", "neighbor": "0"}
    ) == (2 * x.numel())


def test_blocking_receive_over_several_channels(grpc_peers: GrpcPeers) -> None:
    config = ExchangeConfig(
        wire_dtype="bfloat16", parallel_streams=3, channels_per_neighbor=2, blocking_receive=True
    )
    a, b = grpc_peers(2, config=config)
    x = torch.randn(7_000_000)  # 14 MB of bfloat16: three ranges over two connections
    b.publish("p", x, 0)
    assert torch.equal(a.fetch(1, "p", 0, like=x, timeout=30)[1], x.bfloat16().float())
    b.publish("i", torch.arange(5), 0)
    assert torch.equal(a.fetch(1, "i", 0, like=torch.arange(5), timeout=5)[1], torch.arange(5))
    started = time.perf_counter()
    with pytest.raises(ExchangeTimeout):  # the synchronous call's deadline maps like the aio one
        a.fetch(1, "missing", 0, like=x, timeout=0.3)
    assert time.perf_counter() - started < 5


def test_mixing_with_bfloat16_wire_is_the_weighted_sum_of_rounded_neighbours(
    grpc_peers: GrpcPeers,
) -> None:
    a, b = grpc_peers(2, config=ExchangeConfig(wire_dtype="bfloat16", fetch_deadline_seconds=10))
    xa, xb = torch.randn(1000), torch.randn(1000)
    ha = a.neighbor_average_async("p", xa, 0, 0.25, {1: 0.75})
    hb = b.neighbor_average_async("p", xb, 0, 0.5, {0: 0.5})
    got_a, got_b = ha.wait(10), hb.wait(10)
    round_trip = {0: xa.bfloat16().float(), 1: xb.bfloat16().float()}
    # Own term at full precision, neighbour's rounded: exactly what weighted_sum gives.
    assert torch.equal(got_a, weighted_sum(xa, 0.25, {1: round_trip[1]}, {1: 0.75}, 0))
    assert torch.equal(got_b, weighted_sum(xb, 0.5, {0: round_trip[0]}, {0: 0.5}, 1))


def test_float32_reader_of_a_bfloat16_peer_global_and_non_float_vectors(
    grpc_peers: GrpcPeers,
) -> None:
    # A reader with the version-1 default (float32) still gets the exact vector from a peer that
    # publishes rounded copies; global averages and integer vectors always travel exactly.
    c, b = grpc_peers(2, config=ExchangeConfig(wire_dtype="bfloat16", fetch_deadline_seconds=10))
    a = GrpcCommunicator.start(0, {1: b.address}, world_size=2)
    try:
        x = torch.randn(300)
        b.publish("p", x, 0)
        b.publish("global/g", x, 0)
        b.publish("i", torch.arange(7, dtype=torch.int32), 0)
        assert torch.equal(a.fetch(1, "p", 0, like=torch.empty(300), timeout=5)[1], x)
        rounded = c.fetch(1, "p", 0, like=torch.empty(300), timeout=5)[1]
        assert torch.equal(rounded, x.bfloat16().float()) and not torch.equal(rounded, x)
        assert torch.equal(c.fetch(1, "global/g", 0, like=torch.empty(300), timeout=5)[1], x)
        ints = c.fetch(1, "i", 0, like=torch.empty(7, dtype=torch.int32), timeout=5)[1]
        assert torch.equal(ints, torch.arange(7, dtype=torch.int32))
    finally:
        a.close()


def test_receive_into_a_caller_buffer(grpc_peers: GrpcPeers) -> None:
    a, b = grpc_peers(2)
    x = torch.randn(4096)
    b.publish("p", x, 0)
    out = torch.empty(4096)
    _, got = a.fetch(1, "p", 0, like=out, out=out, timeout=5)
    assert got is out and torch.equal(out, x)
    with pytest.raises(ValueError, match="out is"):
        a.fetch(1, "p", 0, like=out, out=torch.empty(4095), timeout=5)


async def test_chunk_messages_are_built_once_and_shared() -> None:
    store = VersionStore(retained_versions=2)
    x = torch.randn(1000)
    _, old = snapshot(x, "p", 0)
    store.insert(old)
    encoding = await old.encoding()
    first = list(encoding.encoded_chunks(0, encoding.total_bytes, 512))
    again = list(encoding.encoded_chunks(0, encoding.total_bytes, 512))
    assert all(m is n for m, n in zip(first, again, strict=True)) and len(first) == 8
    decoded = b"".join(bytes(decode_fetch_response(m)) for m in first)  # type: ignore[arg-type]
    assert decoded == x.numpy().tobytes()
    # A range off the chunk grid is encoded per request, with the right bytes.
    off_grid = list(encoding.encoded_chunks(100, 1000, 512))
    assert b"".join(bytes(decode_fetch_response(m)) for m in off_grid) == decoded[100:1100]  # type: ignore[arg-type]
    _, new = snapshot(x + 1, "p", 1)
    store.insert(new)  # the older version drops its chunk copy
    rebuilt = list(encoding.encoded_chunks(0, encoding.total_bytes, 512))
    assert rebuilt == first and all(m is not n for m, n in zip(first, rebuilt, strict=True))


async def test_encodings_are_rounded_once_with_their_own_checksum() -> None:
    _, version = snapshot(torch.randn(64), "p", 0, wire_dtype="float16")
    assert version.wire_dtype == "float16"
    half = await version.encoding("float16")
    assert version.encoding("float16").result() is half
    assert torch.equal(half.tensor, version.host.half())
    assert await half.checksum() == checksum(DEFAULT_CHECKSUM, half.tensor.numpy().tobytes())
    with pytest.raises(UnavailableEncoding, match="cannot travel as 'int8'"):
        version.encoding("int8")
    _, ints = snapshot(torch.arange(4), "i", 0, wire_dtype="bfloat16")
    assert ints.wire_dtype == "int64"
    with pytest.raises(UnavailableEncoding):
        ints.encoding("bfloat16")


def test_unavailable_encoding_is_refused_over_grpc(grpc_peers: GrpcPeers) -> None:
    a, b = grpc_peers(2)
    b.publish("i", torch.arange(8, dtype=torch.int32), 0)
    client = a._node.clients[1]
    request = query_to_pb(FetchQuery(0, "i", 0, 0, wire_dtype="float16"))

    async def ask_for_float16() -> grpc.StatusCode:
        try:
            async for _ in client._fetch(request, timeout=5, metadata=client._metadata):
                pass
        except grpc.aio.AioRpcError as exc:
            assert "cannot travel as 'float16'" in str(exc.details())
            return exc.code()
        raise AssertionError("served an int32 vector as float16")

    assert a._loop_thread.run(ask_for_float16(), 10) == grpc.StatusCode.FAILED_PRECONDITION
    dest = torch.empty(8, dtype=torch.int32)
    assert torch.equal(a.fetch(1, "i", 0, like=dest, timeout=5)[1], torch.arange(8).int())


def _header(**overrides: object) -> VersionHeader:
    fields: dict[str, object] = {
        "sender_rank": 1, "step": 0, "name": "p", "dtype": "float32", "shape": (4,),
        "total_bytes": 8, "checksum": 0, "range_offset": 0, "range_length": 8,
        "chunk_count": 1, "chunk_bytes": 8, "checksum_kind": DEFAULT_CHECKSUM,
        "wire_dtype": "bfloat16",
    }  # fmt: skip
    fields.update(overrides)
    return VersionHeader(**fields)  # type: ignore[arg-type]


def _assembler(verify: bool = True) -> tuple[RangeAssembler, torch.Tensor]:
    dest = torch.zeros(4)
    expect = Expectation(
        1, "p", 0, 0, "float32", (4,), 0, 8, 8, wire_dtype="bfloat16", verify=verify
    )
    return RangeAssembler(expect, memoryview(dest.numpy()).cast("B"), dest), dest


def test_assembler_widens_and_checks_the_wire_dtype() -> None:
    values = torch.tensor([1.5, -2.0, 3.25, 1e-3]).bfloat16()
    payload = values.view(torch.uint8).numpy().tobytes()
    target, dest = _assembler()
    target.feed(_header(checksum=checksum(DEFAULT_CHECKSUM, payload)))
    target.feed(memoryview(payload))
    target.finish()
    verify_checksum([target], "p")
    assert torch.equal(dest, values.float())
    # A version-1 server (no wire_dtype in its header) sends 16 float32 bytes: named clearly.
    old, _ = _assembler()
    with pytest.raises(WireError, match=r"wire dtype 'float32'.*same exchange\.wire_dtype"):
        old.feed(_header(wire_dtype="", total_bytes=16, range_length=16))
    odd, _ = _assembler()
    odd.feed(_header())
    with pytest.raises(WireError, match="splits a bfloat16"):
        odd.feed(memoryview(b"abc"))


def test_checksums_are_optional() -> None:
    payload = torch.ones(4).bfloat16().view(torch.uint8).numpy().tobytes()
    for verify in (True, False):
        target, _ = _assembler(verify)
        target.feed(_header(checksum=12345))  # wrong on purpose
        target.feed(memoryview(payload))
        target.finish()
        if verify:
            with pytest.raises(WireError, match="checksum mismatch"):
                verify_checksum([target], "p")
        else:
            verify_checksum([target], "p")
    tls = TlsConfig(cert_path="c", key_path="k", ca_path="a")
    assert ExchangeConfig().verifies_checksums
    assert not ExchangeConfig(tls=tls).verifies_checksums
    assert ExchangeConfig(tls=tls, verify_checksums=True).verifies_checksums
    assert not ExchangeConfig(verify_checksums=False).verifies_checksums


def test_config_and_allocator_checks() -> None:
    with pytest.raises(ValueError, match="wire_dtype"):
        ExchangeConfig(wire_dtype="int8")
    # The manifest's choices are exactly the encodings the transport can widen.
    assert set(typing.get_args(WireDtype)) == set(WIRE_DTYPES)
    assert tune_malloc() and tune_malloc()  # glibc here; idempotent
    with pytest.raises(ValueError, match="mmap threshold"):
        tune_malloc(mmap_threshold_bytes=1 << 30)
