"""``decentlam manifest init|check|schema``: generate, validate or describe cluster manifests.

``init`` writes a manifest for N peers (on loopback, or spread over ``--hosts``) with a
chosen graph and training settings, under a ``# yaml-language-server: $schema=...`` line for
editors; ``check`` loads one, builds its topology and prints a summary (peers, graph, rho,
digest); ``schema`` prints the JSON Schema of the manifest. Invalid input exits with status 2
and a one-line ``decentlam: error: <field path>: <problem>`` message.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from launcher.commands.topology_cmd import parse_params
from launcher.errors import UsageError
from topology.graphs import GRAPH_NAMES
from topology.manifest import (
    ALGORITHMS,
    SCHEMA_FILE,
    Manifest,
    ManifestError,
    dump_manifest,
    init_manifest,
    load_manifest,
    manifest_json_schema,
    parse_manifest,
)

logger = logging.getLogger(__name__)

# ``manifest init`` flags that map one-to-one onto fields of the training section.
_TRAINING_FLAGS: tuple[tuple[str, type, str], ...] = (
    ("algorithm", str, f"optimizer: {', '.join(ALGORITHMS)} (default decentlam)"),
    ("task", str, "builtin task (digits, linreg, ...) or package.module:factory"),
    ("steps", int, "training steps (default 100)"),
    ("lr", float, "learning rate (default 0.1)"),
    ("momentum", float, "momentum beta in [0, 1) (default 0.9)"),
    ("batch_size", int, "per-peer batch size (default 32)"),
    ("weight_decay", float, "weight decay (default 0)"),
    ("seed", int, "random seed (default 0)"),
    ("global_average_every", int, "exact global average every H steps (default 0 = never)"),
    ("eval_every", int, "evaluate every this many steps (default 0 = only at the end)"),
    ("checkpoint_every", int, "checkpoint every this many steps (default 0 = only at the end)"),
)


def register(subparsers: Any) -> None:
    """Add ``manifest init``, ``manifest check`` and ``manifest schema`` to the CLI."""
    parser = subparsers.add_parser("manifest", help="create or validate cluster manifests")
    commands = parser.add_subparsers(dest="manifest_command", metavar="SUBCOMMAND")
    parser.set_defaults(func=lambda args: _usage(parser))

    init = commands.add_parser(
        "init",
        help="write a valid manifest",
        description="Write a valid manifest: N peers on 127.0.0.1 (or spread over --hosts, "
        "--peers-per-host each, consecutive ports from --base-port), a graph, and training "
        "settings.",
    )
    init.add_argument("--nodes", "-n", type=int, required=True, help="number of peers")
    init.add_argument("--graph", required=True, help=f"graph: {', '.join(GRAPH_NAMES)}")
    init.add_argument(
        "--param", action="append", default=[], metavar="KEY=VALUE", help="graph parameter"
    )
    init.add_argument(
        "--weights",
        default="auto",
        choices=("auto", "uniform", "metropolis"),
        help="weight scheme (default auto)",
    )
    init.add_argument("--hosts", help="comma-separated hosts (default 127.0.0.1)")
    init.add_argument("--peers-per-host", type=int, help="peers on each host (default: spread)")
    init.add_argument("--base-port", type=int, default=50051, help="first gRPC port per host")
    init.add_argument(
        "--base-metrics-port", type=int, default=9100, help="first metrics port per host"
    )
    init.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    for name, kind, text in _TRAINING_FLAGS:
        init.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, help=text)
    init.add_argument(
        "--task-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="task option (training.task_options; YAML values, e.g. hidden=256, alpha=null)",
    )
    init.add_argument(
        "--exchange",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="exchange setting (the manifest's exchange section; YAML values, e.g. "
        "wire_codec=top-byte-huffman, fetch_deadline_seconds=60)",
    )
    init.add_argument("--output", "-o", default="-", help="output file (default: stdout)")
    init.add_argument("--force", action="store_true", help="overwrite an existing output file")
    init.add_argument(
        "--schema",
        metavar="PATH_OR_URL",
        help="JSON Schema named on the first line for editors (default: the schema installed "
        "with decentlam, relative to the output file); 'none' writes no such line",
    )
    init.set_defaults(func=run_init)

    check = commands.add_parser(
        "check",
        help="validate a manifest and print a summary",
        description="Validate a manifest (schema, addresses, topology, weights, files) and "
        "print a summary.",
    )
    check.add_argument("path", help="manifest file")
    check.add_argument(
        "--no-file-checks", action="store_true", help="do not require token/TLS files to exist"
    )
    check.add_argument("--json", action="store_true", help="print the summary as JSON")
    check.set_defaults(func=run_check)

    schema = commands.add_parser(
        "schema",
        help="print the JSON Schema of manifests",
        description="Print the JSON Schema of a manifest (types, ranges, defaults, choices), "
        "for editors and other tools. Checks that span fields (ranks, addresses, topology) are "
        "made by 'manifest check' only.",
    )
    schema.add_argument("--output", "-o", default="-", help="output file (default: stdout)")
    schema.set_defaults(func=run_schema)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def run_init(args: argparse.Namespace) -> int:
    """Handler of ``manifest init``."""
    overrides = {
        name: getattr(args, name)
        for name, _, _ in _TRAINING_FLAGS
        if getattr(args, name) is not None
    }
    if args.task_option:
        overrides["task_options"] = parse_params(args.task_option, "--task-option")
    hosts = [h for h in args.hosts.split(",")] if args.hosts else None
    try:
        manifest = init_manifest(
            args.nodes,
            args.graph,
            hosts=hosts,
            peers_per_host=args.peers_per_host,
            base_port=args.base_port,
            base_metrics_port=args.base_metrics_port,
            graph_params=parse_params(args.param),
            weights=args.weights,
            device=args.device,
            **overrides,
        )
    except ManifestError:
        raise
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.exchange:
        data = manifest.to_dict()
        data["exchange"].update(parse_params(args.exchange, "--exchange"))
        manifest = parse_manifest(data, check_files=False)  # ManifestError names the field
    output = None if args.output == "-" else Path(args.output)
    text = dump_manifest(manifest, schema_ref=_schema_ref(args.schema, output))
    if output is None:
        sys.stdout.write(text)
        return 0
    if output.exists() and not args.force:
        raise UsageError(f"{output} already exists (use --force to overwrite)")
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write {output}: {exc.strerror or exc}") from None
    topology = manifest.build_topology()
    print(
        f"wrote {output}: {manifest.world_size} peers, graph {manifest.topology.graph}, "
        f"weights {topology.weights}, rho {topology.consensus_rate():.4f}, "
        f"algorithm {manifest.training.algorithm}"
    )
    return 0


def _schema_ref(choice: str | None, output: Path | None) -> str | None:
    """What ``init`` names on its ``$schema`` line: ``--schema``, else the installed schema."""
    if choice is not None:
        return None if choice.lower() == "none" else choice
    if output is None:
        return str(SCHEMA_FILE)
    directory = output.resolve().parent
    if os.path.commonpath([directory, SCHEMA_FILE]) == directory.anchor:
        return str(SCHEMA_FILE)  # nothing in common but the root: a relative path helps no one
    return os.path.relpath(SCHEMA_FILE, directory)


def render_schema() -> str:
    """The JSON Schema as ``manifest schema`` prints it (and as the package ships it)."""
    return json.dumps(manifest_json_schema(), indent=2) + "\n"


def run_schema(args: argparse.Namespace) -> int:
    """Handler of ``manifest schema``."""
    text = render_schema()
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    try:
        Path(args.output).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write {args.output}: {exc.strerror or exc}") from None
    return 0


def summarize(manifest: Manifest) -> dict[str, Any]:
    """The summary ``manifest check`` prints, as JSON-ready data."""
    topology = manifest.build_topology()
    training = manifest.training
    return {
        "path": None if manifest.source is None else str(manifest.source),
        "version": manifest.version,
        "digest": manifest.digest(),
        "world_size": manifest.world_size,
        "hosts": sorted({p.host for p in manifest.peers}),
        "peers": [p.to_dict() for p in manifest.peers],
        "graph": manifest.topology.graph,
        "params": dict(manifest.topology.params),
        "weights": topology.weights,
        "time_varying": topology.is_time_varying,
        "period": topology.period,
        "rho": topology.consensus_rate(),
        "spectral_gap": topology.spectral_gap(),
        "per_iteration_rate": topology.per_iteration_rate(),
        "messages_per_peer": topology.messages_per_peer(0),
        "algorithm": training.algorithm,
        "task": training.task,
        "steps": training.steps,
        "lr": training.lr,
        "momentum": training.momentum,
        "batch_size": training.batch_size,
        "security": {
            "token": manifest.security.token_file is not None,
            "tls": manifest.security.tls is not None,
            "mutual_tls": bool(manifest.security.tls and manifest.security.tls.mutual),
        },
    }


def render_summary(data: dict[str, Any]) -> str:
    """Human-readable form of :func:`summarize`."""
    rate = f"rho {data['rho']:.4f}, spectral gap {data['spectral_gap']:.4f}"
    if data["time_varying"]:
        rate = (
            f"period {data['period']}, period rate {data['rho']:.4f} "
            f"(per iteration {data['per_iteration_rate']:.4f})"
        )
    params = ", ".join(f"{k}={v}" for k, v in data["params"].items())
    security = data["security"]
    tls = ("mutual TLS" if security["mutual_tls"] else "TLS") if security["tls"] else "no TLS"
    lines = [
        f"{data['path'] or 'manifest'}: OK (version {data['version']}, "
        f"digest {data['digest'][:16]})",
        f"peers: {data['world_size']} on {len(data['hosts'])} host(s)",
    ]
    for peer in data["peers"]:
        host = f"[{peer['host']}]" if ":" in peer["host"] else peer["host"]
        metrics = peer["metrics_port"] if peer["metrics_port"] is not None else "-"
        lines.append(
            f"  {peer['rank']:>4}  {peer['name']:<12} {host}:{peer['port']:<6} "
            f"metrics {metrics!s:<6} device {peer['device']}"
        )
    m = data["messages_per_peer"]
    lines += [
        f"topology: {data['graph']}"
        + (f" ({params})" if params else "")
        + f", weights {data['weights']}, {rate}, messages per peer {m['min']}..{m['max']}",
        f"training: {data['algorithm']} on {data['task']}, {data['steps']} steps, "
        f"lr {data['lr']:g}, momentum {data['momentum']:g}, batch {data['batch_size']}",
        f"security: token {'yes' if security['token'] else 'no'}, {tls}",
    ]
    return "\n".join(lines)


def run_check(args: argparse.Namespace) -> int:
    """Handler of ``manifest check``."""
    manifest = load_manifest(args.path, check_files=not args.no_file_checks)
    data = summarize(manifest)
    print(json.dumps(data, indent=2) if args.json else render_summary(data))
    return 0
