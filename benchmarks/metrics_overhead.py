"""Overhead of all Prometheus instrumentation on the iteration time (target <= 2%).

Two measurements, side by side in one run:

1. the training loop with and without :class:`peer.training.metrics.TrainingMetrics` (4 peers as
   threads over the in-memory transport, the default digits task; runs alternate A/B/A/B so
   drift of the machine hits both arms alike);
2. the exchange engine's collectors (:class:`peer.transport.grpc.metrics.ExchangeMetrics`): the
cost of the
   calls one iteration makes (per bucket and neighbour: one fetch record, one served record,
   one wait record, one request-handling record), timed directly, relative to the same
   iteration time.

    python benchmarks/metrics_overhead.py [--steps 150] [--rounds 3]

Prints a table and writes JSON (``--out``, default ``benchmarks/results/metrics_overhead.json``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

from _results import write_results
from prometheus_client import CollectorRegistry

from peer.training.metrics import TrainingMetrics
from peer.training.optim import make_optimizer
from peer.training.tasks import build_task
from peer.training.trainer import Trainer, TrainerConfig
from peer.transport.grpc.metrics import ExchangeMetrics
from peer.transport.memory import InMemoryFabric
from topology import make_topology

N = 4


def run_loop(steps: int, instrumented: bool) -> float:
    """Mean iteration seconds of 4 threaded peers (digits, DecentLaM, exponential graph)."""
    topology = make_topology("exponential", N)
    fabric = InMemoryFabric(N, topology)
    tasks = [build_task("digits", r, N, {"seed": 0, "batch_size": 32}) for r in range(N)]
    results: dict[int, float] = {}

    def peer(rank: int) -> None:
        comm = fabric.communicator(rank)
        task = tasks[rank]
        optimizer = make_optimizer(
            "decentlam", task.model.parameters(), lr=0.1, communicator=comm, overlap=True
        )
        metrics = None
        if instrumented:
            metrics = TrainingMetrics(CollectorRegistry(), rank, {"algorithm": "decentlam"})
        trainer = Trainer(
            task, optimizer, rank=rank, config=TrainerConfig(steps=steps), metrics=metrics
        )
        results[rank] = trainer.run().mean_iteration_seconds

    threads = [threading.Thread(target=peer, args=(r,)) for r in range(N)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statistics.mean(results.values())


def exchange_calls_seconds(calls: int = 20_000) -> float:
    """Seconds of the exchange collectors' work for one fetch (all four records)."""
    metrics = ExchangeMetrics(CollectorRegistry(), 0)
    started = time.perf_counter()
    for i in range(calls):
        neighbor = 1 + i % 3
        metrics.fetched(neighbor, 0.004, 40_000, 1)
        metrics.served(neighbor, 40_000, 1)
        metrics.waited(0.001)
        metrics.handled("Fetch", 0.002)
    return (time.perf_counter() - started) / calls


def record_iteration_seconds(calls: int = 20_000) -> float:
    """Seconds of one :meth:`TrainingMetrics.record_iteration` (3 neighbours)."""
    metrics = TrainingMetrics(CollectorRegistry(), 0, {"algorithm": "decentlam"})
    used = {1: 0, 2: 0, 3: 0}
    started = time.perf_counter()
    for i in range(calls):
        metrics.record_iteration(
            step=i + 1, iteration_seconds=0.004, blocked_seconds=0.001,
            exchange_seconds=0.002, loss=0.5, learning_rate=0.1, used_steps=used,
        )  # fmt: skip
    return (time.perf_counter() - started) / calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/metrics_overhead.json")
    )
    args = parser.parse_args(argv)
    plain, instrumented = [], []
    for _ in range(args.rounds):
        plain.append(run_loop(args.steps, False))
        instrumented.append(run_loop(args.steps, True))
    plain_s, instrumented_s = statistics.median(plain), statistics.median(instrumented)
    loop_overhead = instrumented_s / plain_s - 1
    per_fetch = exchange_calls_seconds()
    per_record = record_iteration_seconds()
    # one bucket per step here (the MLP is far below the bucket size), 3 neighbours
    exchange_per_iteration = 3 * per_fetch
    exchange_overhead = exchange_per_iteration / plain_s
    direct = (per_record + exchange_per_iteration) / plain_s
    rows = [
        ("iteration, no training metrics", plain_s * 1e3, "ms"),
        ("iteration, with training metrics", instrumented_s * 1e3, "ms"),
        ("A/B difference (noisy: threads, 2 cores)", loop_overhead * 100, "%"),
        ("training metrics per iteration", per_record * 1e6, "us"),
        ("exchange collectors per fetch", per_fetch * 1e6, "us"),
        ("all instrumentation per iteration", (per_record + exchange_per_iteration) * 1e6, "us"),
        ("= share of the iteration (direct)", direct * 100, "% (target <= 2%)"),
    ]
    print(f"4 threaded peers, digits MLP, DecentLaM, {args.steps} steps x {args.rounds} rounds")
    for label, value, unit in rows:
        print(f"{label:<36} {value:10.3f} {unit}")
    report = {
        "plain_iteration_seconds": plain,
        "instrumented_iteration_seconds": instrumented,
        "training_loop_overhead": loop_overhead,
        "exchange_seconds_per_fetch": per_fetch,
        "exchange_overhead": exchange_overhead,
        "training_metrics_seconds_per_iteration": per_record,
        "direct_overhead": direct,
    }
    write_results(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
