"""End to end: a real Prometheus scrapes three real peers, and every dashboard query answers.

Three ``decentlam peer`` processes train a tiny digits model on loopback (far more steps than
the test lasts; they are stopped at the end). The real ``prometheus`` binary scrapes them every
second with the configuration ``decentlam prometheus-config`` writes. Then every PromQL
expression of the Grafana dashboards (with ``$peer``/``$neighbor`` = ``.*`` and Grafana's
interval variables = 5s) must return a non-empty result through ``/api/v1/query``, every metric
the dashboards name must be declared by a real peer's ``/metrics``, and every ``decentlam_*``
metric a peer declares must be in the metrics table. Skipped when ``prometheus`` is missing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from launcher.cli import main
from launcher.cluster import LocalCluster, free_ports, on_free_ports
from tests import dashboard_queries
from topology.manifest import dump_manifest, init_manifest

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = sorted((ROOT / "deploy/grafana/dashboards").glob("*.json"))
VARIABLES = {"peer": ".*", "neighbor": ".*"}
PEERS = 3
HTTP_TIMEOUT_SECONDS = 5.0
READY_TIMEOUT_SECONDS = 60.0
QUERY_RETRY_SECONDS = 20.0

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]


@dataclass
class Stack:
    """The running peers and Prometheus."""

    cluster: LocalCluster
    prometheus_url: str
    prometheus_log: Path


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_SECONDS) as response:
        return json.loads(response.read().decode())


def query(stack: Stack, expr: str) -> list[Any]:
    """Instant query; the result list (empty on no data). Raises on a query error."""
    url = f"{stack.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        body = _get_json(url)
    except urllib.error.HTTPError as exc:  # 400: bad expression, with Prometheus's reason
        raise AssertionError(f"{expr}: {exc.read().decode(errors='replace')}") from exc
    assert body["status"] == "success", body
    return body["data"]["result"]


def _diagnostics(stack: Stack) -> str:
    parts = [f"prometheus log:\n{_tail(stack.prometheus_log)}"]
    for peer in stack.cluster.peers:
        parts.append(f"rank {peer.rank} log:\n{stack.cluster.log_tail(peer.rank, 15)}")
    return "\n".join(parts)


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path else ""


def _first_value(result: list[Any]) -> float:
    return float(result[0]["value"][1]) if result else 0.0


def _wait_until_scraped(stack: Stack) -> None:
    """Until every peer has been scraped a few times with exchanges and evaluations done."""
    conditions = {
        f'count(up{{job="decentlam"}} == 1) >= {PEERS}': "all peers up",
        "min(count_over_time(decentlam_step[1m])) >= 6": "six scrapes of each peer",
        f"count(decentlam_eval) >= {2 * PEERS}": "an evaluation on every peer",
        "count(decentlam_exchange_latency_seconds_count) >= 2": "exchanges recorded",
    }
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    pending = dict(conditions)
    while pending:
        failed = stack.cluster.failed()
        if failed is not None:
            pytest.fail(f"peer {failed.rank} exited early\n{_diagnostics(stack)}")
        for expr in list(pending):
            try:
                if query(stack, expr):
                    del pending[expr]
            except OSError:
                break  # Prometheus not listening yet
        if pending and time.monotonic() > deadline:
            pytest.fail(
                f"not ready after {READY_TIMEOUT_SECONDS} s: {list(pending.values())}\n"
                + _diagnostics(stack)
            )
        time.sleep(0.5)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus server binary is not installed (apt-get install prometheus)")
    tmp = tmp_path_factory.mktemp("prometheus-e2e")
    manifest = init_manifest(
        PEERS, "ring", task="digits", steps=1_000_000, eval_every=5, batch_size=16, seed=0
    )
    manifest = on_free_ports(manifest, device="cpu")
    manifest_path = tmp / "manifest.yaml"
    manifest_path.write_text(dump_manifest(manifest))
    config = tmp / "prometheus.yml"
    argv = ["prometheus-config", "--manifest", str(manifest_path), "--scrape-interval", "1s"]
    assert main([*argv, "-o", str(config)]) == 0

    cluster = LocalCluster(
        manifest_path, tmp / "out", ["--linger-seconds", "1"], env={"OMP_NUM_THREADS": "1"}
    )
    (port,) = free_ports(1)
    prometheus_log = tmp / "prometheus.log"
    prometheus: subprocess.Popen[bytes] | None = None
    try:
        cluster.start()
        with open(prometheus_log, "wb") as log:
            prometheus = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        stack = Stack(cluster, f"http://127.0.0.1:{port}", prometheus_log)
        _wait_until_scraped(stack)
        yield stack
    finally:
        if prometheus is not None:
            prometheus.terminate()
            try:
                prometheus.wait(timeout=10)
            except subprocess.TimeoutExpired:
                prometheus.kill()
                prometheus.wait(timeout=10)
        cluster.stop(grace_seconds=10.0)


def _dashboard_queries() -> list[tuple[str, str]]:
    return [
        (path.name, dashboard_queries.substitute_variables(expr, VARIABLES))
        for path in DASHBOARDS
        for expr in dashboard_queries.dashboard_queries(json.loads(path.read_text()))
    ]


def test_every_dashboard_query_returns_data(stack: Stack) -> None:
    pending = dict.fromkeys(_dashboard_queries())
    assert len(pending) > 20
    deadline = time.monotonic() + QUERY_RETRY_SECONDS
    while True:
        for key in list(pending):
            if query(stack, key[1]):
                del pending[key]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    empty = "\n".join(f"  {name}: {expr}" for name, expr in pending)
    assert not pending, f"{len(pending)} dashboard queries returned no data:\n{empty}"


def _scrape_peer(stack: Stack) -> str:
    url = stack.cluster.peers[0].metrics_url
    assert url is not None
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_SECONDS) as response:
        return response.read().decode()


def test_every_dashboard_metric_is_exported_by_a_real_peer(stack: Stack) -> None:
    declared = dashboard_queries.declared_metrics(_scrape_peer(stack))
    missing = {
        (name, metric)
        for name, expr in _dashboard_queries()
        for metric in dashboard_queries.metric_names(expr) - {"up"}  # up is made by Prometheus
        if dashboard_queries.exported_family(metric, declared) is None
    }
    assert not missing, f"named in dashboards, not exported by a peer: {sorted(missing)}"


def test_every_exported_metric_is_documented(stack: Stack) -> None:
    readme = ROOT / "README.md"
    section = dashboard_queries.metrics_section(readme.read_text()) if readme.exists() else None
    where = "README.md ## Metrics" if section is not None else "docs/metrics.md"
    documented = dashboard_queries.documented_metrics(
        section if section is not None else (ROOT / "docs/metrics.md").read_text()
    )
    exported = {
        m
        for m in dashboard_queries.declared_metrics(_scrape_peer(stack))
        if m.startswith("decentlam")
    }
    missing = exported - documented
    assert not missing, (
        f"exported by a peer, not in the metrics table of {where}: {sorted(missing)}"
    )
