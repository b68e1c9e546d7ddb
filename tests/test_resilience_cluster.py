"""Failures over real peer processes: kill -9 with and without restart, a cut link, a torn
checkpoint. Faults are injected deterministically (``DECENTLAM_FAULTS``, peer.faults)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from peer.faults import FaultSpecError, LinkDrop, parse_faults
from peer.training.checkpoint import load_checkpoint
from tests.test_cluster import N, write_manifest

SLOW_STEP = ",".join(f"delay:{r}=0.02" for r in range(N))  # ~50 steps per second per peer
# Slower still where a restarted peer must find its neighbours training: interpreter and torch
# start-up alone took ~20 s on the loaded 2-core reference machine.
SLOWER_STEP = ",".join(f"delay:{r}=0.05" for r in range(N))


def launch(tmp_path: Path, steps: int, faults: str, *flags: str) -> tuple[int, str, Path]:
    manifest = write_manifest(tmp_path / "m.yaml", algorithm="dsgd", graph="ring", steps=steps)
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "DECENTLAM_FAULTS": faults,
    }
    done = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "launch", "--manifest", str(manifest),
         "--out", str(out), "--quiet", *flags],
        capture_output=True, text=True, env=env, timeout=110,
    )  # fmt: skip
    return done.returncode, done.stderr, out


def peer_json(out: Path, rank: int) -> dict:
    return json.loads((out / f"peer-{rank}.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_killed_peer_restarts_and_rejoins_while_a_link_is_cut(tmp_path: Path) -> None:
    steps = 700  # long enough for a restart on a loaded machine
    code, stderr, out = launch(
        tmp_path, steps, f"drop:0->1@20+20,kill:2@100,{SLOWER_STEP}", "--max-restarts", "1"
    )
    logs = "\n".join((out / "logs" / f"rank-{r}.log").read_text()[-3000:] for r in range(N))
    assert code == 0, stderr + logs
    assert "restarting it (1/1)" in stderr
    for rank in range(N):
        assert peer_json(out, rank)["steps"] == steps, logs  # everyone finished every step
    rejoins = peer_json(out, 2)["membership"]["rejoins"]
    assert rejoins and rejoins[0]["kind"] == "restart" and rejoins[0]["step"] > 100, logs
    assert rejoins[0]["seconds"] < 60
    assert peer_json(out, 2)["membership"]["incarnation"] == 1
    # peer 1 lost 0 (cut link) and 2 (killed) and re-admitted both
    assert peer_json(out, 1)["membership"]["membership_changes"] >= 4, logs
    assert peer_json(out, 1)["membership"]["down_at_end"] == []
    summary = json.loads((out / "summary.json").read_text())
    assert summary["supervision"]["restarts"] == {"2": 1}
    assert summary["supervision"]["rejoin_seconds"]["2"] == [rejoins[0]["seconds"]]
    assert [e["event"] for e in summary["supervision"]["events"]] == ["restarted"]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_dead_peer_without_restart_does_not_stop_the_others(tmp_path: Path) -> None:
    steps = 200
    code, stderr, out = launch(tmp_path, steps, f"kill:2@30,{SLOW_STEP}")
    assert code == 1  # a peer stayed down: said in the status, but the run finished
    assert "peer 2 exited with status -9; the others go on" in stderr
    assert "stayed down" in stderr
    for rank in (0, 1, 3):
        result = peer_json(out, rank)
        assert result["steps"] == steps and not result["stopped_early"]
    assert peer_json(out, 1)["membership"]["down_at_end"] == [2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["supervision"]["peers_down"] == [2]


def test_fault_specs_parse_and_errors_name_the_entry() -> None:
    plan = parse_faults("kill:2@140, drop:0->1@50+20,delay:3=0.05,stall:1@80=20")
    assert plan.kills == {2: 140} and plan.delays == {3: 0.05} and plan.stalls == {1: (80, 20.0)}
    assert plan.drops == (LinkDrop(0, 1, 50, 20),)
    assert plan.link_cut(0, 1, 50) and plan.link_cut(0, 1, 69)
    assert not plan.link_cut(0, 1, 70) and not plan.link_cut(1, 0, 55)
    assert parse_faults("").empty and parse_faults(None).empty
    with pytest.raises(FaultSpecError, match="'kill:x@1'"):
        parse_faults("kill:x@1")


def test_peer_killed_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from peer.training import checkpoint

        model = torch.nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        checkpoint.save_checkpoint({str(tmp_path)!r}, 0, model=model, optimizer=opt, step=7)

        def torn_save(obj, handle):
            handle.write(b"PK\\x03\\x04 half a checkpoint")
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)  # kill -9 in the middle of the write

        torch.save = torn_save
        checkpoint.save_checkpoint({str(tmp_path)!r}, 0, model=model, optimizer=opt, step=8)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run([sys.executable, "-c", script], env=env, timeout=60)
    assert done.returncode == -9
    payload = load_checkpoint(tmp_path / "rank-0.pt")
    assert payload["step"] == 7
    assert set(payload["model"]) == {"weight", "bias"}
    assert isinstance(payload["model"]["weight"], torch.Tensor)
