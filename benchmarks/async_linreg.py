"""Asynchronous DecentLaM's floor with a slow peer: 8 real peers vs the simulator's delay model.

Full-batch linear regression (heterogeneous shards) on a ring of 8 real peer processes
(loopback gRPC), beta = 0.9, peer 0 2x slower (it sleeps ``--delay-seconds`` per step, about a
peer's compute). For ``T`` in ``--bounds`` it runs asynchronous DecentLaM (staleness-aware) and
asynchronous DmSGD, plus synchronous DecentLaM, and reports the final error
``sum_i ||x_i - x*||^2`` next to the simulator's with the same slow peer (delay model
``compute_time = [2, 1, ...]``). Targets: asynchronous DecentLaM within 2x of synchronous
DecentLaM's floor and at least 10x below asynchronous DmSGD's.

    python benchmarks/async_linreg.py [--steps 1500] [--bounds 1,2,4]

Prints a table and writes JSON (``--out``, default ``benchmarks/results/async_linreg.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _results import config_of, write_results

from launcher.cluster import LocalCluster, on_free_ports
from peer.simulation.problems import LinearRegressionProblem
from peer.simulation.simulator import Simulator
from topology.manifest import dump_manifest, init_manifest, load_manifest

N = 8
OPTIONS: dict[str, Any] = {
    "dim": 10, "samples_per_node": 200, "heterogeneity": 1.0, "batch_size": 0, "dtype": "float64",
}  # fmt: skip


def write_manifest(path: Path, algorithm: str, args: argparse.Namespace, staleness: int) -> Path:
    """An 8-peer loopback ring manifest for full-batch linreg with peer 0 delayed (keeping
    enough versions for the staleness bound)."""
    options = OPTIONS | {"step_delay_seconds": args.delay_seconds, "slow_ranks": [0]}
    manifest = init_manifest(
        N, "ring", algorithm=algorithm, task="linreg", task_options=options, steps=args.steps,
        lr=args.lr, momentum=0.9, seed=args.seed, dtype="float64",
    )  # fmt: skip
    manifest = on_free_ports(manifest)
    exchange = dataclasses.replace(
        manifest.exchange,
        retained_versions=max(manifest.exchange.retained_versions, staleness + 2),
    )
    path.write_text(dump_manifest(dataclasses.replace(manifest, exchange=exchange)))
    return path


def real_error(manifest: Path, out: Path, staleness: int, problem: Any) -> float:
    """Run the cluster; ``sum_i ||x_i - x*||^2`` of the peers' final parameters."""
    for attempt in range(2):  # a free port taken by another process meanwhile: retry once
        cluster = LocalCluster(
            manifest, out / str(attempt), ["--linger-seconds", "30", "--max-staleness",
                                           str(staleness)]
        )  # fmt: skip
        cluster.start()
        try:
            finished = cluster.wait(900)
            codes = [p.process.returncode for p in cluster.peers]
        finally:
            cluster.stop(grace_seconds=5)
        if finished and codes == [0] * N:
            rows = [
                torch.load(out / str(attempt) / f"rank-{r}.pt", weights_only=False)["model"]["x"]
                for r in range(N)
            ]
            return float((torch.stack(rows) - problem.x_star).pow(2).sum())
        if attempt:
            raise RuntimeError(f"cluster failed ({codes}); logs in {out}")
    raise AssertionError("unreachable")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bounds", default="1,2,4", help="staleness bounds T")
    parser.add_argument("--delay-seconds", type=float, default=0.005)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/async_linreg.json"))
    args = parser.parse_args(argv)
    bounds = [int(b) for b in args.bounds.split(",")]
    problem = LinearRegressionProblem(n=N, seed=args.seed, **{
        k: v for k, v in OPTIONS.items() if k not in ("batch_size", "dtype")
    })  # fmt: skip
    slow = [2.0] + [1.0] * (N - 1)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="decentlam-async-linreg-") as tmp:
        root = Path(tmp)
        runs = [("decentlam", 0)] + [(a, t) for t in bounds for a in ("decentlam", "dmsgd")]
        for algorithm, staleness in runs:
            manifest = write_manifest(
                root / f"{algorithm}-{staleness}.yaml", algorithm, args, staleness
            )
            topology = load_manifest(manifest).build_topology()
            sim = Simulator(
                algorithm, topology, problem, lr=args.lr, momentum=0.9, max_staleness=staleness,
                compute_time=slow,
            )  # fmt: skip
            simulated = sim.run(args.steps, args.steps).final_error
            real = real_error(manifest, root / f"{algorithm}-{staleness}", staleness, problem)
            rows.append({"algorithm": algorithm, "max_staleness": staleness,
                         "simulator_error": simulated, "real_error": real})  # fmt: skip
            print(f"  {algorithm} T={staleness}: real {real:.4g}, simulator {simulated:.4g}",
                  flush=True)  # fmt: skip
    sync = rows[0]
    print(f"\nlinreg, ring of {N}, beta 0.9, lr {args.lr}, {args.steps} steps, peer 0 2x slower")
    print(f"{'method':<14}{'T':>3}{'real error':>14}{'/ sync':>9}{'simulator':>14}{'/ sync':>9}")
    for row in rows:
        print(f"{row['algorithm']:<14}{row['max_staleness']:>3}{row['real_error']:>14.5g}"
              f"{row['real_error'] / sync['real_error']:>9.2f}{row['simulator_error']:>14.5g}"
              f"{row['simulator_error'] / sync['simulator_error']:>9.2f}")  # fmt: skip
    report = {
        "config": config_of(args),
        "rows": rows,
        "wall_seconds": time.perf_counter() - started,
    }
    write_results(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
