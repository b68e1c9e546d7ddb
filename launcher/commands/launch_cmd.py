"""``decentlam launch``: a local cluster of real peer processes training together over gRPC.

Writes a loopback manifest with free ports (or uses ``--manifest``), spawns one ``decentlam
peer`` process per rank, shows the live cluster view of :mod:`launcher.view` (one row per peer:
step, loss, accuracy, exchange p50, blocked share, up/down, read from the peers' metrics
endpoints; plain lines when stdout is not a terminal), forwards Ctrl-C as a graceful stop, and
writes ``OUT/summary.json`` and its table. If a peer dies, the others go on (they mark it down
and mix on the live graph) and its log tail is printed; with ``--max-restarts N`` (torchrun's
convention) a dead peer is started again, up to N times per rank, and rejoins from its
neighbours. The exit status is 1 when a peer stayed down.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from launcher.cluster import LocalCluster, free_ports, on_free_ports
from launcher.errors import UsageError
from launcher.view import ClusterView

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.5


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``launch`` subcommand."""
    parser = subparsers.add_parser(
        "launch",
        help="run a local cluster of peer processes",
        description="Start N real peers on this machine (loopback gRPC) and train.",
    )
    parser.add_argument("--nodes", type=int, default=4, help="number of peers (default 4)")
    parser.add_argument("--graph", default="exponential", help="topology (default exponential)")
    parser.add_argument("--weights", default="auto", help="weights scheme (default auto)")
    parser.add_argument("--algorithm", default="decentlam", help="optimizer (default decentlam)")
    parser.add_argument("--task", default="digits", help="task (default digits)")
    parser.add_argument(
        "--task-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="task option, repeatable (e.g. model=cnn, alpha=0.3)",
    )
    parser.add_argument("--steps", type=int, default=300, help="iterations (default 300)")
    parser.add_argument("--batch-size", type=int, default=32, help="per-peer batch size")
    parser.add_argument("--lr", type=float, default=0.1, help="learning rate (default 0.1)")
    parser.add_argument("--momentum", type=float, default=0.9, help="momentum (default 0.9)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="weight decay")
    parser.add_argument(
        "--max-staleness",
        type=int,
        help="async bound T; overrides the manifest's (default: the manifest's, 0 if generated)",
    )
    parser.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint every N")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    parser.add_argument("--out", type=Path, default=Path("runs/latest"), help="output dir")
    parser.add_argument("--manifest", type=Path, help="use this manifest instead of writing one")
    parser.add_argument("--blocking", action="store_true", help="turn overlap off")
    parser.add_argument("--resume", action="store_true", help="continue from checkpoints")
    parser.add_argument("--timeout", type=float, default=3600.0, help="give up after N seconds")
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        metavar="N",
        help="restart a dead peer up to N times (it rejoins from its neighbours; default 0)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress view")
    parser.set_defaults(func=run)


def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UsageError(f"--task-option {text!r} is not KEY=VALUE")
    import yaml

    return key.strip(), yaml.safe_load(value)


def write_loopback_manifest(args: argparse.Namespace, path: Path) -> Path:
    """Write a loopback manifest with free ports from the launch flags."""
    from topology.manifest import dump_manifest, init_manifest

    if args.nodes < 1:
        raise UsageError(f"--nodes must be >= 1, got {args.nodes}")
    options = dict(_parse_option(o) for o in args.task_option)
    manifest = init_manifest(
        args.nodes,
        args.graph,
        weights=args.weights,
        algorithm=args.algorithm,
        task=args.task,
        task_options=options,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        max_staleness=args.max_staleness or 0,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
    )
    manifest = on_free_ports(manifest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_manifest(manifest))
    return path


def check_hosts_are_local(manifest: Any) -> None:
    """``launch`` starts every peer here: refuse a manifest whose hosts are other machines.

    Raises:
        UsageError: naming the peers whose hosts are not this machine.
    """
    from peer.transport import netif

    addresses = set().union(*netif.interface_addresses().values())
    local = {p.rank for p in netif.matching_entries(
        manifest.peers, addresses, netif.local_names(), netif.resolve
    )}  # fmt: skip
    remote = [p for p in manifest.peers if p.rank not in local]
    if remote:
        hosts = ", ".join(sorted({p.host for p in remote}))
        raise UsageError(
            f"peers {[p.rank for p in remote]} are on hosts that are not this machine "
            f"({hosts}): launch starts every peer locally; run `decentlam peer --manifest M` "
            "on each host (see `decentlam deploy`)"
        )


