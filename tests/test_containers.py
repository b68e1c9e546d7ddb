"""The docker-compose cluster for real: the images built and ``docker-compose.yml`` run in
containers.

``scripts/prepare-containers.sh`` (idempotent) installs what is missing, makes a local Debian
base image and builds the peer image and a Prometheus image on it. podman-compose then starts
``docker-compose.yml`` with ``deploy/podman/compose.override.yaml`` (Prometheus from Debian's
package instead of the public image; Grafana left out: it has no local image). Through
Prometheus's HTTP API the test checks that every peer target is up, steps advance, every edge
has exchange-latency samples and every peer reports an accuracy. Every peer container is then
stopped (a graceful stop checkpoints to its named volume) and started again: each must resume
from its volume and train on. ``down -v`` must leave no container, network or volume behind.

The peers, scrape results, final steps and accuracies are printed (outside pytest's capture).
Skipped where podman is missing or the user is not root (the setup needs rootful podman).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from launcher.cluster import free_ports
from topology.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[1]
PREPARE = ROOT / "scripts/prepare-containers.sh"
OVERRIDE = "deploy/podman/compose.override.yaml"
PROMETHEUS_IMAGE = "localhost/decentlam-prometheus:latest"
MANIFEST = load_manifest(ROOT / "deploy/compose-manifest.yaml")
PEERS = [f"peer{spec.rank}" for spec in MANIFEST.peers]
# The compose services the override can run here; grafana/grafana has no local substitute.
SERVICES = [*PEERS, "prometheus"]
GRAFANA_LEFT_OUT = "Grafana left out: its image cannot be pulled here and Debian has no package"
# Past the first evaluation, so that every peer reports an accuracy.
TRAINED_STEPS = MANIFEST.training.eval_every + 10
RESUMED_STEPS = 20  # steps each peer must train after its restart
# Failure detection and rejoin (peer/rejoin.py) let one peer restart while the others train;
# without them the others time out on its fetches, and only a restart of every peer resumes.
# Looked up in the tree the image is built from (an import could find another installed copy).
REJOIN = (ROOT / "peer" / "rejoin.py").exists()
NO_REJOIN = "one peer alone not restarted: this tree has no rejoin (peer/rejoin.py)"
PREPARE_TIMEOUT_SECONDS = 900.0  # a fresh machine: apt, debootstrap, two image builds
CLUSTER_DEADLINE_SECONDS = 360.0  # each wait on the cluster (a loaded 2-core machine)


def _skip_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "containers: Linux only (rootful podman)"
    if os.geteuid() != 0:
        return "containers: needs root (rootful podman, apt-get, debootstrap)"
    if shutil.which("podman") is None:
        return "containers: podman is missing (apt-get install podman debootstrap)"
    if importlib.util.find_spec("podman_compose") is None:
        return "containers: podman-compose is missing (pip install -e '.[dev]')"
    return None


def containers(test: Callable[..., None]) -> Callable[..., None]:
    """Marks a test that builds images and runs containers (``-m containers``), or skips it."""
    for mark in (
        pytest.mark.containers,
        pytest.mark.slow,
        pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or ""),
    ):
        test = mark(test)
    return test


def _run(argv: list[str], timeout: float, env: dict[str, str] | None = None) -> str:
    """Run ``argv`` in the repository; stdout, or a one-line failure with the output's tail."""
    result = subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-3000:]
        raise AssertionError(f"{' '.join(argv[:4])} ... exited {result.returncode}:\n{tail}")
    return result.stdout


def _podman(*args: str, timeout: float = 60.0) -> str:
    return _run(["podman", *args], timeout)


