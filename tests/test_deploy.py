"""Deployment files: generated Prometheus config and compose file, Dockerfile, provisioning.

The committed ``deploy/prometheus/prometheus.yml`` and ``docker-compose.yml`` must be exactly
what ``decentlam prometheus-config`` / ``decentlam compose`` print for
``deploy/compose-manifest.yaml``; the compose file must validate with ``docker-compose config``;
and the peer services' commands and environments, run as plain processes on loopback, must
form a working cluster.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from launcher import deploy
from launcher.cli import main
from launcher.cluster import on_free_ports
from tests import dashboard_queries
from topology.manifest import dump_manifest, init_manifest, load_manifest

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_MANIFEST = "deploy/compose-manifest.yaml"
PROMETHEUS_YML = ROOT / "deploy/prometheus/prometheus.yml"
COMPOSE_YML = ROOT / "docker-compose.yml"
GRAFANA = ROOT / "deploy/grafana"


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def in_root(monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(ROOT)
    return ROOT


# --- Prometheus scrape configuration ---------------------------------------------------------


def test_committed_prometheus_config_is_generated(
    in_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _cli(["prometheus-config", "--manifest", COMPOSE_MANIFEST], capsys)
    assert code == 0
    assert out == PROMETHEUS_YML.read_text(), (
        "deploy/prometheus/prometheus.yml is stale: regenerate with "
        f"decentlam prometheus-config --manifest {COMPOSE_MANIFEST} -o {PROMETHEUS_YML}"
    )


def test_prometheus_config_has_one_target_per_peer_with_labels(tmp_path: Path) -> None:
    manifest = init_manifest(3, "ring", hosts=["a", "b", "c"], base_metrics_port=9200)
    config = deploy.prometheus_config(manifest, scrape_interval="1s")
    assert config["global"]["scrape_interval"] == "1s"
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "decentlam"
    assert job["static_configs"] == [
        {"targets": [f"{host}:9200"], "labels": {"rank": str(rank), "peer": f"peer{rank}"}}
        for rank, host in enumerate("abc")
    ]


def test_prometheus_config_file_and_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(dump_manifest(init_manifest(2, "ring", base_metrics_port=9300)))
    output = tmp_path / "out" / "prometheus.yml"
    code, out, _ = _cli(
        [
            "prometheus-config",
            "--manifest",
            str(manifest),
            "-o",
            str(output),
            "--scrape-interval",
            "500ms",
            "--job-name",
            "train",
        ],
        capsys,
    )
    assert code == 0 and out == ""
    config = yaml.safe_load(output.read_text())
    assert config["global"]["scrape_interval"] == "500ms"
    assert config["scrape_configs"][0]["job_name"] == "train"
    targets = [e["targets"][0] for e in config["scrape_configs"][0]["static_configs"]]
    assert targets == ["127.0.0.1:9300", "127.0.0.1:9301"]
    if shutil.which("promtool"):
        check = subprocess.run(
            ["promtool", "check", "config", str(output)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("interval", ["5", "fast", "0s", "1 s", ""])
def test_bad_scrape_interval_is_a_one_line_usage_error(
    interval: str, in_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["prometheus-config", "--manifest", COMPOSE_MANIFEST, "--scrape-interval", interval]
    code, out, err = _cli(argv, capsys)
    assert code == 2 and out == ""
    assert err.startswith("decentlam: error: --scrape-interval") and err.count("\n") == 1


def test_missing_manifest_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for command in ("prometheus-config", "compose"):
        code, _, err = _cli([command, "--manifest", str(tmp_path / "nope.yaml")], capsys)
        assert code == 2 and "does not exist" in err


# --- docker-compose -------------------------------------------------------------------------


def test_committed_compose_file_is_generated(
    in_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _cli(["compose", "--manifest", COMPOSE_MANIFEST], capsys)
    assert code == 0
    assert out == COMPOSE_YML.read_text(), (
        "docker-compose.yml is stale: regenerate with "
        f"decentlam compose --manifest {COMPOSE_MANIFEST} -o docker-compose.yml"
    )


def test_compose_manifest_is_the_default_cluster() -> None:
    manifest = load_manifest(ROOT / COMPOSE_MANIFEST)
    assert [(p.host, p.port, p.metrics_port) for p in manifest.peers] == [
        (f"peer{r}", 50051, 9100) for r in range(4)
    ]
    assert manifest.topology.graph == "exponential"
    assert manifest.training.algorithm == "decentlam" and manifest.training.task == "digits"


def test_compose_services_volumes_and_healthchecks() -> None:
    compose = yaml.safe_load(COMPOSE_YML.read_text())
    services = compose["services"]
    assert set(services) == {"peer0", "peer1", "peer2", "peer3", "prometheus", "grafana"}
    for rank in range(4):
        peer = services[f"peer{rank}"]
        assert peer["image"] == "decentlam:latest"
        assert peer["command"][:7] == [
            "peer", "--manifest", "/etc/decentlam/manifest.yaml",
            "--rank", str(rank), "--out", "/var/lib/decentlam",
        ]  # fmt: skip
        assert peer["environment"]["DECENTLAM_RANK"] == str(rank)
        assert peer["environment"]["OMP_NUM_THREADS"] == "${DECENTLAM_TORCH_THREADS:-1}"
        assert "./deploy/compose-manifest.yaml:/etc/decentlam/manifest.yaml:ro" in peer["volumes"]
        assert f"peer{rank}-data:/var/lib/decentlam" in peer["volumes"]
        assert f"peer{rank}-data" in compose["volumes"]
        test = peer["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"]
        assert "http://localhost:9100/metrics" in test[3]
    prometheus, grafana = services["prometheus"], services["grafana"]
    assert prometheus["image"].startswith("prom/prometheus")
    assert "${DECENTLAM_PROMETHEUS_PORT:-9090}:9090" in prometheus["ports"]
    assert (
        "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro"
        in prometheus["volumes"]
    )
    assert set(prometheus["depends_on"]) == {f"peer{r}" for r in range(4)}
    assert grafana["image"].startswith("grafana/grafana")
    assert "${DECENTLAM_GRAFANA_PORT:-3000}:3000" in grafana["ports"]
    assert grafana["depends_on"] == ["prometheus"]
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    mounts = {v.split(":")[0]: v.split(":")[1] for v in grafana["volumes"]}
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    dashboards_mount = mounts["./deploy/grafana/dashboards"]
    assert (GRAFANA / "dashboards" / Path(home).relative_to(dashboards_mount)).exists()
    # every mounted host path exists in the repository
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), volume


def test_compose_healthcheck_passes_on_a_live_endpoint_and_fails_on_a_dead_one() -> None:
    """Run the healthcheck exactly as compose would (``python -c``), against a real metrics
    endpoint on 127.0.0.1 (the script targets localhost), then after it is stopped."""
    import subprocess
    import sys

    from prometheus_client import CollectorRegistry, start_http_server

    httpd, _ = start_http_server(0, addr="127.0.0.1", registry=CollectorRegistry())
    port = httpd.server_port
    command = deploy.healthcheck_command(port)
    assert command[:3] == ["CMD", "python", "-c"]

    def check() -> int:
        run = [sys.executable, "-c", command[3].replace("localhost", "127.0.0.1")]
        return subprocess.run(run, capture_output=True, timeout=30, check=False).returncode

    try:
        assert check() == 0
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert check() != 0


def test_compose_host_aliases_and_relative_manifest_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "cluster" / "m.yaml"
    manifest.parent.mkdir()
    manifest.write_text(dump_manifest(init_manifest(2, "ring", hosts=["alpha", "beta"])))
    output = tmp_path / "compose" / "docker-compose.yml"
    code, _, _ = _cli(
        ["compose", "--manifest", str(manifest), "-o", str(output), "--image", "reg/x:1"], capsys
    )
    assert code == 0
    services = yaml.safe_load(output.read_text())["services"]
    assert services["peer0"]["image"] == "reg/x:1"
    assert services["peer0"]["networks"]["default"]["aliases"] == ["alpha"]
    assert services["peer1"]["volumes"][0] == "../cluster/m.yaml:/etc/decentlam/manifest.yaml:ro"


@pytest.mark.parametrize(
    ("hosts", "per_host", "message"),
    [
        (None, None, "cannot name a compose service"),  # 127.0.0.1 for every peer
        (["10.0.0.1", "10.0.0.2"], None, "cannot name a compose service"),
        (["gpu-box"], 2, "also peer 0's host"),
    ],
)
def test_compose_rejects_hosts_containers_cannot_use(
    hosts: list[str] | None,
    per_host: int | None,
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        dump_manifest(init_manifest(2, "ring", hosts=hosts, peers_per_host=per_host))
    )
    code, out, err = _cli(["compose", "--manifest", str(manifest)], capsys)
    assert code == 2 and out == ""
    assert message in err and err.count("\n") == 1


def test_docker_compose_config_validates() -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose (v1) is not installed: apt-get install docker-compose")
    result = subprocess.run(
        [binary, "-f", str(COMPOSE_YML), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr


# --- Dockerfile and Grafana provisioning ----------------------------------------------------


def test_dockerfile_cpu_default_cuda_argument_entrypoint_and_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in text and "FROM ${BASE_IMAGE}" in text
    assert "ARG WHEELS_DIR=" in text  # the local wheel source of scripts/prepare-containers.sh
    assert "ARG TORCH_VERSION=2.13.0" in text and "ARG TORCH_INDEX=cpu" in text
    assert "https://download.pytorch.org/whl/${TORCH_INDEX}" in text
    assert "--build-arg TORCH_INDEX=cu" in text  # the CUDA build is documented
    assert '".[examples]"' in text
    assert 'ENTRYPOINT ["decentlam"]' in text and 'CMD ["peer"]' in text
    healthcheck = text[text.index("HEALTHCHECK") :].split("\n\n")[0]
    assert "CMD python -c" in healthcheck and "/metrics" in healthcheck
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".git" in ignored and "tests" in ignored


def test_grafana_provisioning_matches_compose_and_dashboards() -> None:
    datasources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/decentlam.yml").read_text())
    (provider,) = providers["providers"]
    compose = yaml.safe_load(COMPOSE_YML.read_text())
    assert (
        f"./deploy/grafana/dashboards:{provider['options']['path']}:ro"
        in (compose["services"]["grafana"]["volumes"])
    )
    for path in (GRAFANA / "dashboards").glob("*.json"):
        dashboard = json.loads(path.read_text())
        uids = {
            target["datasource"]["uid"]
            for panel in dashboard_queries.iter_panels(dashboard)
            for target in panel.get("targets", [])
        }
        assert uids <= {source["uid"]}, path.name


# --- the compose peers as plain processes ----------------------------------------------------


def _loopback_compose_manifest(path: Path) -> None:
    """The compose manifest on 127.0.0.1 with free ports and a 20-step digits run."""
    manifest = load_manifest(ROOT / COMPOSE_MANIFEST)
    manifest = on_free_ports(manifest, host="127.0.0.1")
    training = dataclasses.replace(
        manifest.training, steps=20, eval_every=10, checkpoint_every=10, batch_size=16
    )
    exchange = dataclasses.replace(manifest.exchange, connect_deadline_seconds=60.0)
    manifest = dataclasses.replace(manifest, training=training, exchange=exchange)
    path.write_text(dump_manifest(manifest))


def _substitute(value: str) -> str:
    """What compose makes of ``${NAME:-default}``: the environment's value, else the default."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: os.environ.get(m[1], m[2]), value)


