"""``decentlam topology show``: inspect a graph, its mixing matrix and its communication cost.

Prints, for one iteration ``K``: each peer's in-neighbours (with weights) and out-neighbours,
the mixing matrix (in full for n <= 16, else a summary), the consensus rate ``rho`` and
spectral gap, the period rate for time-varying graphs, and the messages and bytes each peer
sends and receives per iteration for a model of ``--model-bytes`` bytes. ``--json`` prints the
same as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

import numpy as np
import yaml

from launcher.errors import UsageError
from topology.graphs import GRAPH_ALIASES, GRAPH_NAMES
from topology.mixing import WEIGHT_SCHEMES
from topology.spectral import consensus_rate
from topology.topology import Topology, make_topology

logger = logging.getLogger(__name__)

# 11 million float32 parameters (about ResNet-18): a typical model for the bytes estimate.
DEFAULT_MODEL_BYTES = 4 * 11_000_000
FULL_MATRIX_MAX_NODES = 16
TEXT_MAX_PEER_LINES = 64


def register(subparsers: Any) -> None:
    """Add ``topology show`` to the CLI."""
    parser = subparsers.add_parser("topology", help="inspect communication topologies")
    commands = parser.add_subparsers(dest="topology_command", metavar="SUBCOMMAND")
    parser.set_defaults(func=lambda args: _usage(parser))
    show = commands.add_parser(
        "show",
        help="neighbours, mixing matrix, consensus rate and traffic of a graph",
        description="Show neighbours, mixing matrix, consensus rate (rho), spectral gap and "
        "per-peer traffic of a topology at one iteration.",
    )
    show.add_argument(
        "--graph",
        required=True,
        help=f"graph name: {', '.join(GRAPH_NAMES)} (aliases: {', '.join(GRAPH_ALIASES)})",
    )
    show.add_argument("--nodes", "-n", type=int, required=True, help="number of peers")
    show.add_argument(
        "--weights",
        default="auto",
        choices=[w for w in WEIGHT_SCHEMES if w != "explicit"],
        help="weight scheme (default auto: metropolis for undirected graphs, else uniform)",
    )
    show.add_argument("--iteration", "-k", type=int, default=0, help="iteration K (default 0)")
    show.add_argument(
        "--model-bytes",
        type=int,
        default=DEFAULT_MODEL_BYTES,
        help=f"bytes of one exchanged vector (default {DEFAULT_MODEL_BYTES}: 11M float32)",
    )
    show.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="graph parameter, e.g. rows=2, degree=3, seed=1, p=0.3, "
        "edges='[[0,1],[1,2]]' (repeatable; values are parsed as YAML)",
    )
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(func=run_show)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def parse_params(items: list[str], flag: str = "--param") -> dict[str, Any]:
    """Parse ``KEY=VALUE`` strings; values are YAML scalars or lists (``2``, ``0.5``, ``[..]``).

    ``flag`` is the option they came from, named in the error of a malformed one.
    """
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{flag}: expected KEY=VALUE, got {item!r}")
        try:
            params[key.strip().replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UsageError(f"{flag} {key}: cannot parse value {value!r}") from None
    return params


def build(args: argparse.Namespace) -> Topology:
    """Build (and validate, warning on asymmetry) the topology the arguments describe."""
    if args.nodes < 1:
        raise UsageError(f"--nodes: must be >= 1, got {args.nodes}")
    try:
        return make_topology(args.graph, args.nodes, args.weights, **parse_params(args.param))
    except ValueError as exc:  # unknown graph, bad parameter, invalid weights
        hint = ""
        if args.weights == "uniform" and "sums to" in str(exc):
            hint = " (uniform weights are doubly stochastic only on regular graphs; "
            hint += "try --weights metropolis)"
        raise UsageError(f"{exc}{hint}") from None


def describe_topology(topology: Topology, k: int, model_bytes: int) -> dict[str, Any]:
    """Everything ``topology show`` prints, as JSON-ready data."""
    W = topology.mixing_matrix(k)
    n = topology.n
    neighbors = {}
    for rank in range(n):
        view = topology.view(rank, k)
        neighbors[str(rank)] = {
            "self": view.self_weight,
            "in": {str(j): w for j, w in view.in_neighbors.items()},
            "out": list(view.out_neighbors),
            "bytes_sent": len(view.out_neighbors) * model_bytes,
            "bytes_received": len(view.in_neighbors) * model_bytes,
        }
    messages = topology.messages_per_peer(k)
    rho = consensus_rate(W)
    data: dict[str, Any] = {
        "graph": topology.graph.name,
        "nodes": n,
        "params": dict(topology.graph.params),
        "weights": topology.weights,
        "iteration": k,
        "undirected": topology.graph.is_undirected,
        "symmetric": bool(np.abs(W - W.T).max() <= 1e-9),
        "time_varying": topology.is_time_varying,
        "period": topology.period,
        "rho": rho,
        "spectral_gap": 1.0 - rho,
        "period_rate": topology.consensus_rate() if topology.is_time_varying else None,
        "per_iteration_rate": topology.per_iteration_rate(),
        "neighbors": neighbors,
        "messages_per_peer": messages,
        "model_bytes": model_bytes,
        "bytes_per_peer": {
            "sent_max": messages["max"] * model_bytes,
            "sent_mean": messages["mean"] * model_bytes,
            "received_max": messages["max_received"] * model_bytes,
            "received_mean": messages["mean_received"] * model_bytes,
        },
        "matrix_summary": {
            "nnz": int(np.count_nonzero(W)),
            "min_positive_weight": float(W[W > 0].min()),
            "max_weight": float(W.max()),
            "max_row_sum_error": float(np.abs(W.sum(axis=1) - 1).max()),
            "max_col_sum_error": float(np.abs(W.sum(axis=0) - 1).max()),
        },
    }
    if n <= FULL_MATRIX_MAX_NODES:
        data["mixing_matrix"] = W.tolist()
    return data


def _mib(value: float) -> str:
    return f"{value / 2**20:,.1f} MiB"


def render_text(data: dict[str, Any]) -> str:
    """Human-readable form of :func:`describe_topology`'s output."""
    n, k = data["nodes"], data["iteration"]
    params = ", ".join(f"{key}={value}" for key, value in data["params"].items() if key != "edges")
    kind = "time-varying" if data["time_varying"] else "static"
    lines = [
        f"graph {data['graph']}" + (f" ({params})" if params else "") + f", {n} peers, "
        f"weights {data['weights']}, iteration {k}",
        f"{kind}, period {data['period']}, "
        f"{'undirected' if data['undirected'] else 'directed'}, "
        f"W {'symmetric' if data['symmetric'] else 'NOT symmetric'}",
        "",
        f"{'rank':>4}  {'self':>6}  {'in-neighbours (weight)':<40}  out-neighbours",
    ]
    ranks = list(data["neighbors"].items())
    for rank, info in ranks[:TEXT_MAX_PEER_LINES]:
        ins = ", ".join(f"{j} ({w:.4f})" for j, w in info["in"].items()) or "-"
        outs = ", ".join(map(str, info["out"])) or "-"
        lines.append(f"{rank:>4}  {info['self']:6.4f}  {ins:<40}  {outs}")
    if len(ranks) > TEXT_MAX_PEER_LINES:
        lines.append(f"  ... {len(ranks) - TEXT_MAX_PEER_LINES} more peers (use --json)")
    lines.append("")
    if "mixing_matrix" in data:
        lines.append(f"mixing matrix W at iteration {k} (x_i <- sum_j W[i, j] x_j):")
        lines.append("      " + " ".join(f"{j:>6}" for j in range(n)))
        for i, row in enumerate(data["mixing_matrix"]):
            cells = " ".join("     ." if w == 0 else f"{w:6.4f}" for w in row)
            lines.append(f"{i:>4}  {cells}")
    else:
        s = data["matrix_summary"]
        lines.append(
            f"mixing matrix W at iteration {k}: {n} x {n}, {s['nnz']} nonzeros, weights "
            f"{s['min_positive_weight']:.4g}..{s['max_weight']:.4g}, max row/col sum error "
            f"{s['max_row_sum_error']:.1e}/{s['max_col_sum_error']:.1e}"
        )
    lines += ["", f"rho (consensus rate) of W:   {data['rho']:.4f}"]
    lines.append(f"spectral gap 1 - rho:        {data['spectral_gap']:.4f}")
    if data["time_varying"]:
        lines.append(
            f"period rate (product of {data['period']}):  {data['period_rate']:.4f}  "
            f"(per iteration {data['per_iteration_rate']:.4f})"
        )
    m, b = data["messages_per_peer"], data["bytes_per_peer"]
    lines += [
        "",
        f"per peer per iteration: sends {m['min']}..{m['max']} messages (mean {m['mean']:.2f}), "
        f"receives {m['min_received']}..{m['max_received']} (mean {m['mean_received']:.2f}); "
        f"{m['total']} messages in all",
        f"bytes per peer per iteration ({data['model_bytes']:,} B per vector): "
        f"sent max {_mib(b['sent_max'])}, mean {_mib(b['sent_mean'])}; "
        f"received max {_mib(b['received_max'])}, mean {_mib(b['received_mean'])}",
    ]
    return "\n".join(lines)


def run_show(args: argparse.Namespace) -> int:
    """Handler of ``topology show``."""
    if args.iteration < 0:
        raise UsageError(f"--iteration: must be >= 0, got {args.iteration}")
    if args.model_bytes < 0:
        raise UsageError(f"--model-bytes: must be >= 0, got {args.model_bytes}")
    data = describe_topology(build(args), args.iteration, args.model_bytes)
    print(json.dumps(data, indent=2) if args.json else render_text(data))
    return 0
