"""One command reproduces the project's results: ``docs/RESULTS.md`` with plots and raw JSON.

Sections (each states the machine, the command, the date, the load and what failed):

1. ``bias``: the bias figure (sum_i ||x_i - x*||^2 vs iteration on heterogeneous least squares,
   DSGD / DmSGD / DecentLaM / PmSGD) through real peer processes over loopback gRPC, next to
   the in-process simulator's;
2. ``large-batch``: large-batch non-iid digits through real peers (label-sorted shards, global
   batch from 64 to full batch, DecentLaM / DmSGD / PmSGD / DSGD / QG-DmSGD, several seeds):
   accuracy of the averaged model and of each peer;
3. ``exchange``, 4. ``overlap``, 5. ``scaling``, 6. ``stragglers`` and ``faults``: the other
   benchmark scripts under ``benchmarks/``, called as subprocesses (never copied here). A
   script that is not in this build is reported as "not available in this build"; it is
   picked up automatically once its file exists.

``--quick`` (about 10 minutes on 2 idle cores) runs fewer batch sizes, seeds and steps; the
default full mode runs everything the issue asks for (several hours on 2 cores).

    python benchmarks/report.py --quick
    python benchmarks/report.py --quick --sections bias --bias-nodes 2 --bias-steps 20  # smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import itertools
import json
import logging
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

logger = logging.getLogger(__name__)

SECTIONS = ("bias", "large-batch", "exchange", "overlap", "scaling", "stragglers", "faults")
BIAS_METHODS = ("dsgd", "dmsgd", "decentlam", "pmsgd")
LARGE_BATCH_METHODS = ("decentlam", "dmsgd", "pmsgd", "dsgd", "qg-dmsgd")
CLUSTER_TIMEOUT_SECONDS = 900.0


@dataclass(frozen=True)
class ExternalScript:
    """A benchmark script owned elsewhere that a section runs as a subprocess.

    Attributes:
        path: the script, relative to the repository root.
        title: section heading.
        what: one sentence on what it measures.
        quick_args: extra arguments in ``--quick`` mode (only those the script's ``--help``
            lists are passed).
        needs: what the script needs that this machine may lack (stated in the page).
    """

    path: str
    title: str
    what: str
    quick_args: tuple[tuple[str, ...], ...] = ()
    needs: str = ""


EXTERNAL: dict[str, ExternalScript] = {
    "exchange": ExternalScript(
        "benchmarks/exchange.py",
        "3. Exchange vs gloo vs raw TCP, and the compressed wire",
        "loopback transfer time of one vector: gRPC fetch (chunk sizes, parallel streams, wire "
        "dtypes where supported) against torch.distributed gloo and raw TCP.",
        quick_args=(
            ("--sizes-mb", "1", "10"),
            ("--repeats", "3"),
            ("--warmup", "1"),
            ("--chunk-mib", "1"),
            ("--parallel-streams", "1", "2"),
        ),
    ),
    "overlap": ExternalScript(
        "benchmarks/overlap.py",
        "4. Overlap of exchanges with backward",
        "iteration time of a 2-peer cluster with blocking exchanges vs exchanges overlapped "
        "with backward, on a bandwidth-capped link.",
        quick_args=(("--steps", "40"), ("--warmup-steps", "5")),
    ),
    "scaling": ExternalScript(
        "benchmarks/scaling.py",
        "5. Scaling on shaped links",
        "throughput as peers are added, over network namespaces with shaped links.",
        quick_args=(("--quick",), ("--nodes", "2,4"), ("--rates", "100mbit"), ("--steps", "8")),
        needs="root and network namespaces (ip netns, tc)",
    ),
    "stragglers": ExternalScript(
        "benchmarks/stragglers.py",
        "6a. Stragglers (asynchronous DecentLaM)",
        "time to accuracy with slow peers, synchronous vs staleness-bounded exchanges.",
        quick_args=(("--quick",),),
    ),
    "faults": ExternalScript(
        "benchmarks/faults.py",
        "6b. Faults (failure detection, reweighting, rejoin)",
        "training through injected peer failures and rejoins.",
        quick_args=(
            ("--quick",),
            ("--nodes", "4"),
            ("--kill-ranks", "1", "3"),
            ("--steps", "200"),
            ("--graphs", "ring"),
            ("--cases", "clean,kill"),
            ("--stall-seconds", "5"),
        ),
    ),
}


@dataclass
class Section:
    """One section of the page, as written."""

    key: str
    title: str
    status: str = "ok"  # ok, partial, failed, not available
    body: list[str] = field(default_factory=list)
    command: str = ""
    started_utc: str = ""
    seconds: float = 0.0
    load_start: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_end: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def markdown(self) -> str:
        """The section as Markdown."""
        lines = [f"<!-- section: {self.key} -->", f"## {self.title}", ""]
        load = (
            f"load average {self.load_start[0]:.1f} at the start, {self.load_end[0]:.1f} at the end"
        )
        lines.append(
            f"*{self.started_utc}, {self.seconds:.0f} s, {load}. Status: **{self.status}**.*"
        )
        lines.append("")
        if self.command:
            lines += ["```", self.command, "```", ""]
        lines += self.body
        return "\n".join(lines).rstrip() + "\n"


class SectionError(RuntimeError):
    """A section could not produce its figures (the message goes into the page)."""


# --------------------------------------------------------------------------------------------
# real peers


def run_peers(manifest: Any, out_dir: Path, timeout_seconds: float) -> dict[int, dict[str, Any]]:
    """Run ``manifest`` as a local cluster of peer processes on loopback; their results.

    Ports are chosen free at launch; no metrics endpoints. Raises :class:`SectionError` with
    the failing peer's log tail when a peer fails or the cluster overruns its deadline.
    """
    from launcher.cluster import LocalCluster, free_ports
    from topology.manifest import dump_manifest

    ports = free_ports(manifest.world_size)
    peers = tuple(
        dataclasses.replace(p, port=ports[i], metrics_port=None)
        for i, p in enumerate(manifest.peers)
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "manifest.yaml"
    path.write_text(dump_manifest(dataclasses.replace(manifest, peers=peers)))
    cluster = LocalCluster(path, out_dir, ["--linger-seconds", "20"])
    cluster.start()
    try:
        finished = cluster.wait(timeout_seconds)
        failed = cluster.failed()
        if failed is not None or not finished:
            rank = failed.rank if failed is not None else cluster.peers[0].rank
            tail = cluster.log_tail(rank, 5).replace("\n", " | ")
            reason = "failed" if failed is not None else f"overran {timeout_seconds:.0f} s"
            raise SectionError(f"peer {rank} {reason}: {tail}")
    finally:
        cluster.stop(grace_seconds=5)
    results = cluster.results()
    if len(results) != manifest.world_size:
        raise SectionError(f"only {len(results)} of {manifest.world_size} peers wrote results")
    return results


def _load_models(out_dir: Path, world_size: int) -> list[dict[str, Any]]:
    import torch

    return [
        torch.load(out_dir / f"rank-{r}.pt", weights_only=True)["model"] for r in range(world_size)
    ]


# --------------------------------------------------------------------------------------------
# section 1: bias


def bias_section(args: argparse.Namespace, results_dir: Path, work: Path, section: Section) -> None:
    """The bias figure through real peers next to the simulator's."""
    from launcher.cli import main as cli_main
    from topology.manifest import init_manifest

    methods = args.bias_methods.split(",")
    steps, lr, every = args.bias_steps, 0.005, max(1, args.bias_steps // 50)
    options = {"dim": 10, "samples_per_node": 200, "heterogeneity": 1.0, "batch_size": 0}
    sim_dir = work / "bias-simulator"
    sim_argv = [
        "simulate", "--problem", "linreg", "--nodes", str(args.bias_nodes), "--graph", "ring",
        "--algorithms", ",".join(methods), "--steps", str(steps), "--lr", str(lr),
        "--seed", "0", "--out", str(sim_dir),
    ]  # fmt: skip
    with open(os.devnull, "w") as sink:
        stdout = sys.stdout
        sys.stdout = sink
        try:
            cli_main(sim_argv)
        finally:
            sys.stdout = stdout
    simulated = json.loads((sim_dir / "result.json").read_text())["methods"]
    real: dict[str, dict[str, list[float]]] = {}
    failures = []
    for method in methods:
        manifest = init_manifest(
            args.bias_nodes, "ring", algorithm=method, task="linreg", task_options=dict(options),
            steps=steps, lr=lr, momentum=0.9, seed=0, dtype="float64", eval_every=every,
        )  # fmt: skip
        try:
            peers = run_peers(manifest, work / f"bias-{method}", args.cluster_timeout)
        except SectionError as exc:
            failures.append(f"{method}: {exc}")
            continue
        records = [peers[r]["history"] for r in range(args.bias_nodes)]
        real[method] = {
            "steps": [rec["step"] for rec in records[0]],
            "error": [
                sum(records[r][k]["eval_error"] for r in range(args.bias_nodes))
                for k in range(len(records[0]))
            ],
        }
    payload = {
        "config": {"nodes": args.bias_nodes, "graph": "ring", "lr": lr, "momentum": 0.9,
                   "steps": steps, "eval_every": every, "task_options": options},
        "simulator": {r["algorithm"]: {"steps": r["steps"], "error": r["error"]}
                      for r in simulated},
        "real_peers": real,
        "failures": failures,
    }  # fmt: skip
    (results_dir / "bias.json").write_text(json.dumps(payload, indent=1))
    _plot_bias(payload, results_dir / "bias.png")
    section.body += [
        f"Heterogeneous least squares, {args.bias_nodes} peers on a ring, full-batch gradients, "
        f"lr {lr}, momentum 0.9, {steps} iterations. Left: real peer processes over loopback "
        "gRPC (the error is summed over the peers' own evaluations every "
        f"{every} iterations); right: the in-process simulator with the same problem.",
        "",
        "![bias](results/bias.png)",
        "",
        "| method | final error, real peers | final error, simulator | real / simulator |",
        "|---|---|---|---|",
    ]
    sim_final = {r["algorithm"]: r["error"][-1] for r in simulated}
    for method in methods:
        got = real.get(method, {}).get("error")
        cell = f"{got[-1]:.3e}" if got else "failed"
        ratio = f"{got[-1] / sim_final[method]:.6f}" if got and sim_final[method] else "-"
        section.body.append(f"| {method} | {cell} | {sim_final[method]:.3e} | {ratio} |")
    section.body.append("")
    if failures:
        section.status = "partial"
        section.body += ["Failed runs:", "", *[f"- {f}" for f in failures], ""]


def _plot_bias(payload: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, title in (
        (axes[0], "real_peers", "real peers (gRPC)"),
        (axes[1], "simulator", "simulator"),
    ):
        for method, curve in payload[key].items():
            ax.plot(curve["steps"], [max(v, 1e-300) for v in curve["error"]], label=method)
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("sum_i ||x_i - x*||^2")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# section 2: large batch


def large_batch_run(
    args: argparse.Namespace, method: str, batch: str, seed: int, out_dir: Path
) -> dict[str, Any]:
    """One real-peer digits run; accuracy of the averaged model and of every peer."""
    from peer.simulation.problems import split_digits
    from peer.training.tasks import digits_task
    from topology.manifest import init_manifest

    split = split_digits(args.nodes, args.split, args.alpha, args.test_fraction, seed)
    shard = min(len(s) for s in split.shards)
    train_size = sum(len(s) for s in split.shards)
    per_peer = (
        0 if batch == "full" or int(batch) // args.nodes >= shard else int(batch) // args.nodes
    )
    global_batch = train_size if per_peer == 0 else per_peer * args.nodes
    steps = max(args.min_steps, 2, math.ceil(args.epochs * train_size / global_batch))
    peak_lr = args.base_lr * global_batch / 256
    options = {
        "model": "mlp", "hidden": args.hidden, "split": args.split, "alpha": args.alpha,
        "test_fraction": args.test_fraction, "batch_size": per_peer,
    }  # fmt: skip
    manifest = init_manifest(
        args.nodes, "ring", algorithm=method, task="digits", task_options=options,
        steps=steps, lr=peak_lr, momentum=0.9, weight_decay=args.weight_decay, seed=seed,
        lr_schedule={"name": "cosine", "warmup_steps": max(1, steps // 10),
                     "min_lr": 0.01 * peak_lr},
    )  # fmt: skip
    started = time.perf_counter()
    peers = run_peers(manifest, out_dir, args.cluster_timeout)
    models = _load_models(out_dir, args.nodes)
    average = {k: sum(m[k] for m in models) / len(models) for k in models[0]}
    task = digits_task(0, args.nodes, seed=seed, **options)
    task.model.load_state_dict(average)
    averaged = task.evaluate(task.model)
    peer_acc = [float(peers[r]["eval"]["accuracy"]) for r in range(args.nodes)]
    return {
        "method": method,
        "batch": batch,
        "seed": seed,
        "global_batch": global_batch,
        "per_peer_batch": per_peer or shard,
        "steps": steps,
        "peak_lr": peak_lr,
        "averaged_accuracy": averaged["accuracy"],
        "averaged_loss": averaged["loss"],
        "peer_accuracy": peer_acc,
        "consensus_distance": statistics.mean(
            float(peers[r]["consensus_distance"]) for r in range(args.nodes)
        ),
        "seconds": time.perf_counter() - started,
        "finished_utc": f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
    }


def large_batch_section(
    args: argparse.Namespace, results_dir: Path, work: Path, section: Section
) -> None:
    """Large-batch non-iid digits through real peers: the issue's main table."""
    methods = args.methods.split(",")
    batches = args.batch_sizes.split(",")
    config = {k: getattr(args, k) for k in LARGE_BATCH_CONFIG}
    stored = _reusable_runs(results_dir / "large_batch.json", config) if args.reuse else {}
    runs: list[dict[str, Any]] = []
    failures = []
    reused = 0
    for batch in batches:
        for method in methods:
            for seed in range(args.seeds):
                name = f"lb-{method}-{batch}-{seed}"
                if (method, batch, seed) in stored:
                    runs.append(stored[method, batch, seed])
                    reused += 1
                    continue
                try:
                    runs.append(large_batch_run(args, method, batch, seed, work / name))
                    print(f"  {name}: {100 * runs[-1]['averaged_accuracy']:.1f}%", flush=True)
                except SectionError as exc:
                    failures.append(f"{method}, batch {batch}, seed {seed}: {exc}")
                    print(f"  {name}: failed ({exc})", flush=True)
    config.update(seeds=args.seeds, methods=args.methods, batch_sizes=args.batch_sizes)
    payload = {"config": config, "runs": runs, "failures": failures}
    (results_dir / "large_batch.json").write_text(json.dumps(payload, indent=1))
    if not runs:
        raise SectionError("no run finished: " + "; ".join(failures))
    table = _large_batch_table(runs, methods, batches)
    _plot_large_batch(table, methods, results_dir / "large_batch.png")
    section.body += [
        f"Digits (scikit-learn, {len(runs[0]['peer_accuracy'])} peers on a ring), split "
        f"**{args.split}**"
        + (" (sorted by label, contiguous shards: each peer holds one or two classes)"
           if args.split == "label" else f" (alpha {args.alpha})")
        + f", MLP (2 hidden layers of {args.hidden}), {args.epochs:g} epochs for every batch "
        f"size, cosine schedule with 10% warmup, peak lr {args.base_lr} x global batch / 256, "
        f"momentum 0.9, weight decay {args.weight_decay}, {args.seeds} seed(s) (split, init, "
        f"minibatches); at least {args.min_steps} iterations (fewer, larger steps leave every "
        "method under-trained, PmSGD included). Test accuracy (%) of the averaged model, "
        "mean +- std over seeds; in brackets the mean accuracy of the individual peers "
        "(each peer's accuracy is in the JSON).",
        "",
        *(
            [f"{reused} of the {len(runs)} runs were kept from an earlier run with the same "
             "settings (`--reuse`); their timestamps are in the JSON.", ""]
            if reused else []
        ),
        "![large batch](results/large_batch.png)",
        "",
    ]  # fmt: skip
    labels = [f"{b} ({table[methods[0]][b]['global_batch']}, "
              f"{table[methods[0]][b]['steps']} it)" if b in table[methods[0]] else b
              for b in batches]  # fmt: skip
    section.body.append("| method | " + " | ".join(labels) + " |")
    section.body.append("|---" * (len(batches) + 1) + "|")
    for method in methods:
        cells = []
        for batch in batches:
            stats = table[method].get(batch)
            cells.append(
                "-" if stats is None else
                f"{stats['mean']:.1f} +- {stats['std']:.1f} [{stats['peer_mean']:.1f}]"
            )  # fmt: skip
        section.body.append(f"| {method} | " + " | ".join(cells) + " |")
    section.body.append("")
    section.body += _large_batch_verdict(table, batches)
    if failures:
        section.status = "partial"
        section.body += ["Failed runs:", "", *[f"- {f}" for f in failures], ""]


LARGE_BATCH_CONFIG = (
    "nodes", "split", "alpha", "test_fraction", "hidden", "epochs", "min_steps", "base_lr",
    "weight_decay",
)  # fmt: skip


def _reusable_runs(
    path: Path, config: dict[str, Any]
) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Runs of an earlier large-batch JSON made with the same settings, by (method, batch, seed).

    The settings that decide a run's outcome must all match, except ``min_steps`` (a file
    without it counts as ``min_steps = 0``): a run is kept when the step count the current
    settings give is the one it ran (the same floor, or a count set by the epochs alone).
    """
    if not path.exists():
        return {}
    previous = json.loads(path.read_text())
    old = {"min_steps": 0, **previous.get("config", {})}
    if any(old.get(k) != v for k, v in config.items() if k != "min_steps"):
        return {}
    old_floor, new_floor = old["min_steps"], config["min_steps"]
    return {
        (r["method"], r["batch"], r["seed"]): r
        for r in previous.get("runs", [])
        if old_floor == new_floor or (r["steps"] > old_floor and r["steps"] >= new_floor)
    }


def _large_batch_table(
    runs: list[dict[str, Any]], methods: Sequence[str], batches: Sequence[str]
) -> dict[str, dict[str, dict[str, float]]]:
    table: dict[str, dict[str, dict[str, float]]] = {m: {} for m in methods}
    for method in methods:
        for batch in batches:
            mine = [r for r in runs if r["method"] == method and r["batch"] == batch]
            if not mine:
                continue
            accs = [100 * r["averaged_accuracy"] for r in mine]
            table[method][batch] = {
                "mean": statistics.mean(accs),
                "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "peer_mean": 100 * statistics.mean(a for r in mine for a in r["peer_accuracy"]),
                "global_batch": mine[0]["global_batch"],
                "steps": mine[0]["steps"],
            }
    return table


def _large_batch_verdict(
    table: dict[str, dict[str, dict[str, float]]], batches: Sequence[str]
) -> list[str]:
    """Say plainly whether the measurement shows the claimed effect."""
    if not {"decentlam", "dmsgd"} <= table.keys():
        return []
    lines = ["What this measurement says about the claim (DecentLaM >= 3 points above DmSGD "
             "at global batch >= 512, gap growing with the batch, within 1 point of PmSGD):",
             ""]  # fmt: skip
    gaps = []
    for batch in batches:
        lam, dm = table["decentlam"].get(batch), table["dmsgd"].get(batch)
        if lam is None or dm is None:
            continue
        gap = lam["mean"] - dm["mean"]
        gaps.append((lam["global_batch"], gap))
        line = f"- global batch {lam['global_batch']:g}: DecentLaM - DmSGD = {gap:+.1f} points"
        pm = table.get("pmsgd", {}).get(batch)
        if pm is not None:
            line += f", PmSGD - DecentLaM = {pm['mean'] - lam['mean']:+.1f} points"
        lines.append(line)
    large = [g for b, g in gaps if b >= 512]
    growing = all(later >= earlier - 0.5 for (_, earlier), (_, later) in itertools.pairwise(gaps))
    lines += [
        "",
        f"- gap >= 3 points at every global batch >= 512: "
        f"**{'yes' if large and min(large) >= 3 else 'no'}**; gap grows with the batch "
        f"(within 0.5 point of noise): **{'yes' if growing else 'no'}**",
        "",
    ]
    return lines


def _plot_large_batch(
    table: dict[str, dict[str, dict[str, float]]], methods: Sequence[str], path: Path
) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for method in methods:
        rows = sorted(table[method].values(), key=lambda s: s["global_batch"])
        if not rows:
            continue
        x = [r["global_batch"] for r in rows]
        axes[0].errorbar(x, [r["mean"] for r in rows], yerr=[r["std"] for r in rows],
                         marker="o", capsize=3, label=method)  # fmt: skip
        axes[1].plot(x, [r["peer_mean"] for r in rows], marker="o", label=method)
    for ax, title in ((axes[0], "averaged model"), (axes[1], "individual peers (mean)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("global batch")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("test accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# sections 3-6: other scripts


def _script_flags(script: Path) -> str:
    completed = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120,
        cwd=ROOT, env=_child_env(),
    )  # fmt: skip
    return completed.stdout


def _child_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)}


def external_section(
    key: str, args: argparse.Namespace, results_dir: Path, section: Section
) -> None:
    """Run another engineer's benchmark script; keep its table and JSON."""
    spec = EXTERNAL[key]
    script = ROOT / spec.path
    section.body += [f"What it measures: {spec.what}", ""]
    if not script.exists():
        section.status = "not available"
        section.body.append(
            f"Not available in this build: `{spec.path}` does not exist yet. This page picks "
            "it up automatically once it does."
        )
        return
    flags = _script_flags(script)
    json_out = results_dir / f"{key}.json"
    argv = [sys.executable, spec.path]
    if "--json-out" in flags:
        argv += ["--json-out", str(json_out)]
    elif "--out" in flags:
        argv += ["--out", str(json_out)]
    plot = results_dir / f"{key}.png"
    if "--plot" in flags:
        argv += ["--plot", str(plot)]
    if args.quick:
        argv += [a for group in spec.quick_args if group[0] in flags for a in group]
    shown = [str(Path(a).relative_to(ROOT)) if a.startswith(f"{ROOT}/") else a for a in argv[1:]]
    section.command = shlex.join(["python", *shown])
    # SIGTERM first on a timeout (subprocess.run would SIGKILL): scripts that build network
    # namespaces or clusters clean them up on SIGTERM.
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env=_child_env(),
    ) as process:  # fmt: skip
        try:
            stdout, stderr = process.communicate(timeout=args.script_timeout)
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
            section.status = "failed"
            section.body.append(f"The script overran its {args.script_timeout:.0f} s deadline.")
            return
    completed = subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)
    output = completed.stdout.strip().splitlines()
    if completed.returncode != 0:
        section.status = "failed"
        error = (completed.stderr.strip().splitlines() or ["(no output)"])[-1]
        section.body.append(f"The script failed (exit {completed.returncode}): `{error}`")
        if spec.needs:
            section.body.append(f"It needs {spec.needs}.")
        section.body.append("")
    if output:
        section.body += ["Its output:", "", "```", *output[-60:], "```", ""]
    if "--plot" in flags and plot.exists():
        section.body += [f"![{key}](results/{plot.name})", ""]
    if json_out.exists():
        section.body.append(f"Raw data: [results/{json_out.name}](results/{json_out.name}).")


