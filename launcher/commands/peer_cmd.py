"""``decentlam peer``: run one peer process from a manifest (what every container runs)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from launcher.errors import UsageError

logger = logging.getLogger(__name__)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError as exc:
        raise UsageError(f"environment variable {name}={value!r} is not an integer") from exc


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``peer`` subcommand."""
    parser = subparsers.add_parser(
        "peer",
        help="run one peer of a manifest",
        description="Run one peer: serve its parameters over gRPC, train with the manifest's "
        "algorithm, export Prometheus metrics. Environment overrides: DECENTLAM_MANIFEST, "
        "DECENTLAM_RANK, DECENTLAM_LOCAL_INDEX, DECENTLAM_OUT, DECENTLAM_BIND. Exit status: 0 "
        "finished or stopped by a signal, 1 gave up (peer-<r>.json says why), 2 could not "
        "start.",
    )
    parser.add_argument("--manifest", type=Path, help="manifest YAML (env DECENTLAM_MANIFEST)")
    parser.add_argument("--rank", type=int, help="this peer's rank (env DECENTLAM_RANK)")
    parser.add_argument("--host", help="find this peer's entry by host (with --port)")
    parser.add_argument(
        "--port",
        type=int,
        help="find this peer's entry by port (with --host, or among this machine's peers)",
    )
    parser.add_argument(
        "--local-index",
        type=int,
        help="with several peers of the manifest on this machine: which one, 0-based in rank "
        "order (env DECENTLAM_LOCAL_INDEX); without --rank the entry is found from this "
        "machine's addresses and names",
    )
    parser.add_argument("--out", type=Path, help="output directory (env DECENTLAM_OUT)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    parser.add_argument(
        "--blocking", action="store_true", help="no overlap of exchanges with backward"
    )
    parser.add_argument(
        "--max-staleness", type=int, help="staleness bound T; overrides the manifest's bound"
    )
    parser.add_argument(
        "--pipeline",
        action="store_true",
        help="with --max-staleness 1: mix the neighbours' previous-step vectors, so each "
        "exchange runs during the whole next step",
    )
    parser.add_argument(
        "--trace-exchanges",
        type=Path,
        metavar="DIR",
        help="append one JSON line per fetch and per served version to "
        "DIR/exchanges-<rank>.jsonl (peer/transport/grpc/trace.py)",
    )
    parser.add_argument("--bind", help="gRPC bind address (default: manifest host:port)")
    parser.add_argument("--dist-init-method", help="torch.distributed rendezvous for pmsgd")
    parser.add_argument(
        "--linger-seconds",
        type=float,
        default=60.0,
        help="after the last step, serve slower neighbours for at most this long",
    )
    parser.add_argument(
        "--progress-seconds",
        type=float,
        default=10.0,
        help="print a progress line this often (default 10; 0: only start and end lines)",
    )
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    parser.set_defaults(func=run)


def die_with_parent() -> None:
    """Under a launcher (``DECENTLAM_PARENT_PID`` set): get SIGTERM when it dies (Linux).

    Done here rather than in a ``preexec_fn``, which is unsafe in a multi-threaded parent. If
    the launcher is already gone by now, stop at once.
    """
    parent = os.environ.get("DECENTLAM_PARENT_PID")
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if str(os.getppid()) != parent:
        raise UsageError(f"launcher (pid {parent}) is gone: not starting")


def _print_line(line: str) -> None:
    print(f"decentlam: {line}", flush=True)


def run(args: argparse.Namespace) -> int:
    """Run the peer; exit 0 on success or a clean stop."""
    # torch's C++ logger prints multi-line backtraces for rendezvous retries and failures;
    # the peer reports those as one line itself (set before torch is imported). DEBUG keeps
    # them, and so does an explicit TORCH_CPP_LOG_LEVEL.
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
    from peer.process import PeerOptions, PeerSetupError, run_peer

    die_with_parent()
    manifest = args.manifest or os.environ.get("DECENTLAM_MANIFEST")
    if not manifest:
        raise UsageError("--manifest is required (or set DECENTLAM_MANIFEST)")
    if not Path(manifest).exists():
        raise UsageError(f"manifest {manifest} does not exist")
    rank = args.rank if args.rank is not None else _env_int("DECENTLAM_RANK")
    local_index = (
        args.local_index if args.local_index is not None else _env_int("DECENTLAM_LOCAL_INDEX")
    )
    if local_index is not None and local_index < 0:
        raise UsageError(f"--local-index must be >= 0, got {local_index}")
    if args.host is not None and args.port is None:
        raise UsageError("--host needs --port")
    if args.progress_seconds < 0:
        raise UsageError(f"--progress-seconds must be >= 0, got {args.progress_seconds}")
    if args.max_staleness is not None and args.max_staleness < 0:
        raise UsageError(f"--max-staleness must be >= 0, got {args.max_staleness}")
    out = args.out or Path(os.environ.get("DECENTLAM_OUT", "decentlam-out"))
    options = PeerOptions(
        manifest=Path(manifest),
        rank=rank,
        host=args.host,
        port=args.port,
        local_index=local_index,
        out_dir=out,
        resume=args.resume,
        blocking=args.blocking,
        max_staleness=args.max_staleness,
        pipeline=args.pipeline,
        bind=args.bind,
        dist_init_method=args.dist_init_method,
        linger_seconds=args.linger_seconds,
        report=None if args.quiet else _print_line,
        progress_seconds=args.progress_seconds,
        trace_exchanges=args.trace_exchanges,
    )
    try:
        result = run_peer(options)
    except PeerSetupError as exc:
        raise UsageError(str(exc)) from exc
    # grpc.aio objects finalised during interpreter shutdown can hang the process
    # (grpc/grpc#40447); the console entry point exits at once after a peer run.
    args.exit_immediately = True
    if result.failed:
        print(f"decentlam: error: peer {result.rank}: {result.stop_reason}", file=sys.stderr)
        return 1
    logger.info(
        "peer %d finished at step %d (loss %.4g, eval %s)",
        result.rank, result.steps, result.final_loss, result.eval,
    )  # fmt: skip
    return 0
