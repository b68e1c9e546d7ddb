"""Stragglers: wall-clock time to 95% test accuracy with one peer 2x slower, over real peers.

8 real peer processes (loopback gRPC) train the digits MLP on a non-iid split (Dirichlet
``alpha``) over a ring. Peer 0 sleeps once per step for as long as a peer's measured compute
takes (a calibration run without delay measures it), so it is 2x slower. For each method the
peers evaluate every ``--eval-every`` steps; the mean test accuracy over peers at an evaluation
step is reached when the last peer gets there (wall clock since training began). Methods:
synchronous DecentLaM, asynchronous DecentLaM (staleness-aware, T = 1 pipelined, T = 1, T = 2),
asynchronous DmSGD (T = 2) and PmSGD (all-reduce, synchronous).

    python benchmarks/stragglers.py [--steps 300] [--eval-every 20] [--target 0.95]

Prints a table and writes JSON (``--out``, default ``benchmarks/results/stragglers.json``).
Timings depend on the machine's load: 8 peers share the cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _results import config_of, write_results

from launcher.cluster import LocalCluster, free_ports, on_free_ports
from topology.manifest import dump_manifest, init_manifest

N = 8

#: (label, algorithm, staleness bound, extra peer arguments)
METHODS: tuple[tuple[str, str, int, tuple[str, ...]], ...] = (
    ("DecentLaM sync", "decentlam", 0, ()),
    ("DecentLaM T=1 pipelined", "decentlam", 1, ("--pipeline",)),
    ("DecentLaM T=1", "decentlam", 1, ()),
    ("DecentLaM T=2", "decentlam", 2, ()),
    ("DmSGD T=2", "dmsgd", 2, ()),
    ("PmSGD", "pmsgd", 0, ()),
)


def write_manifest(path: Path, args: argparse.Namespace, algorithm: str, steps: int,
                   delay_seconds: float, staleness: int, lr: float | None = None,
                   ) -> Path:  # fmt: skip
    """An 8-peer loopback ring manifest for the digits task, peer 0 delayed."""
    options: dict[str, Any] = {
        "batch_size": args.batch_size, "alpha": args.alpha, "hidden": args.hidden,
        "step_delay_seconds": delay_seconds, "slow_ranks": [0],
    }  # fmt: skip
    manifest = init_manifest(
        N, "ring", algorithm=algorithm, task="digits", task_options=options, steps=steps,
        lr=args.lr if lr is None else lr, momentum=0.9, seed=args.seed,
        eval_every=args.eval_every,
        max_staleness=staleness,
    )  # fmt: skip
    manifest = on_free_ports(manifest)
    path.write_text(dump_manifest(manifest))
    return path


def run_cluster(manifest: Path, out: Path, extra: tuple[str, ...]) -> list[dict[str, Any]]:
    """Run the cluster to the end; the peers' results (``peer-<r>.json``)."""
    cluster = LocalCluster(manifest, out, ["--linger-seconds", "30", *extra])
    cluster.start()
    try:
        if not cluster.wait(900):
            raise RuntimeError(f"cluster did not finish; logs in {out / 'logs'}")
        codes = [p.process.returncode for p in cluster.peers]
        if codes != [0] * N:
            tails = "\n".join(cluster.log_tail(p.rank) for p in cluster.peers)
            raise RuntimeError(f"peers exited with {codes}:\n{tails}")
    finally:
        cluster.stop(grace_seconds=5)
    return [json.loads((out / f"peer-{r}.json").read_text()) for r in range(N)]


