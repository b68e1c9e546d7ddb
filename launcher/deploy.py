"""Deployment generators: Prometheus scrape configs and docker-compose files.

Everything here is a pure function of a :class:`~topology.manifest.Manifest`: no file or
network I/O, so the committed ``deploy/prometheus/prometheus.yml``
and ``docker-compose.yml`` can be checked byte for byte against what the CLI generates
(``decentlam prometheus-config`` / ``decentlam compose`` in
:mod:`launcher.commands.observability_cmd`).

Label conventions: every peer exports its own ``rank`` label, and the scrape config attaches
``rank`` and ``peer`` (the manifest name) as target labels, so ``up`` and ``process_*`` series
carry them too. ``honor_labels: true`` keeps the peer's ``rank`` as-is instead of Prometheus
renaming it to ``exported_rank`` (both values are the same by construction).
"""

from __future__ import annotations

import ipaddress
import logging
import re
from typing import Any

import yaml

from launcher.errors import UsageError
from topology.manifest import Manifest

logger = logging.getLogger(__name__)

DEFAULT_SCRAPE_INTERVAL = "5s"
DEFAULT_JOB_NAME = "decentlam"
DEFAULT_IMAGE = "decentlam:latest"

# Paths inside the peer container (see the Dockerfile).
CONTAINER_MANIFEST_PATH = "/etc/decentlam/manifest.yaml"
CONTAINER_OUT_DIR = "/var/lib/decentlam"

PROMETHEUS_IMAGE = "prom/prometheus:v2.53.0"
GRAFANA_IMAGE = "grafana/grafana:11.1.0"
PROMETHEUS_PORT = 9090
GRAFANA_PORT = 3000
# Host ports of the published UIs: compose substitutes these variables (default: same port),
# so a machine where 9090 or 3000 is taken, or a test, can pick another.
PROMETHEUS_HOST_PORT_VARIABLE = "DECENTLAM_PROMETHEUS_PORT"
GRAFANA_HOST_PORT_VARIABLE = "DECENTLAM_GRAFANA_PORT"
# Torch threads per peer container. All peers of a compose file share one machine, and torch's
# default of one thread per core in every peer oversubscribes it (steps ~10x slower, the same
# as `decentlam launch` avoids); compose substitutes the variable, default 1.
TORCH_THREADS_VARIABLE = "DECENTLAM_TORCH_THREADS"
DEFAULT_TORCH_THREADS = 1
# On SIGTERM a peer abandons its step, writes its checkpoint, closes its server and channels,
# writes peer-<r>.json and exits 0, at once; compose's default of 10 s before SIGKILL is short
# for that on a loaded machine (a killed peer loses peer-<r>.json), and a longer grace costs
# nothing. It also covers a peer still lingering for its readers after its last step (60 s).
PEER_STOP_GRACE_PERIOD = "90s"
# The compose file and the Prometheus/Grafana files it mounts, relative to the compose file.
DEFAULT_PROMETHEUS_CONFIG_PATH = "./deploy/prometheus/prometheus.yml"
DEFAULT_GRAFANA_DIR = "./deploy/grafana"

# Prometheus durations: one or more <number><unit> groups, e.g. 1s, 500ms, 1m30s.
_DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
# A host name compose can use as a network alias: DNS labels separated by dots.
_DNS_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9-]{1,63})*$")


def check_duration(text: str, what: str = "--scrape-interval") -> str:
    """Return ``text`` if it is a Prometheus duration (``1s``, ``500ms``, ``1m30s``).

    Raises:
        UsageError: not a duration, or zero.
    """
    if not _DURATION.match(text) or not re.search(r"[1-9]", text):
        raise UsageError(f"{what}: {text!r} is not a Prometheus duration such as 5s, 500ms or 1m")
    return text


def metrics_targets(manifest: Manifest) -> list[dict[str, Any]]:
    """One ``static_configs`` entry per peer that has a metrics port.

    Returns:
        ``[{"targets": ["host:metrics_port"], "labels": {"rank": "0", "peer": "peer0"}}, ...]``.

    Raises:
        UsageError: no peer of the manifest has a ``metrics_port``.
    """
    entries = []
    for spec in manifest.peers:
        if spec.metrics_port is None:
            logger.warning("peer %d (%s) has no metrics_port: not scraped", spec.rank, spec.name)
            continue
        host = f"[{spec.host}]" if ":" in spec.host else spec.host
        entries.append(
            {
                "targets": [f"{host}:{spec.metrics_port}"],
                "labels": {"rank": str(spec.rank), "peer": spec.name},
            }
        )
    if not entries:
        raise UsageError("no peer of the manifest has a metrics_port: nothing to scrape")
    return entries