def run(args: argparse.Namespace) -> int:
    """Run the cluster to completion; returns the exit status."""
    from peer.training.trainer import summarize
    from topology.manifest import load_manifest

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.manifest is not None:
        if not args.manifest.exists():
            raise UsageError(f"manifest {args.manifest} does not exist")
        manifest_path = args.manifest.resolve()
    else:
        manifest_path = write_loopback_manifest(args, out / "manifest.yaml").resolve()
    manifest = load_manifest(manifest_path)
    check_hosts_are_local(manifest)
    peer_args: list[str] = []
    if args.blocking:
        peer_args.append("--blocking")
    if args.resume:
        peer_args.append("--resume")
    if args.max_staleness is not None and args.manifest is not None:
        peer_args += ["--max-staleness", str(args.max_staleness)]
    if manifest.training.algorithm == "pmsgd":
        host = manifest.peers[0].address.rsplit(":", 1)[0]
        peer_args += ["--dist-init-method", f"tcp://{host}:{free_ports(1)[0]}"]
    cluster = LocalCluster(manifest_path, out.resolve(), peer_args)
    print(
        f"decentlam: {manifest.world_size} peers, {manifest.topology.graph} graph, "
        f"{manifest.training.algorithm}, task {manifest.training.task}; output in {out}"
    )
    cluster.start()
    for peer in cluster.peers:
        if peer.metrics_url:
            print(f"  peer {peer.rank}: metrics {peer.metrics_url}  log {peer.log_path}")
    view = ClusterView(manifest.world_size, manifest.training.steps, quiet=args.quiet)
    status = _watch(cluster, view, args)
    results = cluster.results()
    if results:
        summary = summarize(results)
        summary["supervision"] = supervision_summary(cluster, results)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
        view.print_summary(summary, out / "summary.json")
    return status


def supervision_summary(cluster: LocalCluster, results: dict[int, Any]) -> dict[str, Any]:
    """Peers down, restarts, rejoin times and membership changes (``summary.json``)."""
    rejoins = {
        str(rank): r["membership"]["rejoins"]
        for rank, r in sorted(results.items())
        if r.get("membership", {}).get("rejoins")
    }
    return {
        "peers_down": sorted({e["rank"] for e in cluster.events if e["event"] == "down"}),
        "restarts": {str(rank): n for rank, n in sorted(cluster.restarts.items())},
        "events": list(cluster.events),
        "rejoins": rejoins,
        "rejoin_seconds": {rank: [x["seconds"] for x in r] for rank, r in rejoins.items()},
        "membership_changes": {
            str(rank): r.get("membership", {}).get("membership_changes", 0)
            for rank, r in sorted(results.items())
        },
    }


def _supervise(cluster: LocalCluster, max_restarts: int) -> None:
    """Restart dead peers while they have restarts left; record the others as down."""
    for peer in cluster.dead():
        code = peer.process.returncode
        used = cluster.restarts.get(peer.rank, 0)
        if used < max_restarts:
            print(
                f"\ndecentlam: peer {peer.rank} exited with status {code}; restarting it "
                f"({used + 1}/{max_restarts}), it rejoins from its neighbours",
                file=sys.stderr,
            )
            cluster.restart(peer.rank)
        else:
            cluster.give_up(peer.rank)
            print(
                f"\ndecentlam: peer {peer.rank} exited with status {code}; the others go on "
                f"without it. Last lines of {peer.log_path}:",
                file=sys.stderr,
            )
            print(cluster.log_tail(peer.rank), file=sys.stderr)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _watch(cluster: LocalCluster, view: ClusterView, args: argparse.Namespace) -> int:
    # SIGTERM to the launcher (e.g. from a job scheduler) stops the peers like Ctrl-C does.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        with view:
            return _watch_loop(cluster, view, args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _watch_loop(cluster: LocalCluster, view: ClusterView, args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.timeout
    try:
        while cluster.running() or cluster.dead():
            _supervise(cluster, getattr(args, "max_restarts", 0))
            if time.monotonic() > deadline:
                cluster.stop()
                print(f"\ndecentlam: timed out after {args.timeout} s", file=sys.stderr)
                return 1
            if not view.quiet:
                view.update(cluster.progress())
            time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        print("\ndecentlam: stopping peers (checkpointing)...", file=sys.stderr)
        cluster.signal_all(signal.SIGTERM)
        cluster.wait(60.0)
        cluster.stop(grace_seconds=5.0)
        return 130
    down = sorted({e["rank"] for e in cluster.events if e["event"] == "down"})
    if down:
        print(f"decentlam: peers {down} stayed down; the others finished", file=sys.stderr)
        return 1
    return 0