@dataclass
class Cluster:
    """One compose project (its own containers, network and volumes) and its Prometheus."""

    project: str
    prometheus_port: int

    def compose(self, *args: str, timeout: float = 180.0) -> str:
        argv = [sys.executable, "-m", "podman_compose", "-p", self.project]
        argv += ["-f", "docker-compose.yml", "-f", OVERRIDE, *args]
        env = {**os.environ, "DECENTLAM_PROMETHEUS_PORT": str(self.prometheus_port)}
        return _run(argv, timeout, env)

    def container(self, service: str) -> str:
        names = _podman(
            "ps", "-a", "--format", "{{.Names}}",
            "--filter", f"label=io.podman.compose.project={self.project}",
            "--filter", f"label=com.docker.compose.service={service}",
        ).split()  # fmt: skip
        assert len(names) == 1, f"service {service}: containers {names}"
        return names[0]

    def stop_peers(self) -> None:
        """SIGTERM every peer at once (podman stops the containers in parallel; a peer stopped
        alone while its neighbours train leaves them waiting on its next step)."""
        names = [self.container(service) for service in PEERS]
        _podman("stop", "-t", "90", *names, timeout=180)

    def result_file(self, rank: int) -> dict[str, Any]:
        """``peer-<rank>.json`` from the peer's named volume."""
        mountpoint = _podman(
            "volume", "inspect", "--format", "{{.Mountpoint}}", f"{self.project}_peer{rank}-data"
        ).strip()
        return dict(json.loads((Path(mountpoint) / f"peer-{rank}.json").read_text()))

    def logs(self) -> str:
        parts = []
        for service in SERVICES:
            try:
                name = self.container(service)
                text = subprocess.run(
                    ["podman", "logs", "--tail", "15", name],
                    capture_output=True, text=True, timeout=30, check=False,
                )  # fmt: skip
                lines = [s for s in (text.stdout + text.stderr).splitlines() if "systemd" not in s]
                parts.append(f"--- {service}\n" + "\n".join(lines))
            except (AssertionError, subprocess.SubprocessError) as exc:
                parts.append(f"--- {service}: {exc}")
        return "\n".join(parts)

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant PromQL query through Prometheus's HTTP API (``data.result``)."""
        url = f"http://127.0.0.1:{self.prometheus_port}/api/v1/query?"
        with urllib.request.urlopen(url + urllib.parse.urlencode({"query": expr}), timeout=5) as r:
            body = json.load(r)
        assert body.get("status") == "success", f"{expr}: {body}"
        return list(body["data"]["result"])

    def by_rank(self, expr: str) -> dict[int, float]:
        return {int(s["metric"]["rank"]): float(s["value"][1]) for s in self.query(expr)}

    def by_edge(self, expr: str) -> dict[tuple[int, int], float]:
        """``{(neighbor, rank): value}``: the edge neighbor -> rank."""
        return {
            (int(s["metric"]["neighbor"]), int(s["metric"]["rank"])): float(s["value"][1])
            for s in self.query(expr)
        }

    def leftovers(self) -> dict[str, list[str]]:
        """Containers, networks and volumes of this project that still exist."""
        prefix = f"{self.project}_"
        found = {
            "containers": _podman("ps", "-a", "--format", "{{.Names}}"),
            "networks": _podman("network", "ls", "--format", "{{.Name}}"),
            "volumes": _podman("volume", "ls", "--format", "{{.Name}}"),
        }
        return {
            kind: [n for n in out.split() if n.startswith(prefix)] for kind, out in found.items()
        }

    def remove_leftovers(self) -> None:
        """Force-remove whatever the project left (after a failure: nothing may leak)."""
        left = self.leftovers()
        for kind, command in (("containers", ["rm", "-f"]), ("volumes", ["volume", "rm", "-f"])):
            if left[kind]:
                subprocess.run(["podman", *command, *left[kind]], capture_output=True, timeout=120)
        if left["networks"]:
            subprocess.run(["podman", "network", "rm", "-f", *left["networks"]], timeout=60)


def _wait_for(
    cluster: Cluster, what: str, check: Callable[[], tuple[bool, Any]], timeout: float
) -> Any:
    """Poll ``check`` (-> (done, state)) until done; fail naming ``what`` and the last state."""
    deadline = time.monotonic() + timeout
    state: Any = None
    while time.monotonic() < deadline:
        try:
            done, state = check()
        except (OSError, ValueError, KeyError) as exc:  # Prometheus not answering yet
            done, state = False, f"{type(exc).__name__}: {exc}"
        if done:
            return state
        time.sleep(3.0)
    pytest.fail(f"{what}: not within {timeout:.0f} s; last state: {state}\n{cluster.logs()}")


