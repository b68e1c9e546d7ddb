"""gRPC-only behaviour: large vectors, retries, Info, GetState, bandwidth cap, metrics, close."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from peer.errors import ExchangeError, PeerUnavailable, WireError
from peer.transport.grpc.client import CLIENT_KEEPALIVE_TIME_MS
from peer.transport.grpc.communicator import ExchangeConfig, GrpcCommunicator
from peer.transport.grpc.server import SERVER_MIN_PING_INTERVAL_MS
from tests.conftest import GrpcPeers


def test_keepalive_settings_are_accepted_by_servers() -> None:
    assert CLIENT_KEEPALIVE_TIME_MS >= SERVER_MIN_PING_INTERVAL_MS


@pytest.mark.parametrize("numel", [1_500_000, 17_000_000])  # 6 MB and 68 MB of float32
def test_large_vectors_round_trip_bit_exact(grpc_peers: GrpcPeers, numel: int) -> None:
    a, b = grpc_peers(2)
    x = torch.randn(numel)
    b.publish("big", x, 1)
    step, received = a.fetch(1, "big", 1, like=torch.empty(numel), timeout=30)
    assert step == 1 and torch.equal(received, x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64, torch.int32])
def test_dtypes_and_shapes_round_trip(grpc_peers: GrpcPeers, dtype: torch.dtype) -> None:
    a, b = grpc_peers(2)
    x = (torch.randn(3, 5, 7) * 100).to(dtype)
    b.publish("m", x, 0)
    _, received = a.fetch(1, "m", 0, like=torch.empty(3, 5, 7, dtype=dtype), timeout=5)
    assert received.shape == x.shape and torch.equal(received, x)


def test_expectation_mismatch_is_wire_error_and_peer_keeps_serving(grpc_peers: GrpcPeers) -> None:
    a, b = grpc_peers(2)
    b.publish("v", torch.ones(10), 0)
    with pytest.raises(WireError, match="dtype"):
        a.fetch(1, "v", 0, like=torch.empty(10, dtype=torch.float16), timeout=5)
    with pytest.raises(WireError, match="shape"):
        a.fetch(1, "v", 0, like=torch.empty(11), timeout=5)
    assert torch.equal(a.fetch(1, "v", 0, like=torch.empty(10), timeout=5)[1], torch.ones(10))


def test_unavailable_is_retried_until_late_server_comes_up() -> None:
    config = ExchangeConfig(fetch_deadline_seconds=10.0, retry_backoff_seconds=0.05)
    late = GrpcCommunicator.start(1, {}, world_size=2, config=config)
    address = late.address
    late.close()  # the port is free again; the peer comes back on it later
    a = GrpcCommunicator.start(0, {1: address}, world_size=2, config=config)
    try:
        handle = a.neighbor_average_async("p", torch.zeros(4), 0, 0.5, {1: 0.5})
        time.sleep(0.4)
        assert not handle.done()
        late = GrpcCommunicator.start(1, {0: a.address}, config=config, bind=address)
        late.publish("p", torch.full((4,), 2.0), 0)
        assert torch.equal(handle.wait(10), torch.full((4,), 1.0))
        retries = a.metrics.registry.get_sample_value(
            "decentlam_exchange_retries_total", {"rank": "0", "neighbor": "1"}
        )
        assert retries is not None and retries >= 1
    finally:
        a.close()
        late.close()


def test_wait_for_neighbors_names_unreachable_ones(grpc_peers: GrpcPeers) -> None:
    a, b = grpc_peers(2)
    b.set_current_step(12)
    assert a.wait_for_neighbors(5)[1].current_step == 12
    dead = GrpcCommunicator.start(2, {}, world_size=3)
    dead_address = dead.address
    dead.close()
    a.update_peers({2: dead_address})
    with pytest.raises(PeerUnavailable, match=f"2 at {dead_address}"):
        a.wait_for_neighbors(0.5)


def test_get_state(grpc_peers: GrpcPeers) -> None:
    a, b = grpc_peers(2)
    with pytest.raises(ExchangeError, match=r"FAILED_PRECONDITION.*state provider"):
        a.fetch_state(1, timeout=5)
    params = torch.randn(300_000)
    b.set_state_provider(lambda: (42, {"params": params, "momentum": params * 2}))
    state = a.fetch_state(1, timeout=10)
    assert state.step == 42 and state.tensors is not None
    assert torch.equal(state.tensors["params"], params)
    assert torch.equal(state.tensors["momentum"], params * 2)
    b.set_state_provider(lambda: (7, b"checkpoint-bytes"))
    assert a.fetch_state(1, timeout=5).blob == b"checkpoint-bytes"


def test_bandwidth_cap_holds_rate(grpc_peers: GrpcPeers) -> None:
    """10 MB more at a 20 MB/s cap take 0.5 s more (differential: fixed costs cancel out)."""
    cap = 20e6
    a, b = grpc_peers(2, config=ExchangeConfig(bandwidth_bytes_per_second=cap))
    small, large = torch.zeros(1_250_000), torch.zeros(3_750_000)  # 5 MB and 15 MB
    b.publish("small", small, 0)
    b.publish("large", large, 0)
    elapsed = {}
    for name, like in (("small", small), ("large", large)):
        started = time.perf_counter()
        a.fetch(1, name, 0, like=like, timeout=10)
        elapsed[name] = time.perf_counter() - started
    extra_bytes = (large.numel() - small.numel()) * 4
    assert elapsed["large"] - elapsed["small"] == pytest.approx(extra_bytes / cap, rel=0.10)


def test_metrics_count_per_edge(grpc_peers: GrpcPeers) -> None:
    a, b = grpc_peers(2)
    x = torch.ones(1000)
    for step in range(3):
        handles = [c.neighbor_average_async("p", x, step, 0.5, {1 - c.rank: 0.5}) for c in (a, b)]
        [h.wait(5) for h in handles]
    edge = {"rank": "0", "neighbor": "1"}
    sample = a.metrics.registry.get_sample_value
    assert sample("decentlam_exchange_received_bytes_total", edge) == 3 * 4000
    assert sample("decentlam_exchange_received_chunks_total", edge) == 3
    assert sample("decentlam_exchange_latency_seconds_count", edge) == 3
    assert sample("decentlam_exchange_wait_seconds_count", {"rank": "0"}) == 3
    served = b.metrics.registry.get_sample_value
    assert served("decentlam_exchange_sent_bytes_total", {"rank": "1", "neighbor": "0"}) == 12000
    assert served("decentlam_server_request_seconds_count", {"rank": "1", "method": "Fetch"}) == 3
    a.neighbor_average_async("p", x, 0, 0.5, {1: 0.5})  # step 0 still retained: fine
    with pytest.raises(ExchangeError):
        a.fetch(1, "missing", 0, like=x, timeout=0.2)
    errors = sample("decentlam_exchange_errors_total", {**edge, "code": "DEADLINE_EXCEEDED"})
    assert errors == 1


def test_close_is_idempotent_and_refuses_new_work() -> None:
    comm = GrpcCommunicator.start(0, {}, world_size=1)
    comm.close()
    comm.close()
    with pytest.raises(RuntimeError, match="closed"):
        comm.neighbor_average_async("p", torch.zeros(2), 0, 1.0, {})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensor_exchange(grpc_peers: GrpcPeers) -> None:
    a, b = grpc_peers(2)
    x = torch.randn(1_000_000, device="cuda")
    handles = [
        c.neighbor_average_async("p", x * (c.rank + 1), 0, 0.5, {1 - c.rank: 0.5}) for c in (a, b)
    ]
    results = [h.wait(10) for h in handles]
    assert all(r.is_cuda for r in results)
    assert torch.equal(results[0], results[1])


def test_close_shuts_grpc_aio_down_while_its_loop_runs() -> None:
    """After close() no grpc.aio server or channel is left alive: the core's poller thread is
    gone before interpreter exit (freed at exit, after the loop stopped, they can hang the
    process, grpc/grpc#40447), and the process exits normally."""
    script = """
import threading, torch
from peer.transport.grpc.communicator import GrpcCommunicator
from tests.conftest import ShiftTopology
topology = ShiftTopology(2)
a = GrpcCommunicator.start(0, {}, world_size=2, topology=topology)
b = GrpcCommunicator.start(1, {0: a.address}, world_size=2, topology=topology)
a.update_peers({1: b.address})
for step in range(3):
    handles = [c.neighbor_average_async("p", torch.ones(10), step) for c in (a, b)]
    [h.wait(10) for h in handles]
a.close()
b.close()
print(sorted(t.name for t in threading.enumerate() if t is not threading.main_thread()))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"threads left after close: {done.stdout}"


def test_rpc_table_matches_the_generated_stub() -> None:
    """Server and client read one table (from the service descriptor); it lists exactly the
    methods, paths and kinds the generated ``PeerStub`` declares."""
    from peer.transport.grpc.proto.decentlam.v1 import peer_pb2_grpc
    from peer.transport.grpc.service import RPCS, client_callables

    class Recorder:
        def __init__(self) -> None:
            self.calls: dict[str, tuple[str, object]] = {}

        def unary_stream(self, path: str, request_serializer: object, **_: object) -> str:
            self.calls[path] = ("stream", request_serializer)
            return path

        def unary_unary(self, path: str, request_serializer: object, **_: object) -> str:
            self.calls[path] = ("unary", request_serializer)
            return path

    generated, ours = Recorder(), Recorder()
    peer_pb2_grpc.PeerStub(generated)
    client_callables(ours, {name: bytes for name in RPCS})  # type: ignore[arg-type]
    assert ours.calls == generated.calls and len(ours.calls) == 3
    with pytest.raises(ValueError, match=r"missing \['Info'\]"):
        client_callables(ours, {"Fetch": bytes, "GetState": bytes})  # type: ignore[arg-type]


def test_a_capped_server_cuts_chunks_to_a_quarter_second(grpc_peers: GrpcPeers) -> None:
    """At 1 MB/s a 1 MiB chunk would leave the stream silent for a second: 250 kB chunks."""
    a, b = grpc_peers(2, config=ExchangeConfig(bandwidth_bytes_per_second=1_000_000))
    x = torch.randn(250_000)  # 1 MB
    b.publish("v", x, 0)
    step, received = a.fetch(1, "v", 0, like=x, timeout=10)
    assert step == 0 and torch.equal(received, x)
    edge = {"rank": "0", "neighbor": "1"}
    chunks = a.metrics.registry.get_sample_value("decentlam_exchange_received_chunks_total", edge)
    assert chunks == 4


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kernel thread names: Linux")
def test_the_event_loop_thread_has_a_kernel_name_and_its_cpu_is_charged_to_it() -> None:
    """``top -H`` and ``/proc`` show the communicator's loop as ``decentlam-r<rank>``, and
    ``benchmarks/_cpu.py`` charges that thread's CPU to the "event loop" group."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "_cpu.py"
    spec = importlib.util.spec_from_file_location("_cpu", path)
    assert spec is not None and spec.loader is not None
    cpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cpu)

    import os

    before = cpu.snapshot([os.getpid()])
    comm = GrpcCommunicator.start(7, {}, world_size=8)
    try:
        names = [name for name, _ in cpu.thread_seconds(os.getpid()).values()]
        assert "decentlam-r7" in names
        vector = torch.randn(1 << 20)
        for step in range(20):  # some work for the loop thread: publishing versions
            comm.publish("x", vector, step)
        spent = cpu.charged(before, cpu.snapshot([os.getpid()]), {os.getpid(): "peer"})
    finally:
        comm.close()
    assert spent["peer event loop"] > 0.0
    parts = sum(v for k, v in spent.items() if k != "peer total")
    assert parts == pytest.approx(spent["peer total"])
    assert cpu.thread_group("decentlam-r12") == "event loop"
    assert cpu.thread_group("event_engine") == "gRPC C-core"
    assert cpu.thread_group("python") == "other Python"