def prometheus_config(
    manifest: Manifest,
    scrape_interval: str = DEFAULT_SCRAPE_INTERVAL,
    job_name: str = DEFAULT_JOB_NAME,
) -> dict[str, Any]:
    """Prometheus configuration scraping every peer of ``manifest`` (one job).

    Args:
        manifest: the cluster manifest.
        scrape_interval: Prometheus duration; the evaluation interval and scrape timeout follow.
        job_name: the ``job`` label of every series.

    Returns:
        The configuration as plain data (see :func:`render_prometheus_config`).
    """
    check_duration(scrape_interval)
    return {
        "global": {
            "scrape_interval": scrape_interval,
            "evaluation_interval": scrape_interval,
            "scrape_timeout": scrape_interval,
        },
        "scrape_configs": [
            {
                "job_name": job_name,
                "honor_labels": True,
                "metrics_path": "/metrics",
                "static_configs": metrics_targets(manifest),
            }
        ],
    }


def render_prometheus_config(
    manifest: Manifest,
    scrape_interval: str = DEFAULT_SCRAPE_INTERVAL,
    job_name: str = DEFAULT_JOB_NAME,
    source: str | None = None,
) -> str:
    """:func:`prometheus_config` as YAML text with a header saying how it was generated."""
    data = prometheus_config(manifest, scrape_interval, job_name)
    header = _header(
        "Prometheus scrape configuration",
        f"decentlam prometheus-config --manifest {source or 'MANIFEST'}"
        + (
            ""
            if scrape_interval == DEFAULT_SCRAPE_INTERVAL
            else f" --scrape-interval {scrape_interval}"
        ),
    )
    return header + _dump_yaml(data)


def _header(what: str, command: str) -> str:
    return (
        f"# {what} of a decentlam cluster. GENERATED: do not edit; regenerate with\n#   {command}\n"
    )


def _dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=100)


def _check_compose_hosts(manifest: Manifest) -> None:
    seen: dict[str, int] = {}
    for spec in manifest.peers:
        host = spec.host
        try:
            ipaddress.ip_address(host)
            is_ip = True
        except ValueError:
            is_ip = False
        if is_ip or host == "localhost" or not _DNS_NAME.match(host):
            raise UsageError(
                f"peers[{spec.rank}].host: {host!r} cannot name a compose service; give every "
                "peer its own host name (decentlam manifest init --hosts peer0,peer1,...)"
            )
        if host in seen:
            raise UsageError(
                f"peers[{spec.rank}].host: {host!r} is also peer {seen[host]}'s host; compose "
                "runs one container per peer, so every peer needs its own host name"
            )
        seen[host] = spec.rank


def healthcheck_command(metrics_port: int) -> list[str]:
    """Compose ``healthcheck.test``: python fetching the peer's own metrics endpoint."""
    script = (
        "import urllib.request; "
        f"urllib.request.urlopen('http://localhost:{metrics_port}/metrics', timeout=3).read()"
    )
    return ["CMD", "python", "-c", script]


def peer_service(manifest: Manifest, rank: int, image: str, manifest_source: str) -> dict[str, Any]:
    """The compose service running peer ``rank`` (see :func:`compose_config`)."""
    spec = manifest.peer(rank)
    service: dict[str, Any] = {
        "image": image,
        "build": {"context": "."},
        "command": [
            "peer",
            "--manifest",
            CONTAINER_MANIFEST_PATH,
            "--rank",
            str(rank),
            "--out",
            CONTAINER_OUT_DIR,
            # A restarted container continues from its last checkpoint (no checkpoint: step 0).
            "--resume",
        ],
        "hostname": spec.host,
        "environment": {
            "DECENTLAM_MANIFEST": CONTAINER_MANIFEST_PATH,
            "DECENTLAM_RANK": str(rank),
            "DECENTLAM_OUT": CONTAINER_OUT_DIR,
            TORCH_THREADS_VARIABLE: _variable(TORCH_THREADS_VARIABLE, DEFAULT_TORCH_THREADS),
            "OMP_NUM_THREADS": _variable(TORCH_THREADS_VARIABLE, DEFAULT_TORCH_THREADS),
            "PYTHONUNBUFFERED": "1",
        },
        "volumes": [
            f"{manifest_source}:{CONTAINER_MANIFEST_PATH}:ro",
            f"peer{rank}-data:{CONTAINER_OUT_DIR}",
        ],
        "restart": "on-failure",
        "stop_grace_period": PEER_STOP_GRACE_PERIOD,
    }
    if spec.host != f"peer{rank}":
        # Other peers dial the manifest host name: make it resolve to this container.
        service["networks"] = {"default": {"aliases": [spec.host]}}
    if spec.metrics_port is not None:
        service["expose"] = [str(spec.port), str(spec.metrics_port)]
        service["healthcheck"] = {
            "test": healthcheck_command(spec.metrics_port),
            "interval": "10s",
            "timeout": "5s",
            "retries": 3,
            # torch import, data set load and waiting for neighbours come before the endpoint
            "start_period": "60s",
        }
    else:
        service["expose"] = [str(spec.port)]
    return service


