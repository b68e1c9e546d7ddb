"""What a peer reports: the per-neighbour exchange latency summary of ``peer-<r>.json`` and
the throttled progress lines."""

from __future__ import annotations

import math
from pathlib import Path

from prometheus_client import CollectorRegistry, Histogram

from peer.process import PeerOptions, _Progress, exchange_latency_summary


def test_latency_summary_interpolates_like_prometheus() -> None:
    registry = CollectorRegistry()
    histogram = Histogram(
        "decentlam_exchange_latency_seconds", "x", ("rank", "neighbor"),
        buckets=(0.1, 0.2, 0.4), registry=registry,
    )  # fmt: skip
    for value in (0.05, 0.15, 0.15, 0.3):
        histogram.labels("0", "3").observe(value)
    histogram.labels("0", "5")  # a neighbour never fetched from: left out
    summary = exchange_latency_summary(registry)
    assert list(summary) == ["3"]
    edge = summary["3"]
    assert edge["count"] == 4 and math.isclose(edge["mean_seconds"], 0.65 / 4)
    # rank 2 of 4 falls in (0.1, 0.2] holding counts 1 -> 3: 0.1 + 0.1 * (2 - 1) / 2.
    assert math.isclose(edge["p50_seconds"], 0.15)
    # rank 3.8 falls in (0.2, 0.4] holding 3 -> 4: 0.2 + 0.2 * 0.8.
    assert math.isclose(edge["p95_seconds"], 0.36)


def test_progress_lines_are_throttled(monkeypatch) -> None:
    lines: list[str] = []
    clock = iter([0.0, 0.0, 1.0, 2.0, 5.0, 6.0, 11.0])
    monkeypatch.setattr("peer.process.time.monotonic", lambda: next(clock))
    progress = _Progress(
        PeerOptions(manifest=Path("m.yaml"), report=lines.append, progress_seconds=5.0), 2, 50
    )
    for step in range(1, 7):  # the trainer's on_step calls it after every step
        progress(step, 0.5)
    assert lines == [
        "peer 2: step 4/50, loss 0.5, 0.8 steps/s",  # 4 steps in 5 s since before step 1
        "peer 2: step 6/50, loss 0.5, 0.3 steps/s",
    ]
