"""Entry point of the ``decentlam`` command.

Each subcommand lives in its own module under :mod:`launcher.commands` and exposes
``register(subparsers)``; this module only wires them together and turns user errors
(:class:`launcher.errors.UsageError` and :class:`topology.manifest.ManifestError`) into a
one-line message and exit code 2. Commands convert other validation errors of user input into
``UsageError`` themselves, so that a genuine bug still shows its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from launcher.errors import UsageError

logger = logging.getLogger(__name__)

# Subcommand modules, in the order they appear in ``decentlam --help``. A module that fails to
# import (for example an optional dependency missing) is skipped with a debug log line, so one
# broken subcommand never takes the whole CLI down.
COMMAND_MODULES: tuple[str, ...] = (
    "launcher.commands.topology_cmd",
    "launcher.commands.manifest_cmd",
    "launcher.commands.simulate_cmd",
    "launcher.commands.peer_cmd",
    "launcher.commands.launch_cmd",
    "launcher.commands.observability_cmd",
    "launcher.commands.deploy_cmd",
)

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level argument parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="decentlam",
        description="Decentralized (DecentLaM) training over gRPC: topologies, manifests, "
        "simulation and peer clusters.",
    )
    parser.add_argument(
        "--log-level", default="WARNING", help="logging level (DEBUG, INFO, WARNING, ...)"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module_name.startswith(exc.name):
                continue  # subcommand not present in this build
            raise
        module.register(subparsers)
    return parser


def _is_user_error(exc: BaseException) -> bool:
    try:
        from topology.manifest import ManifestError
    except ImportError:  # pragma: no cover - topology always ships with the CLI
        return isinstance(exc, UsageError)
    return isinstance(exc, UsageError | ManifestError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        result = args.func(args)
    except Exception as exc:
        if _is_user_error(exc):
            print(f"decentlam: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        raise
    return int(result or 0)


def console() -> None:  # pragma: no cover - the process entry point
    """Entry point of the ``decentlam`` executable and ``python -m launcher.cli``."""
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    console()