def _variable(name: str, default: object) -> str:
    """``${NAME:-default}``: compose substitutes the environment's value, else ``default``."""
    return f"${{{name}:-{default}}}"


def _published_port(variable: str, port: int) -> str:
    """``${VARIABLE:-port}:port``: the host port comes from the environment, else ``port``."""
    return f"{_variable(variable, port)}:{port}"


def compose_config(
    manifest: Manifest,
    *,
    image: str = DEFAULT_IMAGE,
    manifest_source: str,
    prometheus_config_path: str = DEFAULT_PROMETHEUS_CONFIG_PATH,
    grafana_dir: str = DEFAULT_GRAFANA_DIR,
) -> dict[str, Any]:
    """docker-compose file: one ``peerR`` service per peer, plus Prometheus and Grafana.

    Args:
        manifest: the cluster manifest; every peer needs its own host name, which other
            containers resolve (the service is ``peer<rank>``, the host an alias if different).
        image: peer image (built from this repository's Dockerfile).
        manifest_source: the manifest path as the compose file sees it (mounted read-only).
        prometheus_config_path: Prometheus configuration mounted into the prometheus service.
        grafana_dir: directory holding ``provisioning/`` and ``dashboards/``.

    Returns:
        The compose file as plain data (see :func:`render_compose`).

    Raises:
        UsageError: a peer's host is an IP address, loopback, or shared with another peer.
    """
    _check_compose_hosts(manifest)
    services: dict[str, Any] = {}
    for spec in manifest.peers:
        services[f"peer{spec.rank}"] = peer_service(manifest, spec.rank, image, manifest_source)
    peer_names = list(services)
    services["prometheus"] = {
        "image": PROMETHEUS_IMAGE,
        "command": [
            "--config.file=/etc/prometheus/prometheus.yml",
            "--storage.tsdb.path=/prometheus",
            "--web.enable-lifecycle",
        ],
        "volumes": [
            f"{prometheus_config_path}:/etc/prometheus/prometheus.yml:ro",
            "prometheus-data:/prometheus",
        ],
        "ports": [_published_port(PROMETHEUS_HOST_PORT_VARIABLE, PROMETHEUS_PORT)],
        "depends_on": peer_names,
        "restart": "unless-stopped",
    }
    services["grafana"] = {
        "image": GRAFANA_IMAGE,
        "environment": {
            "GF_AUTH_ANONYMOUS_ENABLED": "true",
            "GF_AUTH_ANONYMOUS_ORG_ROLE": "Viewer",
            "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH": (
                "/etc/grafana/dashboards/decentlam-overview.json"
            ),
        },
        "volumes": [
            f"{grafana_dir}/provisioning:/etc/grafana/provisioning:ro",
            f"{grafana_dir}/dashboards:/etc/grafana/dashboards:ro",
            "grafana-data:/var/lib/grafana",
        ],
        "ports": [_published_port(GRAFANA_HOST_PORT_VARIABLE, GRAFANA_PORT)],
        "depends_on": ["prometheus"],
        "restart": "unless-stopped",
    }
    # ``name: {}``: a named volume with default options (one per peer for its checkpoints).
    volumes: dict[str, Any] = {f"{name}-data": {} for name in peer_names}
    volumes["prometheus-data"] = {}
    volumes["grafana-data"] = {}
    return {"services": services, "volumes": volumes}


def render_compose(
    manifest: Manifest,
    *,
    image: str = DEFAULT_IMAGE,
    manifest_source: str,
    prometheus_config_path: str = DEFAULT_PROMETHEUS_CONFIG_PATH,
    grafana_dir: str = DEFAULT_GRAFANA_DIR,
    source: str | None = None,
) -> str:
    """:func:`compose_config` as YAML text with a header saying how it was generated."""
    data = compose_config(
        manifest,
        image=image,
        manifest_source=manifest_source,
        prometheus_config_path=prometheus_config_path,
        grafana_dir=grafana_dir,
    )
    command = f"decentlam compose --manifest {source or 'MANIFEST'}"
    if image != DEFAULT_IMAGE:
        command += f" --image {image}"
    header = _header("docker-compose file", command)
    header += (
        "# Start: docker compose up --build -d; Grafana http://localhost:3000, "
        "Prometheus http://localhost:9090\n"
        f"# Variables: {GRAFANA_HOST_PORT_VARIABLE}, {PROMETHEUS_HOST_PORT_VARIABLE} "
        "(host ports),\n"
        f"#   {TORCH_THREADS_VARIABLE} (torch threads per peer, default {DEFAULT_TORCH_THREADS})\n"
    )
    return header + _dump_yaml(data)
