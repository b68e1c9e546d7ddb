"""Deployment generators: Prometheus scrape configs, docker-compose files, dashboard helpers.

Everything here is a pure function of a :class:`~topology.manifest.Manifest` (or of a dashboard
JSON document): no file or network I/O, so the committed ``deploy/prometheus/prometheus.yml``
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
from collections.abc import Iterable, Iterator, Mapping
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
            "PYTHONUNBUFFERED": "1",
        },
        "volumes": [
            f"{manifest_source}:{CONTAINER_MANIFEST_PATH}:ro",
            f"peer{rank}-data:{CONTAINER_OUT_DIR}",
        ],
        "restart": "on-failure",
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
        "ports": [f"{PROMETHEUS_PORT}:{PROMETHEUS_PORT}"],
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
        "ports": [f"{GRAFANA_PORT}:{GRAFANA_PORT}"],
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
    )
    return header + _dump_yaml(data)


# --- dashboards ---------------------------------------------------------------------------

# Grafana's built-in interval variables and the values tests and tools substitute for them.
BUILTIN_INTERVALS = {
    "$__rate_interval": "5s",
    "$__interval": "5s",
    "$__range": "1m",
    "${__rate_interval}": "5s",
    "${__interval}": "5s",
    "${__range}": "1m",
}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_IDENTIFIER = re.compile(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*")
_BRACES = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
# PromQL keywords that are not followed by "(" and are not metric names (function and
# aggregation names always are followed by "(" once grouping clauses are removed).
_PROMQL_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "inf", "nan", "by", "without", "on", "ignoring"}
    | {"group_left", "group_right"}
)


def iter_panels(dashboard: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """Every panel of a dashboard, including panels nested in rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(dashboard: Mapping[str, Any]) -> list[str]:
    """Every PromQL expression of a dashboard: panel targets and query template variables."""
    exprs = [
        str(target["expr"])
        for panel in iter_panels(dashboard)
        for target in panel.get("targets", [])
        if target.get("expr")
    ]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable.get("query")
            text = query.get("query", "") if isinstance(query, Mapping) else str(query or "")
            inner = re.match(r"^\s*label_values\((.*),\s*\w+\s*\)\s*$", text)
            if inner:
                exprs.append(inner.group(1))
            elif text and not text.startswith(("label_names(", "metrics(")):
                exprs.append(text)
    return exprs


def substitute_variables(expr: str, values: Mapping[str, str]) -> str:
    """Replace ``$name`` / ``${name}`` / ``${name:fmt}`` with ``values[name]``.

    Grafana's interval variables default to :data:`BUILTIN_INTERVALS`; ``$1``, ``$2``... are
    regex group references (``label_replace``), which Grafana and this function leave alone.

    Raises:
        KeyError: a variable without a value.
    """
    for name, value in BUILTIN_INTERVALS.items():
        expr = expr.replace(name, value)

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name.isdigit():
            return match.group(0)
        return values[name]

    return _VARIABLE.sub(replace, expr)


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (label matchers and strings ignored)."""
    text = _QUOTED.sub(" ", expr)
    # by (...) / on (...) / group_left (...) lists hold label names, not metrics
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    text = _BRACES.sub(" ", text)
    text = _RANGES.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        word = match.group(0)
        following = text[match.end() :].lstrip()
        if word.lower() in _PROMQL_KEYWORDS or following.startswith("("):
            continue
        names.add(word)
    return names


def exported_family(sample_name: str, families: Iterable[str]) -> str | None:
    """The metric family a series name belongs to (``x_bucket`` -> ``x``), if declared."""
    known = set(families)
    if sample_name in known:
        return sample_name
    for suffix in ("_bucket", "_count", "_sum", "_total", "_created", "_info"):
        if sample_name.endswith(suffix) and sample_name[: -len(suffix)] in known:
            return sample_name[: -len(suffix)]
    return None


def declared_metrics(exposition: str) -> set[str]:
    """Metric names a Prometheus text exposition declares (``# TYPE`` lines).

    A labelled metric that has no series yet (an error counter before the first error) is
    still declared. The client library's ``*_created`` companions are left out.
    """
    names = {
        line.split()[2]
        for line in exposition.splitlines()
        if line.startswith("# TYPE ") and len(line.split()) >= 4
    }
    return {
        name
        for name in names
        if not (name.endswith("_created") and _has_created_parent(name[: -len("_created")], names))
    }


def _has_created_parent(stem: str, names: set[str]) -> bool:
    return stem in names or f"{stem}_total" in names


def metrics_section(readme: str) -> str | None:
    """The text of a Markdown document's ``## Metrics`` section, or None."""
    match = re.search(r"^## Metrics[ \t]*$(.*?)(?=^## |\Z)", readme, re.MULTILINE | re.DOTALL)
    return match.group(1) if match else None


def documented_metrics(markdown: str) -> set[str]:
    """Metric names in the first column of a Markdown table (`` `name` `` cells)."""
    names: set[str] = set()
    for line in markdown.splitlines():
        cells = line.strip().strip("|").split("|")
        if line.lstrip().startswith("|") and cells:
            names.update(re.findall(r"`([A-Za-z_:][A-Za-z0-9_:]*)`", cells[0]))
    return names