def _report(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        print(f"\n[containers] {text}", flush=True)


def _edges() -> set[tuple[int, int]]:
    """Every edge neighbor -> rank of the compose manifest's topology."""
    topology = MANIFEST.build_topology()
    return {
        (neighbor, spec.rank)
        for spec in MANIFEST.peers
        for k in range(max(1, topology.period))
        for neighbor in topology.view(spec.rank, k).in_neighbors
        if neighbor != spec.rank
    }


def _started_at(cluster: Cluster, service: str) -> str:
    return _podman("inspect", "--format", "{{.State.StartedAt}}", cluster.container(service))


def _restart_one_peer(cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    """Restart one peer container while the others train: they must go on, and it must rejoin
    at their step (state transfer from a neighbour or its own checkpoint, whichever is newer)."""
    restarted, others = PEERS[1], [p for p in PEERS if p != PEERS[1]]
    rank = PEERS.index(restarted)
    started_at = {service: _started_at(cluster, service) for service in others}
    before = cluster.by_rank("decentlam_step")
    began = time.monotonic()
    cluster.compose("restart", restarted)

    def rejoined() -> tuple[bool, Any]:
        steps = cluster.by_rank("decentlam_step")
        rejoins = cluster.by_rank("decentlam_rejoins_total")
        done = (
            rejoins.get(rank, 0) >= 1
            and steps.get(rank, 0) > before[rank]
            and all(steps.get(r, 0) >= before[r] + RESUMED_STEPS for r in before if r != rank)
        )
        return done, {"steps": steps, "rejoins": rejoins}

    state = _wait_for(cluster, f"{restarted} rejoins, the others train on", rejoined,
                      CLUSTER_DEADLINE_SECONDS)  # fmt: skip
    for service in others:
        assert _started_at(cluster, service) == started_at[service], f"{service} was restarted"
    seconds = cluster.by_rank("decentlam_rejoin_seconds").get(rank, float("nan"))
    _report(
        capsys,
        f"{restarted} restarted alone: rejoined after {time.monotonic() - began:.0f} s "
        f"(rejoin {seconds:.1f} s), steps {before} -> {state['steps']}; the others went on",
    )


# --- files, checked everywhere -------------------------------------------------------------


def test_override_changes_only_the_prometheus_image() -> None:
    override = yaml.safe_load((ROOT / OVERRIDE).read_text())
    assert override == {"services": {"prometheus": {"image": PROMETHEUS_IMAGE}}}
    script = PREPARE.read_text()
    assert f"PROMETHEUS_IMAGE=${{DECENTLAM_PROMETHEUS_IMAGE:-{PROMETHEUS_IMAGE}}}" in script
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert set(SERVICES) < set(compose["services"]), "the services the test starts"
    for service in PEERS:
        # not compose's 10 s: a stopped peer checkpoints, writes its result file, then exits
        assert compose["services"][service]["stop_grace_period"] == "90s"


def test_prepare_script_usage_errors_are_one_line() -> None:
    result = subprocess.run(
        ["bash", str(PREPARE), "--bogus"], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "prepare-containers: unknown argument --bogus (try --help)\n"
    usage = subprocess.run(
        ["bash", str(PREPARE), "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    assert usage.returncode == 0 and "debootstrap" in usage.stdout and "#" not in usage.stdout


# --- containers -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared() -> Iterator[float]:
    """Run the prepare script once per test run (images cached by podman); yields its seconds."""
    started = time.monotonic()
    _run(["bash", str(PREPARE)], PREPARE_TIMEOUT_SECONDS)
    yield time.monotonic() - started


@containers
@pytest.mark.timeout(PREPARE_TIMEOUT_SECONDS + 120)
def test_prepare_script_is_idempotent(prepared: float, capsys: pytest.CaptureFixture[str]) -> None:
    """A second run finds everything done: no install, no debootstrap, cached image layers."""
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(PREPARE)], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stderr
    assert "installing" not in log and "debootstrap bookworm" not in log, log
    assert "writing" not in log, log
    assert "podman, podman-compose and debootstrap are installed" in log
    assert "is in place" in log and "exists" in log
    assert log.count("is up to date") == 2, log
    images = _podman("images", "--format", "{{.Repository}}:{{.Tag}}").split()
    for image in ("localhost/debian-py:bookworm", "localhost/decentlam:latest"):
        assert image in images, images
    _report(capsys, f"prepare: first run {prepared:.0f} s, second run {seconds:.0f} s")


@containers
@pytest.mark.timeout(PREPARE_TIMEOUT_SECONDS + 5 * CLUSTER_DEADLINE_SECONDS)
def test_compose_cluster_trains_resumes_and_leaves_nothing(
    prepared: float, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster = Cluster(project=f"dltest{os.getpid()}", prometheus_port=free_ports(1)[0])
    edges = _edges()
    _report(capsys, GRAFANA_LEFT_OUT)
    started = time.monotonic()
    try:
        # --no-build: the images are the prepare script's (compose's build has no build args)
        cluster.compose("up", "-d", "--no-build", *SERVICES)
        first_steps: dict[int, float] = {}

        def trained() -> tuple[bool, Any]:
            up = cluster.by_rank('up{job="decentlam"}')
            steps = cluster.by_rank("decentlam_step")
            if not first_steps and len(steps) == len(PEERS):
                first_steps.update(steps)
            samples = cluster.by_edge("decentlam_exchange_latency_seconds_count")
            accuracy = cluster.by_rank('decentlam_eval{metric="accuracy"}')
            done = (
                sorted(up) == list(range(len(PEERS)))
                and all(v == 1 for v in up.values())
                and len(steps) == len(PEERS)
                and all(steps[r] >= TRAINED_STEPS and steps[r] > first_steps[r] for r in steps)
                and all(samples.get(edge, 0) > 0 for edge in edges)
                and len(accuracy) == len(PEERS)
            )
            return done, {"up": up, "steps": steps, "accuracy": accuracy, "samples": samples}

        state = _wait_for(
            cluster, f"4 peers up, >= {TRAINED_STEPS} steps", trained, CLUSTER_DEADLINE_SECONDS
        )
        trained_seconds = time.monotonic() - started
        p50 = cluster.by_edge(
            "1000 * histogram_quantile(0.5, sum by (neighbor, rank, le) "
            "(rate(decentlam_exchange_latency_seconds_bucket[1m])))"
        )
        lines = [
            f"scrape after {trained_seconds:.0f} s: "
            f"{len(state['up'])} targets up, steps {first_steps} -> {state['steps']}",
            "  edge  latency samples  p50 ms (1 m)",
        ]
        for edge in sorted(edges):
            lines.append(
                f"  {edge[0]}->{edge[1]}  {state['samples'][edge]:15.0f}  "
                f"{p50.get(edge, float('nan')):12.1f}"
            )
        _report(capsys, "\n".join(lines))

        if REJOIN:
            _restart_one_peer(cluster, capsys)
        else:
            _report(capsys, NO_REJOIN)

        # Restart every peer container: a graceful stop checkpoints to the named volume.
        cluster.stop_peers()
        for service in PEERS:
            status = _podman("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}",
                             cluster.container(service)).split()  # fmt: skip
            assert status == ["exited", "0"], f"{service} after a graceful stop: {status}"
        stopped = {r: cluster.result_file(r) for r in range(len(PEERS))}
        stopped_steps = {r: int(result["steps"]) for r, result in stopped.items()}
        assert all(step >= TRAINED_STEPS for step in stopped_steps.values()), stopped_steps
        cluster.compose("start", *PEERS)

        def resumed() -> tuple[bool, Any]:
            steps = cluster.by_rank("decentlam_step")
            done = len(steps) == len(PEERS) and all(
                steps[r] >= stopped_steps[r] + RESUMED_STEPS for r in stopped_steps
            )
            return done, steps

        _wait_for(cluster, "every peer trains on after its restart", resumed,
                  CLUSTER_DEADLINE_SECONDS)  # fmt: skip
        accuracy = cluster.by_rank('last_over_time(decentlam_eval{metric="accuracy"}[10m])')
        cluster.stop_peers()
        final = {r: cluster.result_file(r) for r in range(len(PEERS))}
        lines = [
            "peer  stopped at  resumed from  final step  loss     iter ms  accuracy (last eval)"
        ]
        for r, result in final.items():
            # the resumed run starts at the checkpoint the stop wrote to the volume
            assert result["start_step"] == stopped_steps[r], (r, result, stopped_steps)
            assert result["steps"] >= stopped_steps[r] + RESUMED_STEPS, (r, result)
            lines.append(
                f"{r:4d}  {stopped_steps[r]:10d}  {result['start_step']:12d}  "
                f"{result['steps']:10d}  {result['final_loss']:.4f}  "
                f"{1000 * result['mean_iteration_seconds']:7.1f}  {accuracy[r]:.4f}"
            )
        _report(capsys, "\n".join(lines))
        assert all(0.0 <= a <= 1.0 for a in accuracy.values()), accuracy

        cluster.compose("down", "-v", "-t", "30")
        left = cluster.leftovers()
        assert not any(left.values()), f"down -v left {left}"
        _report(
            capsys,
            f"down -v left no container, network or volume; cluster part "
            f"{time.monotonic() - started:.0f} s (prepare {prepared:.0f} s)",
        )
    finally:
        cluster.remove_leftovers()
