"""The per-transfer exchange trace (peer/transport/grpc/trace.py): both ends of real gRPC
transfers are recorded, and the summary joins them and finds transfers that shared an uplink."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from peer.transport.grpc.communicator import ExchangeConfig
from peer.transport.grpc.trace import ExchangeTrace, load_trace, trace_path, transfer_summary
from tests.conftest import GrpcPeers


def test_real_transfers_are_traced_at_both_ends(grpc_peers: GrpcPeers, tmp_path: Path) -> None:
    config = ExchangeConfig(fetch_deadline_seconds=10.0, trace_dir=str(tmp_path))
    a, b = grpc_peers(2, config=config)
    x = torch.randn(1000)
    for step in range(4):
        b.publish("v", x + step, step)
        _, received = a.fetch(1, "v", step, like=torch.empty(1000), timeout=10)
        assert torch.equal(received, x + step)
    a.close()
    b.close()
    records = load_trace([trace_path(tmp_path, 0), trace_path(tmp_path, 1)])
    fetches = [r for r in records if r["event"] == "fetch"]
    serves = [r for r in records if r["event"] == "serve"]
    assert [(r["rank"], r["neighbor"], r["step"], r["bytes"]) for r in fetches] == [
        (0, 1, step, 4000) for step in range(4)
    ]
    assert [(r["rank"], r["caller"], r["step"], r["bytes"]) for r in serves] == [
        (1, 0, step, 4000) for step in range(4)
    ]
    for fetch, serve in zip(fetches, serves, strict=True):
        assert fetch["start"] <= serve["start"] <= serve["end"] <= fetch["end"]
    summary = transfer_summary(records, skip_steps=0)
    assert summary["transfers"] == 4 and summary["shared"] == 0 and summary["unmatched"] == 0
    assert 0 <= summary["alone_median_seconds"] < 10


def _fetch(rank: int, neighbor: int, step: int, start: float, end: float) -> dict[str, object]:
    return {"event": "fetch", "rank": rank, "neighbor": neighbor, "name": "v", "step": step,
            "start": start, "end": end, "bytes": 8, "retries": 0}  # fmt: skip


def _serve(rank: int, caller: int, step: int, start: float) -> dict[str, object]:
    return {"event": "serve", "rank": rank, "caller": caller, "name": "v", "step": step,
            "start": start, "end": start + 0.001, "bytes": 8}  # fmt: skip


def test_summary_splits_transfers_that_shared_the_senders_uplink() -> None:
    records = [
        # peer 1 sends step 2 to peer 0 over [1.0, 2.0] and step 3 to peer 2 over [1.5, 3.0]:
        # both shared its uplink; its step 4 to peer 0 over [3.5, 4.0] is alone.
        _fetch(0, 1, 2, 0.8, 2.0), _serve(1, 0, 2, 1.0),
        _fetch(2, 1, 3, 1.5, 3.0), _serve(1, 2, 3, 1.5),
        _fetch(0, 1, 4, 3.0, 4.0), _serve(1, 0, 4, 3.5),
        # peer 3 sends to peer 0 at the same time as peer 1: another uplink, alone
        _fetch(0, 3, 2, 1.0, 1.4), _serve(3, 0, 2, 1.0),
        _fetch(0, 5, 2, 1.0, 1.4),  # peer 5 left no trace
        _fetch(0, 1, 1, 0.0, 0.5),  # start-up, skipped
    ]  # fmt: skip
    summary = transfer_summary(records)
    assert summary["transfers"] == 4 and summary["shared"] == 2 and summary["unmatched"] == 1
    assert math.isclose(summary["shared_median_seconds"], 1.25)  # (1.0 + 1.5) / 2
    assert math.isclose(summary["alone_median_seconds"], 0.45)  # 0.5 and 0.4
    assert math.isclose(summary["wait_median_seconds"], 0.1)  # 0.2, 0, 0.5, 0


def test_trace_survives_a_torn_last_line_and_close_is_final(tmp_path: Path) -> None:
    trace = ExchangeTrace(tmp_path / "t", 3)
    trace.served(1, "v", 7, 1.0, 2.0, 16)
    trace.close()
    trace.served(1, "v", 8, 1.0, 2.0, 16)  # after close: dropped, no error
    with trace.path.open("a") as f:
        f.write('{"event": "fetch", "ra')  # a peer killed mid-write
    records = load_trace([trace.path])
    assert [(r["event"], r["rank"], r["step"]) for r in records] == [("serve", 3, 7)]