@pytest.mark.slow
@pytest.mark.timeout(110)
def test_compose_peer_commands_form_a_working_cluster_on_loopback(tmp_path: Path) -> None:
    """Each peer service's command and environment, with the container paths mapped to
    temporary ones (manifest mount -> a loopback copy, named volume -> a directory)."""
    manifest_path = tmp_path / "manifest.yaml"
    _loopback_compose_manifest(manifest_path)
    services = yaml.safe_load(COMPOSE_YML.read_text())["services"]
    peers = sorted(name for name in services if name.startswith("peer"))
    processes: dict[str, tuple[subprocess.Popen[bytes], Path, Path]] = {}
    try:
        for name in peers:
            service = services[name]
            volume = tmp_path / f"{name}-data"  # the service's named volume
            mapping = {
                deploy.CONTAINER_MANIFEST_PATH: str(manifest_path),
                deploy.CONTAINER_OUT_DIR: str(volume),
            }
            argv = [mapping.get(arg, arg) for arg in service["command"]]
            env = {
                **os.environ,
                **{
                    k: mapping.get(str(v), _substitute(str(v)))
                    for k, v in service["environment"].items()
                },
            }
            log = tmp_path / f"{name}.log"
            with open(log, "wb") as handle:
                # ENTRYPOINT ["decentlam"] == python -m launcher.cli
                process = subprocess.Popen(
                    [sys.executable, "-m", "launcher.cli", "--log-level", "INFO", *argv],
                    stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                )  # fmt: skip
            processes[name] = (process, volume, log)
        deadline = time.monotonic() + 90
        for name, (process, _, log) in processes.items():
            try:
                code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                text = log.read_text()
                hint = (
                    " (its log says it finished: it hangs at exit)" if "finished at" in text else ""
                )
                pytest.fail(f"{name} did not exit in time{hint}:\n{text[-3000:]}")
            assert code == 0, f"{name} exited {code}:\n{log.read_text()[-3000:]}"
        for rank, name in enumerate(peers):
            volume = processes[name][1]
            assert (volume / f"peer-{rank}.json").exists(), f"{name} wrote no result"
            assert (volume / f"rank-{rank}.pt").exists(), f"{name} wrote no checkpoint"
    finally:
        for process, _, _ in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
