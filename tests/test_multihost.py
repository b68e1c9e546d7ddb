"""Peers on several network-namespace hosts, started the way an operator starts them: one
``decentlam peer --manifest m.yaml`` per peer, no ``--rank``, no environment set by hand.

Each test builds its own namespace hosts (``tests/netns.py``) and tears them down; traffic only
goes to the 10.77.0.0/24 addresses inside them.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.netns import NetnsHosts, netns_hosts  # noqa: F401 - the fixture
from topology.manifest import dump_manifest, init_manifest

REPO_ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.netns, pytest.mark.slow]


def peer_env() -> dict[str, str]:
    """The test's environment minus anything that would steer gloo by hand."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "DECENTLAM_RANK"}
    }
    env.update(
        PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
        DECENTLAM_TORCH_THREADS="1",
    )  # fmt: skip
    return env


def start_peers(
    hosts: NetnsHosts, manifest: Path, out: Path, per_host: int, world_size: int, *extra: str
) -> list[Any]:
    """One ``decentlam peer`` per rank on its host; ``--local-index`` only where a host has
    several peers."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    processes = []
    for rank in range(world_size):
        argv = [
            sys.executable, "-m", "launcher.cli", "--log-level", "INFO", "peer",
            "--manifest", str(manifest), "--out", str(out), "--linger-seconds", "20", *extra,
        ]  # fmt: skip
        if per_host > 1:
            argv += ["--local-index", str(rank % per_host)]
        with open(out / "logs" / f"rank-{rank}.log", "wb") as log:
            processes.append(hosts.popen(rank // per_host, argv, log=log, env=peer_env()))
    return processes


def wait_all(processes: list[Any], out: Path, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    codes = [p.poll() for p in processes]
    if None in codes:
        raise AssertionError(f"peers still running after {timeout} s: {codes}\n{logs(out)}")
    return [int(c) for c in codes]


def logs(out: Path) -> str:
    parts = []
    for path in sorted((out / "logs").glob("rank-*.log")):
        lines = path.read_text(errors="replace").splitlines()[-15:]
        parts.append(f"--- {path.name}\n" + "\n".join(lines))
    return "\n".join(parts)


def results(out: Path, world_size: int) -> list[dict[str, Any]]:
    return [json.loads((out / f"peer-{r}.json").read_text()) for r in range(world_size)]


def write_manifest(path: Path, hosts: NetnsHosts, nodes: int, per_host: int, **kw: Any) -> Path:
    addresses = [hosts.address(h) for h in range(hosts.n)]
    manifest = init_manifest(nodes, hosts=addresses, peers_per_host=per_host, **kw)
    path.write_text(dump_manifest(manifest))
    return path


# Eight torch processes start at once on the 2 shared cores: start-up dominates.
@pytest.mark.timeout(240)
def test_eight_peers_on_four_hosts_train_digits(netns_hosts, tmp_path: Path) -> None:  # noqa: F811
    hosts = netns_hosts(4)
    manifest = write_manifest(
        tmp_path / "m.yaml", hosts, 8, 2, graph="exponential", algorithm="decentlam",
        task="digits", steps=250, lr=0.1, batch_size=32, seed=0,
    )  # fmt: skip
    out = tmp_path / "out"
    processes = start_peers(hosts, manifest, out, 2, 8)
    codes = wait_all(processes, out, timeout=200)
    assert codes == [0] * 8, f"exit codes {codes}\n{logs(out)}"
    found = results(out, 8)
    accuracies = [r["eval"]["accuracy"] for r in found]
    assert min(accuracies) >= 0.95, accuracies
    assert all(not r["stopped_early"] and r["steps"] == 250 for r in found)
    # Each peer found its own entry (rank r ran on host r // 2) and told the operator so.
    for rank in range(8):
        text = (out / "logs" / f"rank-{rank}.log").read_text()
        assert f"this machine is peer {rank} of the manifest" in text
        address = f"{hosts.address(rank // 2)}:{50051 + rank % 2}"
        assert f"decentlam: peer {rank}/8 on {address} (decentlam, exponential)" in text
        assert f"decentlam: peer {rank}: finished at step 250" in text
        latency = found[rank]["exchange_latency"]
        assert latency and all(0 < v["p50_seconds"] <= v["p95_seconds"] for v in latency.values())


@pytest.mark.timeout(180)
def test_pmsgd_across_hosts_needs_no_environment(netns_hosts, tmp_path: Path) -> None:  # noqa: F811
    hosts = netns_hosts(4)
    manifest = write_manifest(
        tmp_path / "m.yaml", hosts, 4, 1, graph="ring", algorithm="pmsgd", task="digits",
        steps=30, lr=0.1, batch_size=32, seed=0,
    )  # fmt: skip
    out = tmp_path / "out"
    processes = start_peers(hosts, manifest, out, 1, 4)
    codes = wait_all(processes, out, timeout=150)
    assert codes == [0] * 4, f"exit codes {codes}\n{logs(out)}"
    found = results(out, 4)
    assert all(r["steps"] == 30 and not r["stopped_early"] for r in found)
    # An exact all-reduce keeps the replicas identical: the same final accuracy everywhere.
    assert len({r["eval"]["accuracy"] for r in found}) == 1
    for rank in range(4):
        text = (out / "logs" / f"rank-{rank}.log").read_text()
        assert "joined gloo process group" in text and "(interface eth0)" in text


@pytest.mark.timeout(200)
def test_cut_link_peers_give_up_cleanly(netns_hosts, tmp_path: Path) -> None:  # noqa: F811
    """Host 3's link is cut mid-run: no peer hangs or dies with a traceback; each one that
    gives up says which neighbour failed in one line, checkpoints, writes peer-<r>.json
    (stopped_early, stop_reason) and exits 1."""
    import yaml

    hosts = netns_hosts(4)
    manifest = init_manifest(
        4, "ring", hosts=[hosts.address(h) for h in range(4)], peers_per_host=1,
        algorithm="decentlam", task="digits", steps=100_000, lr=0.05, checkpoint_every=5,
    )  # fmt: skip
    data = manifest.to_dict()
    data["exchange"].update(fetch_deadline_seconds=4.0, max_retries=2)
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    processes = start_peers(hosts, path, out, 1, 4)
    deadline = time.monotonic() + 120
    while not all((out / f"rank-{r}.pt").exists() for r in range(4)):
        assert time.monotonic() < deadline, f"peers did not start training\n{logs(out)}"
        assert all(p.poll() is None for p in processes), logs(out)
        time.sleep(0.2)
    hosts.cut(3)
    codes = wait_all(processes, out, timeout=60)
    found = results(out, 4)
    for rank in (0, 2):  # host 3's neighbours on the ring blame it
        assert codes[rank] == 1, f"exit codes {codes}\n{logs(out)}"
        assert found[rank]["stopped_early"] and found[rank]["failed"]
        assert "peer 3" in found[rank]["stop_reason"], found[rank]["stop_reason"]
    for rank in range(4):
        text = (out / "logs" / f"rank-{rank}.log").read_text()
        assert "Traceback" not in text, text
        assert found[rank]["stopped_early"] and found[rank]["stop_reason"]
        if codes[rank] == 1:
            errors = [line for line in text.splitlines() if line.startswith("decentlam: error:")]
            assert len(errors) == 1 and f"peer {rank}:" in errors[0], text
        assert found[rank]["steps"] >= 5
