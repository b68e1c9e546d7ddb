"""Start-up of a peer: a stop request ends the start-up waits at once, and the error names the
neighbours that are missing (a one-line PeerSetupError, not a traceback)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from peer.process import PeerSetupError, check_identical_init, wait_for_neighbors
from peer.transport.grpc.communicator import GrpcCommunicator
from tests.conftest import GrpcPeers, ShiftTopology
from tests.test_cluster import write_manifest


def _stop_after(seconds: float) -> threading.Event:
    stop = threading.Event()
    timer = threading.Timer(seconds, stop.set)
    timer.daemon = True
    timer.start()
    return stop


def test_digest_wait_ends_on_stop_and_names_the_silent_neighbour(grpc_peers: GrpcPeers) -> None:
    a, _b = grpc_peers(2, topology=ShiftTopology(2))  # b is up but never publishes a digest
    model = torch.nn.Linear(3, 1)
    started = time.monotonic()
    with pytest.raises(PeerSetupError, match=r"digest from peers \[1\].*still starting"):
        check_identical_init(a, ShiftTopology(2), model, _stop_after(0.3))
    assert time.monotonic() - started < 3.0


def test_neighbour_wait_ends_on_stop_and_names_the_missing_one() -> None:
    gone = GrpcCommunicator.start(1, {}, world_size=2)
    address = gone.address
    gone.close()
    comm = GrpcCommunicator.start(0, {1: address}, world_size=2)
    try:
        started = time.monotonic()
        with pytest.raises(PeerSetupError, match=f"stopped during start-up.*1 at {address}"):
            wait_for_neighbors(comm, 30.0, _stop_after(0.3))
        assert time.monotonic() - started < 3.0
    finally:
        comm.close()


@pytest.mark.slow
def test_sigterm_while_neighbours_are_missing_exits_at_once_naming_them(tmp_path: Path) -> None:
    """Peer 0 of a 4-ring runs alone; SIGTERM ends its wait for peers 1 and 3 within seconds."""
    manifest = write_manifest(tmp_path / "m.yaml", algorithm="dsgd", graph="ring", steps=5)
    peer = subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", "--log-level", "info", "peer", "--manifest",
         str(manifest), "--rank", "0", "--out", str(tmp_path / "out")],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert peer.stderr is not None
        for line in peer.stderr:
            if "serving on port" in line:
                break
        time.sleep(0.5)
        peer.send_signal(signal.SIGTERM)
        started = time.monotonic()
        seen = []
        for line in peer.stderr:  # up to the error line: printed before interpreter exit
            seen.append(line)
            if line.startswith("decentlam: error:"):
                break
        # the connect deadline is 60 s: far under it means the stop ended the wait (the bound
        # leaves room for a loaded machine)
        assert time.monotonic() - started < 15.0, "the stop was not seen during start-up"
        stderr = "".join(seen) + peer.stderr.read()
        peer.wait(timeout=60)
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.wait()
    assert peer.returncode == 2, stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("decentlam: error:")]
    assert len(errors) == 1 and "stopped during start-up" in errors[0], stderr
    assert " 1 at 127.0.0.1:" in errors[0] and " 3 at 127.0.0.1:" in errors[0], errors[0]
    report = json.loads((tmp_path / "out" / "peer-0.json").read_text())
    assert report["stopped_early"] and report["steps"] == 0
    assert report["stop_reason"].startswith("stopped during start-up"), report


@pytest.mark.slow
def test_a_stopped_peer_exits_without_lingering_for_its_readers(tmp_path: Path) -> None:
    """SIGTERM to peer 0 alone: it checkpoints and exits at once, although its readers (peers 1
    and 3, still running) have not fetched a final step; a stop does not linger."""
    from launcher.cluster import LocalCluster

    manifest = write_manifest(tmp_path / "m.yaml", algorithm="dsgd", graph="ring", steps=10**6)
    out = tmp_path / "out"
    cluster = LocalCluster(manifest, out, ["--linger-seconds", "60"])
    cluster.start()
    try:
        deadline = time.monotonic() + 80
        while time.monotonic() < deadline:  # every peer a few steps in (from its metrics)
            steps = [p.step for p in cluster.progress().values()]
            if len(steps) == 4 and all(step >= 2 for step in steps):
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"peers did not start training: {cluster.log_tail(0)}")
        victim = cluster.peers[0].process
        victim.send_signal(signal.SIGTERM)
        started = time.monotonic()
        log = cluster.peers[0].log_path
        while time.monotonic() - started < 30 and "done:" not in log.read_text():
            time.sleep(0.1)  # "peer 0 done: <result file>" is logged once it stopped serving
        elapsed = time.monotonic() - started
        victim.wait(timeout=60)
    finally:
        cluster.stop(grace_seconds=5)
    assert victim.returncode == 0, cluster.log_tail(0)
    # --linger-seconds is 60: far under it means the peer did not wait for its readers
    assert elapsed < 15.0, f"peer 0 took {elapsed:.1f} s to finish after SIGTERM"
    assert "not lingering" in cluster.log_tail(0, lines=200)
