"""PmSGD's rendezvous is bounded and stoppable: a group that never forms ends in a one-line
error at the deadline, and a SIGTERM while waiting ends the peer at once with exit 0 and a
``peer-<r>.json`` saying why (loopback, two real peer processes that never meet: each is sent
to a different rendezvous address)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from launcher.cluster import free_ports
from topology.manifest import init_manifest

# Start-up of two torch processes takes tens of seconds on a loaded 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

REPO_ROOT = Path(__file__).resolve().parent.parent


def start_pair(
    tmp_path: Path, connect_deadline: float
) -> tuple[list[subprocess.Popen[bytes]], Path]:
    manifest = init_manifest(2, "ring", algorithm="pmsgd", task="linreg", steps=5)
    data = manifest.to_dict()
    ports = free_ports(4)
    for i, peer in enumerate(data["peers"]):
        peer.update(port=ports[i], metrics_port=None)
    data["exchange"]["connect_deadline_seconds"] = connect_deadline
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "DECENTLAM_TORCH_THREADS": "1"}
    processes = []
    for rank in range(2):
        command = [
            sys.executable, "-m", "launcher.cli", "--log-level", "INFO", "peer",
            "--manifest", str(path), "--rank", str(rank), "--out", str(out),
            # Different rendezvous addresses: the group can never form.
            "--dist-init-method", f"tcp://127.0.0.1:{ports[2 + rank]}",
        ]  # fmt: skip
        with open(out / f"rank-{rank}.log", "wb") as log:
            processes.append(
                subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            )
    return processes, out


def log(out: Path, rank: int) -> str:
    return (out / f"rank-{rank}.log").read_text(errors="replace")


def wait_all(processes: list[subprocess.Popen[bytes]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in processes):
        assert time.monotonic() < deadline, "peers did not exit"
        time.sleep(0.1)


def test_rendezvous_deadline_is_a_one_line_error(tmp_path: Path) -> None:
    processes, out = start_pair(tmp_path, connect_deadline=4.0)
    try:
        wait_all(processes, 200)
    finally:
        for p in processes:
            p.kill()
    for rank, process in enumerate(processes):
        text = log(out, rank)
        assert process.returncode == 2, text
        assert "Traceback" not in text and "frame #" not in text, text
        errors = [line for line in text.splitlines() if line.startswith("decentlam: error:")]
        assert len(errors) == 1 and "rendezvous at tcp://127.0.0.1:" in errors[0], text


def test_sigterm_during_rendezvous_stops_at_once(tmp_path: Path) -> None:
    processes, out = start_pair(tmp_path, connect_deadline=120.0)
    try:
        deadline = time.monotonic() + 150
        while not all("waiting for the gloo rendezvous" in log(out, r) for r in range(2)):
            assert time.monotonic() < deadline, log(out, 0) + log(out, 1)
            assert all(p.poll() is None for p in processes), log(out, 0) + log(out, 1)
            time.sleep(0.1)
        stopped_at = time.monotonic()
        for p in processes:
            p.send_signal(signal.SIGTERM)
        wait_all(processes, 60)
        # "At once": within the rendezvous poll plus exit, not at the 120 s deadline (a few
        # seconds on an idle machine; up to ~20 s seen at load 40 on 2 cores).
        assert time.monotonic() - stopped_at < 40
    finally:
        for p in processes:
            p.kill()
    for rank, process in enumerate(processes):
        text = log(out, rank)
        assert process.returncode == 0, text
        assert "Traceback" not in text, text
        result = json.loads((out / f"peer-{rank}.json").read_text())
        assert result["stopped_early"] and not result["failed"]
        assert "stopped during the gloo rendezvous" in result["stop_reason"], result
