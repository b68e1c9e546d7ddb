"""``decentlam simulate``: the slides' numerical verification, in-process and vectorised.

Runs several methods on one built-in problem over one topology with the simulator of
:mod:`peer.simulation.simulator`, prints a table (final error ``sum_i ||x_i - x*||^2``, iterations
to reach
1.1x of the method's floor, final consensus distance; test accuracy for the digits problems)
and, with ``--out DIR``, writes ``DIR/result.json`` (config, curves, final numbers) and
``DIR/error.png`` (log-scale error -- or loss -- vs iteration, one line per method).

The linreg defaults reproduce the paper's picture: DmSGD is fastest to its floor but the floor
sits ~100x above DecentLaM's (beta = 0.9); DSGD reaches the low floor slowly; DecentLaM is as
fast as DmSGD and as accurate as DSGD; PmSGD converges to ``x*``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from launcher.errors import UsageError

logger = logging.getLogger(__name__)

DEFAULT_ALGORITHMS = "dsgd,dmsgd,decentlam,pmsgd"
# Per-problem defaults: (learning rate, steps). Chosen so the default run finishes in seconds.
PROBLEM_DEFAULTS = {
    "linreg": (0.005, 3000),
    "digits-logreg": (0.2, 1000),
    "digits-mlp": (0.2, 1000),
}


def register(subparsers: Any) -> None:
    """Add the ``simulate`` subcommand to the CLI."""
    parser = subparsers.add_parser(
        "simulate",
        help="compare decentralized methods on a built-in problem (in-process simulator)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    parser.add_argument("--problem", default="linreg", help="linreg, digits-logreg or digits-mlp")
    parser.add_argument("--nodes", type=int, default=8, help="number of simulated peers")
    parser.add_argument("--graph", default="ring", help="topology name (ring, exponential, ...)")
    parser.add_argument("--weights", default="auto", help="auto, metropolis or uniform")
    parser.add_argument("--algorithms", default=DEFAULT_ALGORITHMS, help="comma-separated")
    parser.add_argument("--steps", type=int, default=None, help="iterations (problem default)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (problem default)")
    parser.add_argument("--schedule", default=None, help="lr schedule, e.g. cosine:warmup_steps=50")
    parser.add_argument("--momentum", type=float, default=0.9, help="beta")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--global-average-every", type=int, default=0, help="H (0: never)")
    parser.add_argument("--batch-size", type=int, default=None, help="per node; default full")
    parser.add_argument("--heterogeneity", type=float, default=1.0, help="linreg data spread")
    parser.add_argument("--alpha", type=float, default=0.5, help="digits Dirichlet alpha")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    parser.add_argument("--out", default=None, help="directory for result.json and error.png")
    parser.set_defaults(func=run)


def _validate(args: argparse.Namespace) -> list[str]:
    from peer.algorithms.rules import ALGORITHMS
    from peer.simulation.problems import PROBLEMS

    if args.problem not in PROBLEMS:
        raise UsageError(f"unknown problem {args.problem!r}; choose one of: {', '.join(PROBLEMS)}")
    names = [a.strip().lower() for a in args.algorithms.split(",") if a.strip()]
    unknown = [a for a in names if a not in ALGORITHMS]
    if not names or unknown:
        raise UsageError(
            f"unknown algorithm(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from: {', '.join(ALGORITHMS)}"
        )
    default_lr, default_steps = PROBLEM_DEFAULTS[args.problem]
    args.lr = default_lr if args.lr is None else args.lr
    args.steps = default_steps if args.steps is None else args.steps
    checks = (
        (args.nodes >= 2, "--nodes must be >= 2"),
        (args.steps >= 1, "--steps must be >= 1"),
        (args.lr > 0, "--lr must be > 0"),
        (0 <= args.momentum < 1, "--momentum must be in [0, 1)"),
        (args.batch_size is None or args.batch_size >= 1, "--batch-size must be >= 1"),
        (args.global_average_every >= 0, "--global-average-every must be >= 0"),
        (args.alpha > 0, "--alpha must be > 0"),
    )
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    return names


def _build(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    from peer.algorithms.schedules import make_schedule
    from peer.simulation.problems import make_problem
    from topology import make_topology

    try:
        topology = make_topology(args.graph, args.nodes, weights=args.weights)
        if args.problem == "linreg":
            problem = make_problem(
                "linreg",
                args.nodes,
                args.seed,
                dim=10,
                samples_per_node=200,
                heterogeneity=args.heterogeneity,
            )
        else:
            problem = make_problem(args.problem, args.nodes, args.seed, alpha=args.alpha)
        schedule = make_schedule(args.schedule, args.lr, args.steps)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return topology, problem, schedule


def _consensus_rate(topology: Any) -> float | None:
    try:
        from topology.spectral import consensus_rate

        return float(consensus_rate(topology.mixing_matrix(0)))
    except (ImportError, AttributeError, ValueError):
        return None


def _fmt(value: float | None, spec: str = ".3e") -> str:
    return "-" if value is None else format(value, spec)


def _table(rows: list[dict[str, Any]], digits: bool) -> str:
    if digits:
        header = ["method", "final loss", "test acc (avg model)", "min node acc", "consensus"]
        body = [
            [
                r["algorithm"],
                _fmt(r["final_loss"], ".4f"),
                _fmt(r.get("test_accuracy"), ".4f"),
                _fmt(r.get("node_test_accuracy_min"), ".4f"),
                _fmt(r["final_consensus"]),
            ]
            for r in rows
        ]
    else:
        # Floors relative to DecentLaM's (the paper's comparison), when it was run.
        ref = next((r["final_error"] for r in rows if r["algorithm"] == "decentlam"), None)
        header = ["method", "final error", "iters to 1.1x floor", "consensus", "/ decentlam"]
        body = [
            [
                r["algorithm"],
                _fmt(r["final_error"]),
                str(r["iterations_to_floor"] or "-"),
                _fmt(r["final_consensus"]),
                _fmt(
                    r["final_error"] / ref if ref and r["final_error"] is not None else None, ".3g"
                ),
            ]
            for r in rows
        ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body, strict=True)]
    lines = [
        "  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip()
        for line in [header, ["-" * w for w in widths], *body]
    ]
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: Path, ylabel: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        curve = r["error"] if r["error"] else r["loss"]
        ax.plot(r["steps"], [max(v, 1e-300) for v in curve], label=r["algorithm"])
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _warn_if_unstable(topology: Any, args: argparse.Namespace) -> None:
    """Say so when DecentLaM's momentum makes it diverge on this graph (the manifest refuses it;
    the simulator runs it anyway, to show what happens)."""
    from topology.manifest_specs import decentlam_divergence

    if not 0.0 < args.momentum < 1.0:
        return
    diverges = decentlam_divergence(topology, args.momentum, args.global_average_every)
    if diverges:
        growth, limit = diverges
        print(
            f"warning: DecentLaM with momentum {args.momentum:g} diverges on {args.graph!r} with "
            f"{args.nodes} peers (disagreement x{growth:.3f} per iteration at any lr; stable up to "
            f"momentum {limit:.2f}; docs/algorithms.md); a manifest with these settings is refused",
            file=sys.stderr,
        )


def run(args: argparse.Namespace) -> int:
    """Run the comparison; print the table; write ``result.json`` and ``error.png``."""
    import torch

    from peer.simulation.simulator import Simulator

    names = _validate(args)
    topology, problem, schedule = _build(args)
    if "decentlam" in names:
        _warn_if_unstable(topology, args)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    record_every = max(1, args.steps // 1000)
    rows = []
    for name in names:
        started = time.perf_counter()
        sim = Simulator(
            name,
            topology,
            problem,
            schedule=schedule,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
            global_average_every=args.global_average_every,
            batch_size=args.batch_size,
            dtype=dtype,
            seed=args.seed,
        )
        result = sim.run(args.steps, record_every=record_every)
        rows.append(
            {
                "algorithm": name,
                "final_error": result.final_error,
                "iterations_to_floor": result.iterations_to_floor(),
                "final_consensus": result.consensus[-1],
                "final_loss": result.loss[-1],
                "diverged": result.diverged,
                **result.metrics,
                "seconds": time.perf_counter() - started,
                "steps": result.steps,
                "error": result.error,
                "consensus": result.consensus,
                "loss": result.loss,
            }
        )
    digits = args.problem != "linreg"
    rho = _consensus_rate(topology)
    print(
        f"problem={args.problem} nodes={args.nodes} graph={args.graph} rho={_fmt(rho, '.4f')} "
        f"lr={args.lr} momentum={args.momentum} steps={args.steps} "
        f"batch={args.batch_size or 'full'}"
    )
    print(_table(rows, digits))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in vars(args).items() if k != "func"}
        config["algorithms"] = names
        config["consensus_rate"] = rho
        if not digits:
            config["heterogeneity_b2"] = problem.heterogeneity_b2()
        (out / "result.json").write_text(json.dumps({"config": config, "methods": rows}, indent=1))
        ylabel = "training loss (averaged model)" if digits else "sum_i ||x_i - x*||^2"
        _plot(rows, out / "error.png", ylabel, f"{args.problem}, {args.nodes} nodes, {args.graph}")
        print(f"wrote {out / 'result.json'} and {out / 'error.png'}")
    return 0
