"""Malformed and random input: the servicer (real server, raw stubs) and the reassembly code.

Nothing may crash the peer, hang past its deadline, or leak retained versions.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peer.errors import WireError
from peer.transport.grpc.communicator import ExchangeConfig, GrpcCommunicator
from peer.transport.grpc.proto.decentlam.v1 import peer_pb2 as pb
from peer.transport.grpc.proto.decentlam.v1 import peer_pb2_grpc
from peer.transport.grpc.security import call_metadata
from peer.transport.grpc.service import SERVICE_NAME
from peer.transport.grpc.wire import (
    Expectation,
    RangeAssembler,
    VersionHeader,
    decode_fetch_response,
)

RETAINED = 2
FUZZ = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[GrpcCommunicator, grpc.Channel]]:
    config = ExchangeConfig(retained_versions=RETAINED, chunk_bytes=4096)
    comm = GrpcCommunicator.start(0, {}, world_size=3, config=config)
    for step in range(4):
        comm.publish("p", torch.arange(3000.0) + step, step)
    channel = grpc.insecure_channel(comm.address)
    try:
        yield comm, channel
    finally:
        channel.close()
        comm.close()


names = st.sampled_from(["p", "q", "", "global/p", "p" * 300])
steps = st.integers(-(2**40), 2**40) | st.integers(-2, 6)


@FUZZ
@given(
    caller=st.integers(-3, 5),
    name=names,
    step=steps,
    min_step=steps,
    chunk=st.integers(0, 2**32 - 1),
    offset=st.integers(0, 2**64 - 1) | st.integers(0, 13000),
    length=st.integers(0, 2**64 - 1) | st.integers(0, 13000),
    metadata_rank=st.integers(-3, 5),
)
def test_random_fetch_requests(
    served: tuple[GrpcCommunicator, grpc.Channel],
    caller: int,
    name: str,
    step: int,
    min_step: int,
    chunk: int,
    offset: int,
    length: int,
    metadata_rank: int,
) -> None:
    comm, channel = served
    stub = peer_pb2_grpc.PeerStub(channel)
    request = pb.FetchRequest(
        caller_rank=caller,
        name=name,
        step=step,
        min_step=min_step,
        max_chunk_bytes=chunk,
        range_offset=offset,
        range_length=length,
    )
    try:
        messages = list(
            stub.Fetch(request, metadata=call_metadata(None, metadata_rank), timeout=0.2)
        )
    except grpc.RpcError as exc:
        assert exc.code() != grpc.StatusCode.UNKNOWN, exc.details()  # every refusal is typed
    else:
        head = messages[0].header
        assert head.sender_rank == 0 and min_step <= head.step <= step
        assert sum(len(m.chunk) for m in messages[1:]) == head.range_length
    assert comm.retained_steps("p") == [2, 3]


@FUZZ
@given(data=st.binary(max_size=64), method=st.sampled_from(["Fetch", "Info", "GetState"]))
def test_random_request_bytes(
    served: tuple[GrpcCommunicator, grpc.Channel], data: bytes, method: str
) -> None:
    comm, channel = served
    call = channel.unary_stream(f"/{SERVICE_NAME}/{method}")  # raw bytes in, raw bytes out
    try:
        list(call(data, metadata=call_metadata(None, 1), timeout=0.2))
    except grpc.RpcError as exc:
        assert exc.code() != grpc.StatusCode.UNKNOWN, exc.details()  # every refusal is typed
    info = peer_pb2_grpc.PeerStub(channel).Info(
        pb.InfoRequest(caller_rank=1), metadata=call_metadata(None, 1), timeout=5
    )
    assert info.rank == 0 and comm.retained_steps("p") == [2, 3]


TOTAL = 64
headers = st.builds(
    VersionHeader,
    sender_rank=st.integers(0, 2),
    step=st.integers(0, 6),
    name=st.sampled_from(["v", "w"]),
    dtype=st.sampled_from(["float32", "int8"]),
    shape=st.sampled_from([(16,), (64,), (4, 4)]),
    total_bytes=st.sampled_from([TOTAL, 63]),
    checksum=st.integers(0, 2**32 - 1),
    range_offset=st.sampled_from([0, 32]),
    range_length=st.sampled_from([0, 32, TOTAL]),
    chunk_count=st.integers(0, 5),
    chunk_bytes=st.sampled_from([0, 16, 32, 1000]),
)
wire_messages = st.lists(
    headers.map(lambda h: ("header", h)) | st.binary(max_size=40).map(lambda b: ("raw", b)),
    max_size=8,
)


@FUZZ
@given(messages=wire_messages)
def test_random_streams_into_the_assembler(messages: list[tuple[str, object]]) -> None:
    expect = Expectation(1, "v", 2, 4, "float32", (16,), 0, TOTAL, 32)
    assembler = RangeAssembler(expect, memoryview(bytearray(TOTAL)))
    try:
        for kind, value in messages:
            if kind == "raw":
                assembler.feed(decode_fetch_response(value))  # type: ignore[arg-type]
            else:
                assembler.feed(value)  # type: ignore[arg-type]
        assembler.finish()
    except WireError as exc:
        assert exc.neighbor == 1 and exc.step == 4
    else:
        assert assembler.received_bytes == TOTAL
    assert len(assembler.dest) == TOTAL  # never written past its end
