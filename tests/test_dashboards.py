"""Grafana dashboards: valid JSON models, template variables used, PromQL that parses, and
metric names that the peers' collectors really declare and the metrics table documents.

These checks need no Grafana and no running peer: the collectors of
:mod:`peer.training.metrics` and :mod:`peer.transport.grpc.metrics` are instantiated in a fresh
registry. The
end-to-end counterpart (a real Prometheus scraping real peers) is
``tests/test_prometheus_e2e.py``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from tests import dashboard_queries

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = sorted((ROOT / "deploy/grafana/dashboards").glob("*.json"))
DATASOURCE_UID = "decentlam-prometheus"
# Values the e2e test and the promtool check substitute for the dashboards' variables.
ALL_VALUES = {"peer": ".*", "neighbor": ".*"}


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _by_uid() -> dict[str, dict[str, Any]]:
    return {_load(p)["uid"]: _load(p) for p in DASHBOARDS}


def declared_peer_metrics() -> set[str]:
    """Metric names one peer's registry declares (training + exchange collectors)."""
    from peer.training.metrics import TrainingMetrics
    from peer.transport.grpc.metrics import ExchangeMetrics

    registry = CollectorRegistry()
    TrainingMetrics(registry, 0, {"version": "test"})
    ExchangeMetrics(registry, 0)
    return dashboard_queries.declared_metrics(generate_latest(registry).decode())


def metrics_table() -> tuple[str, set[str]]:
    """Where the metrics table lives (README's ``## Metrics``, else docs/metrics.md) and its
    metric names."""
    readme = ROOT / "README.md"
    if readme.exists():
        section = dashboard_queries.metrics_section(readme.read_text())
        if section is not None:
            return "README.md ## Metrics", dashboard_queries.documented_metrics(section)
    return "docs/metrics.md", dashboard_queries.documented_metrics(
        (ROOT / "docs/metrics.md").read_text()
    )


def test_three_dashboards_with_unique_uids() -> None:
    uids = [_load(p)["uid"] for p in DASHBOARDS]
    assert sorted(uids) == ["decentlam-communication", "decentlam-overview", "decentlam-topology"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_is_a_valid_grafana_model(path: Path) -> None:
    dashboard = _load(path)
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert dashboard["title"] and dashboard["uid"] and len(dashboard["uid"]) <= 40
    assert "id" not in dashboard or dashboard["id"] is None  # provisioned: Grafana assigns ids
    panels = list(dashboard_queries.iter_panels(dashboard))
    assert panels
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= set(grid), panel["title"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"]["uid"] == DATASOURCE_UID
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["peer"]["query"]["query"] == "label_values(decentlam_step, rank)"
    for variable in variables.values():
        assert variable["datasource"]["uid"] == DATASOURCE_UID


def test_datasource_uid_is_the_provisioned_one() -> None:
    path = ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml"
    (source,) = yaml.safe_load(path.read_text())["datasources"]
    assert source["uid"] == DATASOURCE_UID


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_panel_queries_use_the_template_variables(path: Path) -> None:
    dashboard = _load(path)
    names = {v["name"] for v in dashboard["templating"]["list"]}
    for panel in dashboard_queries.iter_panels(dashboard):
        for target in panel.get("targets", []):
            expr = target["expr"]
            assert "$peer" in expr, f"{panel['title']}: {expr}"
            if "neighbor" in names and "decentlam_exchange_latency_seconds" in expr:
                assert "$neighbor" in expr, f"{panel['title']}: {expr}"
            dashboard_queries.substitute_variables(expr, ALL_VALUES)  # no unknown variables


def test_overview_shows_what_the_issue_asks_for() -> None:
    exprs = " ".join(dashboard_queries.dashboard_queries(_by_uid()["decentlam-overview"]))
    for name in (
        "decentlam_steps_per_second",
        "decentlam_loss",
        'metric="accuracy"',
        "decentlam_consensus_distance",
        "up{",
        "decentlam_neighbor_up",
        "decentlam_step{",
        "decentlam_learning_rate",
    ):
        assert name in exprs, name


def test_communication_latency_quantiles_per_edge() -> None:
    dashboard = _by_uid()["decentlam-communication"]
    exprs = dashboard_queries.dashboard_queries(dashboard)
    for quantile in ("0.5", "0.95", "0.99"):
        wanted = (
            f"histogram_quantile({quantile}, sum by (le, rank, neighbor) "
            "(rate(decentlam_exchange_latency_seconds_bucket{"
        )
        assert any(e.startswith(wanted) and "[1m]" in e for e in exprs), quantile
    joined = " ".join(exprs)
    for name in (
        "decentlam_exchange_received_bytes_total",
        "decentlam_exchange_sent_bytes_total",
        "decentlam_exchange_blocked_seconds_total",
        "decentlam_compute_seconds_total",
        "decentlam_overlap_ratio",
        "sum by (rank, neighbor, code) (rate(decentlam_exchange_errors_total",
        "decentlam_exchange_retries_total",
        "decentlam_staleness_steps_bucket",
    ):
        assert name in joined, name


def test_topology_node_graph_and_edge_table() -> None:
    dashboard = _by_uid()["decentlam-topology"]
    panels = {p["type"]: p for p in dashboard_queries.iter_panels(dashboard)}
    graph = panels["nodeGraph"]
    nodes, edges = (t["expr"] for t in graph["targets"])
    assert "decentlam_build_info" in nodes and '"id", "$1", "rank"' in nodes
    assert "decentlam_exchange_latency_seconds_bucket" in edges
    assert '"source", "$1", "neighbor"' in edges and '"target", "$1", "rank"' in edges
    assert all(t["format"] == "table" and t["instant"] for t in graph["targets"])
    assert graph["fieldConfig"]["defaults"]["color"]["mode"] == "thresholds"
    table = panels["table"]
    assert len(table["targets"]) >= 3
    assert any(t["id"] == "merge" for t in table["transformations"])


def test_metric_name_extraction() -> None:
    expr = (
        'sum by (rank, le) (rate(a_bucket{rank=~"$peer"}[5m])) / on (rank) group_left (x) '
        'b_total or on() vector(0) + time() - c{job="up"} offset 1m'
    )
    assert dashboard_queries.metric_names(expr) == {"a_bucket", "b_total", "c"}
    assert dashboard_queries.substitute_variables(
        'x{r=~"$peer"}[$__rate_interval]', {"peer": "1"}
    ) == ('x{r=~"1"}[5s]')
    with pytest.raises(KeyError):
        dashboard_queries.substitute_variables("x{r=~'$other'}", {})


def test_every_dashboard_metric_is_declared_by_the_peer_collectors() -> None:
    declared = declared_peer_metrics()
    for path in DASHBOARDS:
        for expr in dashboard_queries.dashboard_queries(_load(path)):
            for name in dashboard_queries.metric_names(expr) - {"up"}:  # up is made by Prometheus
                assert dashboard_queries.exported_family(name, declared), (
                    f"{path.name}: {name} in {expr}"
                )


def test_every_declared_metric_is_documented() -> None:
    where, documented = metrics_table()
    missing = {
        name
        for name in declared_peer_metrics()
        if name.startswith("decentlam_") and name not in documented
    }
    assert not missing, f"not in the metrics table of {where}: {sorted(missing)}"


def test_every_query_parses_with_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    rules = [
        {
            "record": f"dashboard:query_{i}",
            "expr": dashboard_queries.substitute_variables(e, ALL_VALUES),
        }
        for path in DASHBOARDS
        for i, e in enumerate(
            dashboard_queries.dashboard_queries(_load(path)), start=len(path.stem) * 100
        )
    ]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
