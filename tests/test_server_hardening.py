"""A hostile or broken client: tiny chunks, unknown names, too many streams, bad GetState.

Every refusal is a clear, typed status and the serving peer keeps serving afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
import torch

from peer.transport.grpc.communicator import ExchangeConfig, GrpcCommunicator
from peer.transport.grpc.proto.decentlam.v1 import peer_pb2 as pb
from peer.transport.grpc.proto.decentlam.v1 import peer_pb2_grpc
from peer.transport.grpc.security import call_metadata
from peer.transport.grpc.server import MAX_STREAMS_PER_CALLER, MIN_CHUNK_BYTES
from peer.transport.grpc.service import SERVICE_NAME

TOKEN = "hardening-token"
VECTOR_BYTES = 36_000 * 4


@pytest.fixture
def served() -> Iterator[tuple[GrpcCommunicator, grpc.Channel]]:
    config = ExchangeConfig(token=TOKEN, known_names=(r"params\d+\.\w+/\d+",))
    comm = GrpcCommunicator.start(0, {}, world_size=2, config=config)
    comm.publish("params0.float32/0", torch.arange(36_000, dtype=torch.float32), 5)
    comm.set_state_provider(lambda: (5, {"params": torch.ones(3)}))
    channel = grpc.insecure_channel(comm.address)
    try:
        yield comm, channel
    finally:
        channel.close()
        comm.close()


def still_serving(channel: grpc.Channel) -> None:
    info = peer_pb2_grpc.PeerStub(channel).Info(
        pb.InfoRequest(caller_rank=1), metadata=call_metadata(TOKEN, 1), timeout=5
    )
    assert info.rank == 0


def test_one_byte_chunks_are_clamped(served: tuple[GrpcCommunicator, grpc.Channel]) -> None:
    _, channel = served
    request = pb.FetchRequest(
        caller_rank=1, name="params0.float32/0", step=5, min_step=5, max_chunk_bytes=1
    )
    messages = list(
        peer_pb2_grpc.PeerStub(channel).Fetch(request, metadata=call_metadata(TOKEN, 1), timeout=5)
    )
    header = messages[0].header
    assert header.chunk_bytes == MIN_CHUNK_BYTES
    assert len(messages) - 1 == header.chunk_count == -(-VECTOR_BYTES // MIN_CHUNK_BYTES)
    assert sum(len(m.chunk) for m in messages[1:]) == VECTOR_BYTES


def test_unknown_name_is_not_found_at_once(served: tuple[GrpcCommunicator, grpc.Channel]) -> None:
    _, channel = served
    request = pb.FetchRequest(caller_rank=1, name="no-such-vector", step=5, min_step=5)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        list(
            peer_pb2_grpc.PeerStub(channel).Fetch(
                request, metadata=call_metadata(TOKEN, 1), timeout=10
            )
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "never publishes 'no-such-vector'" in caught.value.details()
    assert time.monotonic() - started < 2.0
    still_serving(channel)


def test_streams_per_caller_are_bounded(served: tuple[GrpcCommunicator, grpc.Channel]) -> None:
    comm, channel = served
    stub = peer_pb2_grpc.PeerStub(channel)
    # Streams waiting for a step not published yet hold their slot.
    waiting = pb.FetchRequest(caller_rank=1, name="params0.float32/0", step=9, min_step=9)
    calls = [
        stub.Fetch(waiting, metadata=call_metadata(TOKEN, 1), timeout=20)
        for _ in range(MAX_STREAMS_PER_CALLER)
    ]
    try:
        deadline = time.monotonic() + 10
        while sum(comm._node.served.streams.values()) < MAX_STREAMS_PER_CALLER:
            assert time.monotonic() < deadline, "streams never arrived"
            time.sleep(0.05)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Fetch(waiting, metadata=call_metadata(TOKEN, 1), timeout=5))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        still_serving(channel)
    finally:
        for call in calls:
            call.cancel()
    deadline = time.monotonic() + 10
    while comm._node.served.streams:
        assert time.monotonic() < deadline, "stream slots were not released"
        time.sleep(0.05)


def get_state(channel: grpc.Channel, request: object, metadata: tuple) -> grpc.RpcError:
    call = channel.unary_stream(f"/{SERVICE_NAME}/GetState")
    data = request if isinstance(request, bytes) else request.SerializeToString()  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as caught:
        list(call(data, metadata=metadata, timeout=5))
    return caught.value


def test_malformed_or_unauthenticated_get_state(
    served: tuple[GrpcCommunicator, grpc.Channel],
) -> None:
    comm, channel = served
    good = pb.GetStateRequest(caller_rank=1)
    error = get_state(channel, good, call_metadata(None, 1))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    error = get_state(channel, good, call_metadata("wrong", 1))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    error = get_state(channel, b"\xff\xff\xff", call_metadata(TOKEN, 1))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = get_state(channel, pb.GetStateRequest(caller_rank=0), call_metadata(TOKEN, 1))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "does not match" in error.details()
    error = get_state(channel, good, call_metadata(TOKEN, 7))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED

    def broken() -> tuple[int, dict[str, torch.Tensor]]:
        raise TimeoutError("training thread did not answer")

    comm.set_state_provider(broken)
    error = get_state(channel, good, call_metadata(TOKEN, 1))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "training thread did not answer" in error.details()
    still_serving(channel)
    # and a well-formed, authenticated request still gets the state
    comm.set_state_provider(lambda: (5, {"params": torch.ones(3)}))
    other = GrpcCommunicator.start(1, {0: comm.address}, config=ExchangeConfig(token=TOKEN))
    try:
        state = other.fetch_state(0, timeout=5)
        assert state.step == 5 and state.tensors is not None
        assert torch.equal(state.tensors["params"], torch.ones(3))
    finally:
        other.close()
