"""``decentlam prometheus-config`` and ``decentlam compose``: deployment files from a manifest.

``prometheus-config`` writes a Prometheus scrape configuration with one target per peer
(``host:metrics_port``, labels ``rank`` and ``peer``); ``compose`` writes a docker-compose file
running every peer in its own container plus Prometheus and Grafana. Both print to stdout
unless ``-o FILE`` is given, and overwrite FILE: these files are generated, never hand-edited.
The generators themselves are the pure functions of :mod:`launcher.deploy`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from launcher import deploy
from launcher.errors import UsageError

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``prometheus-config`` and ``compose`` subcommands."""
    prom = subparsers.add_parser(
        "prometheus-config",
        help="write a Prometheus scrape config for a manifest's peers",
        description="Write a Prometheus configuration scraping every peer of a manifest "
        "(one job, one target host:metrics_port per peer, labels rank and peer).",
    )
    prom.add_argument("--manifest", type=Path, required=True, help="cluster manifest YAML")
    prom.add_argument("-o", "--output", type=Path, help="output file (default: stdout)")
    prom.add_argument(
        "--scrape-interval",
        default=deploy.DEFAULT_SCRAPE_INTERVAL,
        help=f"Prometheus duration (default {deploy.DEFAULT_SCRAPE_INTERVAL})",
    )
    prom.add_argument(
        "--job-name", default=deploy.DEFAULT_JOB_NAME, help="job label (default decentlam)"
    )
    prom.set_defaults(func=run_prometheus_config)

    compose = subparsers.add_parser(
        "compose",
        help="write a docker-compose file for a manifest (peers, Prometheus, Grafana)",
        description="Write a docker-compose file: one container per peer of the manifest "
        "(every peer needs its own host name, used as its service alias), plus Prometheus "
        "and Grafana with the dashboards under deploy/grafana.",
    )
    compose.add_argument("--manifest", type=Path, required=True, help="cluster manifest YAML")
    compose.add_argument("-o", "--output", type=Path, help="output file (default: stdout)")
    compose.add_argument(
        "--image",
        default=deploy.DEFAULT_IMAGE,
        help=f"peer image (default {deploy.DEFAULT_IMAGE}, built from the Dockerfile)",
    )
    compose.add_argument(
        "--prometheus-config",
        default=deploy.DEFAULT_PROMETHEUS_CONFIG_PATH,
        help="Prometheus config, relative to the compose file "
        f"(default {deploy.DEFAULT_PROMETHEUS_CONFIG_PATH})",
    )
    compose.add_argument(
        "--grafana-dir",
        default=deploy.DEFAULT_GRAFANA_DIR,
        help=f"Grafana provisioning + dashboards (default {deploy.DEFAULT_GRAFANA_DIR})",
    )
    compose.set_defaults(func=run_compose)


def _load(path: Path):  # type: ignore[no-untyped-def]
    from topology.manifest import load_manifest

    if not path.exists():
        raise UsageError(f"manifest {path} does not exist")
    # Files a manifest names (token, TLS) live on the peers' hosts, not necessarily here.
    return load_manifest(path, check_files=False)


def _write(text: str, output: Path | None) -> None:
    if output is None:
        sys.stdout.write(text)
        return
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write {output}: {exc.strerror or exc}") from exc
    print(f"wrote {output}", file=sys.stderr)


def _relative_to_output(path: Path, output: Path | None) -> str:
    """``path`` as seen from the output file's directory (or the working directory)."""
    base = (output.parent if output is not None else Path.cwd()).resolve()
    relative = os.path.relpath(path.resolve(), base)
    return relative if relative.startswith(("../", "/")) else f"./{relative}"


def run_prometheus_config(args: argparse.Namespace) -> int:
    """Write the scrape configuration; returns the exit status."""
    manifest = _load(args.manifest)
    text = deploy.render_prometheus_config(
        manifest, args.scrape_interval, args.job_name, source=args.manifest.as_posix()
    )
    _write(text, args.output)
    return 0


def run_compose(args: argparse.Namespace) -> int:
    """Write the docker-compose file; returns the exit status."""
    manifest = _load(args.manifest)
    text = deploy.render_compose(
        manifest,
        image=args.image,
        manifest_source=_relative_to_output(args.manifest, args.output),
        prometheus_config_path=args.prometheus_config,
        grafana_dir=args.grafana_dir,
        source=args.manifest.as_posix(),
    )
    _write(text, args.output)
    return 0
