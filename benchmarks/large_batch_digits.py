"""Large-batch benchmark on non-iid digits: does decentralized momentum lose accuracy as the
global batch grows, and does DecentLaM close the gap? (A laptop-scale echo of the paper's
ImageNet table.)

8 simulated nodes, an MLP on scikit-learn's digits split non-iid (Dirichlet), global batch
sizes 256 / 1024 / full, the same number of epochs for every batch size (so larger batches
take fewer, larger steps), and one schedule for every method: linear warmup + cosine, with the
peak learning rate scaled linearly with the global batch. Several seeds (data split,
initialisation, minibatches). Prints test accuracy of the averaged model, mean +- std, and
writes JSON.

    python benchmarks/large_batch_digits.py --out benchmarks/results/large_batch_digits.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from pathlib import Path

import torch

from peer.algorithms.schedules import CosineSchedule
from peer.simulation.problems import DigitsProblem
from peer.simulation.simulator import Simulator

logger = logging.getLogger(__name__)

METHODS = ("pmsgd", "dmsgd", "decentlam", "dsgd", "qg-dmsgd")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--graph", default="ring")
    parser.add_argument("--batch-sizes", default="256,1024,full", help="global batch sizes")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=float, default=60.0)
    parser.add_argument("--base-lr", type=float, default=0.1, help="peak lr at global batch 256")
    parser.add_argument("--warmup-fraction", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--alpha", type=float, default=0.3, help="Dirichlet non-iid-ness")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/results/large_batch_digits.json")
    return parser.parse_args()


def run_one(args: argparse.Namespace, method: str, batch: str, seed: int) -> dict[str, float]:
    from topology import make_topology

    problem = DigitsProblem(args.nodes, "mlp", hidden=args.hidden, alpha=args.alpha, seed=seed)
    train_size = int(problem.counts.sum())
    global_batch = train_size if batch == "full" else int(batch)
    per_node = None if batch == "full" else max(1, global_batch // args.nodes)
    steps = max(2, math.ceil(args.epochs * train_size / global_batch))
    peak_lr = args.base_lr * global_batch / 256
    warmup = max(1, int(args.warmup_fraction * steps))
    schedule = CosineSchedule(peak_lr, steps, warmup_steps=warmup, min_lr=0.01 * peak_lr)
    sim = Simulator(
        method,
        make_topology(args.graph, args.nodes),
        problem,
        schedule=schedule,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        batch_size=per_node,
        dtype=torch.float32,
        seed=seed,
    )
    result = sim.run(steps, record_every=steps)
    return {
        "global_batch": global_batch,
        "steps": steps,
        "peak_lr": peak_lr,
        "diverged": result.diverged,
        "test_accuracy": result.metrics.get("test_accuracy", float("nan")),
        "node_test_accuracy_min": result.metrics.get("node_test_accuracy_min", float("nan")),
        "final_loss": result.loss[-1],
        "final_consensus": result.consensus[-1],
    }


def main() -> None:
    args = parse_args()
    batches = [b.strip() for b in args.batch_sizes.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    runs: dict[str, dict[str, list[dict[str, float]]]] = {
        m: {b: [] for b in batches} for m in methods
    }
    started = time.perf_counter()
    for batch in batches:
        for method in methods:
            for seed in range(args.seeds):
                runs[method][batch].append(run_one(args, method, batch, seed))
    elapsed = time.perf_counter() - started

    def cell(records: list[dict[str, float]]) -> str:
        accs = [100 * r["test_accuracy"] for r in records]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        return f"{statistics.mean(accs):6.2f} +- {std:4.2f}"

    first = runs[methods[0]]
    labels = [f"{b} ({first[b][0]['global_batch']}, {first[b][0]['steps']} it)" for b in batches]
    print(
        f"test accuracy % of the averaged model, {args.nodes} nodes, {args.graph}, "
        f"MLP, Dirichlet alpha={args.alpha}, {args.seeds} seeds, {args.epochs:g} epochs"
    )
    print(f"{'method':<10}" + "".join(f"  {label:>24}" for label in labels))
    for method in methods:
        print(f"{method:<10}" + "".join(f"  {cell(runs[method][b]):>24}" for b in batches))
    print(f"({elapsed:.1f} s)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = vars(args)
    out.write_text(json.dumps({"config": config, "runs": runs, "seconds": elapsed}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