def curve(results: list[dict[str, Any]]) -> list[tuple[int, float, float]]:
    """``(step, seconds, mean accuracy)`` per evaluation step every peer recorded."""
    by_step: dict[int, list[dict[str, Any]]] = {}
    for result in results:
        for record in result["history"]:
            if "eval_accuracy" in record:
                by_step.setdefault(int(record["step"]), []).append(record)
    points = []
    for step, records in sorted(by_step.items()):
        if len(records) == len(results):
            seconds = max(float(r["seconds"]) for r in records)
            accuracy = statistics.mean(float(r["eval_accuracy"]) for r in records)
            points.append((step, seconds, accuracy))
    return points


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument(
        "--async-lr",
        type=float,
        help="lr of the asynchronous DecentLaM runs "
        "(default --lr; they move ~1/(1-beta) slower per step at the same lr)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--delay-seconds", type=float, help="slow peer's sleep per step "
                        "(default: the calibrated compute time, i.e. 2x slower)")  # fmt: skip
    parser.add_argument("--methods", help="comma-separated labels to run (default: all)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/stragglers.json"))
    args = parser.parse_args(argv)
    chosen = METHODS
    if args.methods:
        wanted = {m.strip() for m in args.methods.split(",")}
        chosen = tuple(m for m in METHODS if m[0] in wanted)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="decentlam-stragglers-") as tmp:
        root = Path(tmp)
        delay = args.delay_seconds
        if delay is None:
            calibration = write_manifest(root / "calibrate.yaml", args, "decentlam", 20, 0.0, 0)
            results = run_cluster(calibration, root / "calibrate", ())
            delay = statistics.median(r["mean_compute_seconds"] for r in results)
        for label, algorithm, staleness, extra in chosen:
            for attempt in range(2):  # a free port taken by another process meanwhile: retry
                name = f"{len(rows)}-{attempt}"
                lr = args.async_lr if algorithm == "decentlam" and staleness else None
                manifest = write_manifest(
                    root / f"{name}.yaml", args, algorithm, args.steps, delay, staleness, lr
                )
                arguments = extra
                if algorithm == "pmsgd":  # torch.distributed rendezvous on a free loopback port
                    init = f"tcp://127.0.0.1:{free_ports(1)[0]}"
                    arguments = (*extra, "--dist-init-method", init)
                try:
                    results = run_cluster(manifest, root / name, arguments)
                    break
                except RuntimeError as exc:
                    if attempt:
                        raise
                    print(f"  {label}: failed ({str(exc).splitlines()[0]}); retrying", flush=True)
            points = curve(results)
            reached = next((p for p in points if p[2] >= args.target), None)
            rows.append({
                "method": label, "algorithm": algorithm, "max_staleness": staleness,
                "extra_args": list(extra),
                "lr": args.async_lr if algorithm == "decentlam" and staleness and args.async_lr
                else args.lr,
                "seconds_to_target": reached[1] if reached else None,
                "step_to_target": reached[0] if reached else None,
                "final_accuracy": points[-1][2] if points else None,
                "total_seconds": max(r["total_seconds"] for r in results),
                "mean_iteration_seconds": statistics.mean(
                    r["mean_iteration_seconds"] for r in results
                ),
                "max_staleness_seen": max(r["max_staleness_seen"] for r in results),
                "curve": points,
            })  # fmt: skip
            print(f"  {label}: done in {rows[-1]['total_seconds']:.1f} s", flush=True)
    sync = next((r for r in rows if r["method"] == "DecentLaM sync"), None)
    print(f"\n{N} peers, ring, non-iid digits (alpha {args.alpha}), MLP {args.hidden}, batch "
          f"{args.batch_size}, lr {args.lr}, {args.steps} steps; peer 0 sleeps {delay * 1e3:.1f} "
          f"ms per step (2x slower); target {args.target:.0%}")  # fmt: skip
    header = (
        f"{'method':<26}{'time to target s':>18}{'vs sync':>9}{'final acc %':>13}{'iter ms':>9}"
    )
    print(header)
    for row in rows:
        to = row["seconds_to_target"]
        ratio = "" if sync is None or to is None or sync["seconds_to_target"] is None else (
            f"{to / sync['seconds_to_target']:.2f}x"
        )  # fmt: skip
        to_text = "not reached" if to is None else f"{to:.1f}"
        final = row["final_accuracy"]
        final_text = "-" if final is None else f"{100 * final:.2f}"
        print(f"{row['method']:<26}{to_text:>18}{ratio:>9}{final_text:>13}"
              f"{row['mean_iteration_seconds'] * 1e3:>9.1f}")  # fmt: skip
    report = {
        "config": config_of(args),
        "delay_seconds": delay,
        "rows": rows,
        "wall_seconds": time.perf_counter() - started,
    }
    write_results(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