# --------------------------------------------------------------------------------------------
# page


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def machine_line() -> str:
    """One line describing this machine (what the timings were taken on)."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.platform()}, {os.cpu_count()} cores, {gpu}, Python "
        f"{platform.python_version()}, torch {torch.__version__}"
    )


def write_page(sections: Sequence[Section], args: argparse.Namespace, page: Path) -> None:
    """Write ``page`` (merging in sections of an earlier page that this run did not redo)."""
    previous = _previous_sections(page)
    keys = [s.key for s in sections]
    merged = {**previous, **{s.key: s.markdown() for s in sections}}
    mode = "quick" if args.quick else "full"
    header = [
        "# Results",
        "",
        "Generated by `python benchmarks/report.py"
        + (" --quick" if args.quick else "")
        + "`; do not edit by hand (rerun it).",
        "",
        f"- last run: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {mode} mode, sections "
        f"{', '.join(keys)}",
        f"- machine: {machine_line()}",
        f"- load averages are given per section: where they are above the machine's "
        f"{os.cpu_count()} cores, other jobs shared it and **timings are inflated**; "
        "accuracies and errors are not affected.",
        "- out of reach here: no GPU (every run is on CPU), no Docker engine (the compose "
        "deployment is not exercised).",
        "",
    ]
    body = [merged[k] for k in SECTIONS if k in merged]
    page.write_text("\n".join(header) + "\n" + "\n".join(body))


def _previous_sections(page: Path) -> dict[str, str]:
    if not page.exists():
        return {}
    found: dict[str, str] = {}
    for chunk in page.read_text().split("\n<!-- section: ")[1:]:
        key, _, text = chunk.partition(" -->\n")
        found[key] = f"<!-- section: {key} -->\n{text.rstrip()}\n"
    return found


RUNNERS: dict[str, Callable[[argparse.Namespace, Path, Path, Section], None]] = {
    "bias": bias_section,
    "large-batch": large_batch_section,
}

TITLES = {
    "bias": "1. The bias of decentralized momentum, through real peers",
    "large-batch": "2. Large-batch non-iid digits through real peers",
}


def run_section(key: str, args: argparse.Namespace, results_dir: Path, work: Path) -> Section:
    """Run one section, timing it and recording the load; failures go into the page."""
    title = TITLES.get(key) or EXTERNAL[key].title
    section = Section(key, title, started_utc=f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC")
    if key in RUNNERS:
        section.command = args.command_line
    section.load_start = os.getloadavg()
    started = time.perf_counter()
    try:
        if key in RUNNERS:
            RUNNERS[key](args, results_dir, work, section)
        else:
            external_section(key, args, results_dir, section)
    except SectionError as exc:
        section.status = "failed"
        section.body.append(f"Failed: {exc}")
    section.seconds = time.perf_counter() - started
    section.load_end = os.getloadavg()
    print(f"[{key}] {section.status} in {section.seconds:.0f} s", flush=True)
    return section


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--quick`` fills in the smaller defaults."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the ~10 minute version")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated")
    parser.add_argument("--page", type=Path, default=ROOT / "docs" / "RESULTS.md")
    parser.add_argument("--results-dir", type=Path, default=None, help="default: PAGE/../results")
    parser.add_argument("--nodes", type=int, default=8, help="peers per cluster")
    parser.add_argument("--bias-nodes", type=int, default=None, help="default --nodes")
    parser.add_argument("--bias-steps", type=int, default=None, help="quick 1000, full 3000")
    parser.add_argument("--bias-methods", default=",".join(BIAS_METHODS))
    parser.add_argument("--methods", default=",".join(LARGE_BATCH_METHODS))
    parser.add_argument("--batch-sizes", default=None, help="quick 256,512,full; full adds more")
    parser.add_argument("--seeds", type=int, default=None, help="quick 1, full 3")
    parser.add_argument("--epochs", type=float, default=None, help="default 30")
    parser.add_argument("--min-steps", type=int, default=150, help="iterations at least")
    parser.add_argument(
        "--reuse", action="store_true", help="keep large-batch runs of the JSON with these settings"
    )
    parser.add_argument("--split", default="label", choices=("label", "dirichlet", "iid"))
    parser.add_argument("--alpha", type=float, default=0.3, help="Dirichlet alpha (split)")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--base-lr", type=float, default=0.1, help="peak lr at global batch 256")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--cluster-timeout", type=float, default=CLUSTER_TIMEOUT_SECONDS)
    parser.add_argument("--script-timeout", type=float, default=None, help="quick 900, full 3600")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "bias_nodes": args.nodes,
        "bias_steps": 1000 if quick else 3000,
        "batch_sizes": "256,512,full" if quick else "64,256,512,1024,full",
        "seeds": 1 if quick else 3,
        "epochs": 30.0,
        "script_timeout": 900.0 if quick else 3600.0,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    unknown = [s for s in args.sections.split(",") if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if min(args.nodes, args.bias_nodes) < 2:
        parser.error("--nodes and --bias-nodes must be >= 2")
    args.command_line = shlex.join(["python", "benchmarks/report.py", *(argv or sys.argv[1:])])
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen sections and write the page, plots and JSON; returns the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    page = args.page.resolve()
    results_dir = (args.results_dir or page.parent / "results").resolve()
    results_dir.mkdir(parents=True, exist_ok=True)
    sections = []
    with tempfile.TemporaryDirectory(prefix="decentlam-report-") as tmp:
        for key in args.sections.split(","):
            sections.append(run_section(key, args, results_dir, Path(tmp)))
            write_page(sections, args, page)  # after every section: a crash keeps the rest
    print(f"wrote {page} and {results_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
