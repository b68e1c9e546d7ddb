"""Training through failures: clean run vs kill -9 (one restarted) vs a 20 s SIGSTOP, over real
peer processes on loopback gRPC; and PmSGD over gloo, which cannot lose a rank.

For every graph (ring: Metropolis-Hastings live reweighting; one-peer exponential:
time-varying, a missing slot's weight goes to the self weight):

* ``clean`` -- no fault;
* ``kill`` -- ``kill -9`` of two peers at different steps (``DECENTLAM_FAULTS=kill:...``),
  the first one restarted by the supervisor (it rejoins from its neighbours' state);
* ``stall`` -- one peer stopped with SIGSTOP for ``--stall-seconds`` (then SIGCONT).

Reported: steps every peer finished, final test accuracy of the averaged model (mean of the
final parameters of the peers that finished), rejoin time (process start to first mixed step),
the longest a surviving peer was blocked in one step, and membership changes. Targets:
survivors finish every step; rejoin <= 10 s; accuracy within 1 point of the clean run; no peer
blocks longer than the detection delay plus one step. Then ``pmsgd`` with one kill: its
all-reduce fails on every peer. Last, the drift of the network average caused by a down peer
on each graph (pure, from the live mixing matrices).

    python benchmarks/faults.py [--nodes 8] [--steps 600] [--graphs ring,one-peer-exponential]

Prints a table and writes JSON (``--out``, default ``runs/faults.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from launcher.cluster import LocalCluster, on_free_ports
from peer.training.tasks import build_task
from topology import make_topology
from topology.live import metropolis_live_row, mixing_mode, self_absorbing_row
from topology.manifest import dump_manifest, init_manifest


def write_manifest(path: Path, args: argparse.Namespace, graph: str, algorithm: str) -> Path:
    """A loopback manifest of ``args.nodes`` digits peers.

    Momentum 0.9 and lr 0.1, except DecentLaM on the one-peer exponential graph, where momentum
    0.9 diverges at any lr (the manifest refuses it; docs/algorithms.md, "DecentLaM on
    time-varying graphs"): momentum 0.6 and lr 0.125 there, as in examples/local-8-one-peer.yaml.
    """
    unstable = algorithm == "decentlam" and graph == "one-peer-exponential"
    manifest = init_manifest(
        args.nodes, graph, algorithm=algorithm, task="digits", steps=args.steps,
        batch_size=32, lr=0.125 if unstable else 0.1, momentum=0.6 if unstable else 0.9, seed=0,
    )  # fmt: skip
    manifest = on_free_ports(manifest)
    exchange = dataclasses.replace(
        manifest.exchange,
        failure_detection_seconds=args.detection_seconds,
        connect_deadline_seconds=args.connect_seconds,
    )
    path.write_text(dump_manifest(dataclasses.replace(manifest, exchange=exchange)))
    return path


def averaged_accuracy(out: Path, ranks: list[int], world: int) -> float:
    """Test accuracy of the mean of the final models of ``ranks``."""
    states = [
        torch.load(out / f"rank-{r}.pt", map_location="cpu", weights_only=True)["model"]
        for r in ranks
    ]
    task = build_task("digits", 0, world, {"seed": 0, "batch_size": 32})
    mean = {k: sum(s[k].double() for s in states) / len(states) for k in states[0]}
    task.model.load_state_dict({k: v.to(states[0][k].dtype) for k, v in mean.items()})
    return float(task.evaluate(task.model)["accuracy"])


def run_case(
    args: argparse.Namespace, graph: str, case: str, algorithm: str = "decentlam"
) -> dict[str, Any]:
    """One cluster run under the faults of ``case``; returns its row."""
    root = Path(tempfile.mkdtemp(prefix=f"faults-{graph}-{case}-"))
    manifest = write_manifest(root / "m.yaml", args, graph, algorithm)
    first, second = args.kill_ranks
    faults = {
        "clean": "",
        # early enough that the restarted peer finds its neighbours still training
        "kill": f"kill:{first}@{args.steps // 6},kill:{second}@{2 * args.steps // 3}",
        "stall": f"stall:{first}@{args.steps // 6}={args.stall_seconds}",
        "pmsgd-kill": f"kill:{first}@{args.steps // 6}",
    }[case]
    if args.step_delay:
        # Every peer sleeps this long per step in every case: a slower run without more CPU, so
        # that a restarted peer (interpreter and torch start-up take long on a loaded machine)
        # still finds its neighbours training.
        slow = ",".join(f"delay:{r}={args.step_delay}" for r in range(args.nodes))
        faults = f"{faults},{slow}" if faults else slow
    env = {"DECENTLAM_FAULTS": faults}
    cluster = LocalCluster(manifest, root / "out", ["--linger-seconds", "20"], env=env)
    started = time.monotonic()
    cluster.start()
    restarted: list[int] = []
    try:
        deadline = started + args.timeout
        while (cluster.running() or cluster.dead()) and time.monotonic() < deadline:
            for peer in cluster.dead():
                if case == "kill" and peer.rank == first and not restarted:
                    cluster.restart(peer.rank)  # the first victim comes back and rejoins
                    restarted.append(peer.rank)
                else:
                    cluster.give_up(peer.rank)
            time.sleep(0.2)
        timed_out = cluster.running()
    finally:
        cluster.stop(grace_seconds=5)
    wall = time.monotonic() - started
    results = cluster.results()
    finished = sorted(r for r, res in results.items() if res["steps"] == args.steps)
    row: dict[str, Any] = {
        "graph": graph,
        "case": case,
        "algorithm": algorithm,
        "faults": faults,
        "wall_seconds": wall,
        "timed_out": timed_out,
        "finished_all_steps": finished,
        "exit_codes": {p.rank: p.process.returncode for p in cluster.peers},
        "events": cluster.events,
        "out": str(root / "out"),
    }
    if finished:
        row["accuracy_of_average"] = averaged_accuracy(root / "out", finished, args.nodes)
        row["mean_iteration_seconds"] = float(
            np.mean([results[r]["mean_iteration_seconds"] for r in finished])
        )
        row["max_blocked_seconds"] = max(results[r]["max_blocked_seconds"] for r in finished)
    membership = {r: res.get("membership", {}) for r, res in results.items()}
    row["membership_changes"] = sum(m.get("membership_changes", 0) for m in membership.values())
    row["rejoins"] = {r: m["rejoins"] for r, m in membership.items() if m.get("rejoins")}
    return row


def average_drift(graph: str, n: int, dead: int, steps: int, seed: int = 0) -> float:
    """How far the live peers' average moves in ``steps`` pure mixing steps while ``dead`` is
    down (relative to the spread of the values): 0 when the live W is doubly stochastic."""
    topo = make_topology(graph, n)
    mode = mixing_mode(topo.weights, topo.is_time_varying).value
    x = np.random.default_rng(seed).standard_normal(n)
    live = [i for i in range(n) if i != dead]
    before, spread = x[live].mean(), x[live].std()
    for k in range(steps):
        W = np.zeros((n, n))
        W[dead, dead] = 1.0
        for i in live:
            view = topo.view(i, k)
            if mode == "metropolis":
                degrees = {j: len(topo.view(j, k).in_neighbors) for j in view.in_neighbors}
                declared = {
                    j: frozenset(m for m in topo.view(j, k).in_neighbors if m != dead)
                    for j in view.in_neighbors
                    if j != dead
                }
                own = frozenset(j for j in view.in_neighbors if j != dead)
                w_ii, row = metropolis_live_row(
                    i, view.self_weight, view.in_neighbors, own, declared, degrees
                )
            else:
                w_ii, row = self_absorbing_row(
                    view.self_weight, view.in_neighbors, {j for j in view.in_neighbors if j != dead}
                )
            W[i, i] = w_ii
            for j, w in row.items():
                W[i, j] = w
        x = W @ x
    return float(abs(x[live].mean() - before) / spread)


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(
        f"{'graph':<22} {'case':<11} {'finished':>9} {'acc(avg)':>9} {'rejoin s':>9} "
        f"{'max block s':>11} {'changes':>8} {'wall s':>7}"
    )
    for row in rows:
        rejoin = [r["seconds"] for rs in row["rejoins"].values() for r in rs]
        acc = row.get("accuracy_of_average", math.nan)
        print(
            f"{row['graph']:<22} {row['case']:<11} "
            f"{len(row['finished_all_steps']):>4}/{args.nodes:<4} {acc:>9.4f} "
            f"{(max(rejoin) if rejoin else math.nan):>9.2f} "
            f"{row.get('max_blocked_seconds', math.nan):>11.2f} "
            f"{row['membership_changes']:>8} {row['wall_seconds']:>7.1f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--graphs", default="ring,one-peer-exponential")
    parser.add_argument("--cases", default="clean,kill,stall")
    parser.add_argument("--kill-ranks", type=int, nargs=2, default=(2, 5))
    parser.add_argument("--stall-seconds", type=float, default=20.0)
    parser.add_argument("--step-delay", type=float, default=0.05, help="sleep per step, s")
    parser.add_argument("--detection-seconds", type=float, default=5.0)
    parser.add_argument("--connect-seconds", type=float, default=30.0)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--no-pmsgd", action="store_true", help="skip the PmSGD contrast run")
    parser.add_argument(
        "--algorithm",
        default="decentlam",
        help="optimizer (DecentLaM assumes a symmetric W; on one-peer exponential use dmsgd)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/faults.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("DECENTLAM_TORCH_THREADS", "1")
    rows = []
    for graph in args.graphs.split(","):
        for case in args.cases.split(","):
            print(f"running {graph} / {case} ...", file=sys.stderr, flush=True)
            rows.append(run_case(args, graph, case, algorithm=args.algorithm))
    if not args.no_pmsgd:
        print("running pmsgd / kill ...", file=sys.stderr, flush=True)
        rows.append(run_case(args, "ring", "pmsgd-kill", algorithm="pmsgd"))
    print_table(rows, args)
    drift = {
        graph: average_drift(graph, args.nodes, args.kill_ranks[0], 60)
        for graph in args.graphs.split(",")
    }
    for graph, value in drift.items():
        print(f"drift of the live average, {graph}, one peer down 60 steps: {value:.3e} (x std)")
    payload = {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "drift": drift}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
