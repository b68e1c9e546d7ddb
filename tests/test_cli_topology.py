"""``decentlam topology show`` and ``decentlam manifest init|check``, run in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.cli import main
from topology.manifest import load_manifest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_show_ring_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["topology", "show", "--graph", "ring", "--nodes", "8"]) == 0
    out = capsys.readouterr().out
    assert "graph ring, 8 peers, weights metropolis, iteration 0" in out
    assert "   0  0.3333  1 (0.3333), 7 (0.3333)" in out
    assert "rho (consensus rate) of W:   0.8047" in out
    assert "spectral gap 1 - rho:        0.1953" in out
    assert "sends 2..2 messages" in out


def test_show_acceptance_numbers_json(capsys: pytest.CaptureFixture[str]) -> None:
    ring = run_json(
        capsys, "topology", "show", "--graph", "ring", "--nodes", "8", "--weights", "uniform"
    )
    assert round(ring["rho"], 4) == 0.8047
    assert ring["spectral_gap"] == pytest.approx(1 - ring["rho"])
    assert ring["neighbors"]["0"] == {
        "self": pytest.approx(1 / 3),
        "in": {"1": pytest.approx(1 / 3), "7": pytest.approx(1 / 3)},
        "out": [1, 7],
        "bytes_sent": 2 * 44_000_000,
        "bytes_received": 2 * 44_000_000,
    }
    assert len(ring["mixing_matrix"]) == 8 and ring["time_varying"] is False
    for key in (
        "graph",
        "nodes",
        "weights",
        "iteration",
        "period",
        "messages_per_peer",
        "bytes_per_peer",
    ):
        assert key in ring
    exp = run_json(
        capsys, "topology", "show", "--graph", "exp", "--nodes", "8", "--weights", "uniform"
    )
    assert exp["rho"] == pytest.approx(1 / 3) and exp["graph"] == "exponential"
    full = run_json(capsys, "topology", "show", "--graph", "full", "--nodes", "8")
    assert full["rho"] == 0.0 and full["spectral_gap"] == 1.0


def test_show_time_varying(capsys: pytest.CaptureFixture[str]) -> None:
    data = run_json(
        capsys,
        "topology",
        "show",
        "--graph",
        "one-peer-exponential",
        "--nodes",
        "8",
        "--iteration",
        "1",
        "--model-bytes",
        "1000",
    )
    assert data["time_varying"] and data["period"] == 3 and data["iteration"] == 1
    assert data["period_rate"] == 0.0
    assert data["neighbors"]["0"]["out"] == [2] and data["neighbors"]["0"]["in"] == {"6": 0.5}
    assert data["messages_per_peer"]["max"] == 1
    assert data["bytes_per_peer"]["sent_max"] == 1000
    assert data["symmetric"] is False
    assert main(["topology", "show", "--graph", "one-peer-exponential", "--nodes", "8"]) == 0
    assert "period rate (product of 3):  0.0000" in capsys.readouterr().out


def test_show_large_graph_summarises_matrix(capsys: pytest.CaptureFixture[str]) -> None:
    data = run_json(
        capsys, "topology", "show", "--graph", "torus", "--nodes", "20", "--param", "rows=4"
    )
    assert "mixing_matrix" not in data and data["params"] == {"rows": 4}
    assert data["matrix_summary"]["nnz"] == 20 * 5
    assert (
        main(
            [
                "topology",
                "show",
                "--graph",
                "random-regular",
                "--nodes",
                "100",
                "--param",
                "degree=4",
                "--param",
                "seed=2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "100 x 100, 500 nonzeros" in out and "36 more peers (use --json)" in out


def test_show_explicit_edges_param(capsys: pytest.CaptureFixture[str]) -> None:
    data = run_json(
        capsys,
        "topology",
        "show",
        "--graph",
        "explicit",
        "--nodes",
        "3",
        "--param",
        "edges=[[0, 1], [1, 2]]",
    )
    assert data["neighbors"]["1"]["out"] == [0, 2]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--graph", "rnig", "--nodes", "4"], "unknown graph 'rnig' (did you mean 'ring'?"),
        (["--graph", "hypercube", "--nodes", "6"], "n must be a power of two, got 6"),
        (["--graph", "star", "--nodes", "5", "--weights", "uniform"], "try --weights metropolis"),
        (
            ["--graph", "directed-exponential", "--nodes", "8", "--weights", "metropolis"],
            "need an undirected graph",
        ),
        (["--graph", "ring", "--nodes", "0"], "--nodes: must be >= 1"),
        (["--graph", "ring", "--nodes", "4", "--param", "rows"], "expected KEY=VALUE"),
        (["--graph", "ring", "--nodes", "4", "--param", "rows=2"], "does not take parameter"),
        (["--graph", "ring", "--nodes", "4", "--iteration", "-1"], "--iteration: must be >= 0"),
    ],
)
def test_show_user_errors(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(["topology", "show", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("decentlam: error: ") and message in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_manifest_init_check_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "m.yaml"
    argv = [
        "manifest",
        "init",
        "--nodes",
        "8",
        "--graph",
        "torus",
        "--param",
        "rows=2",
        "--hosts",
        "10.0.0.1,10.0.0.2",
        "--base-port",
        "7000",
        "--algorithm",
        "dsgd",
        "--task",
        "linreg",
        "--steps",
        "30",
        "--lr",
        "0.05",
        "-o",
        str(path),
    ]
    assert main(argv) == 0
    assert f"wrote {path}: 8 peers, graph torus" in capsys.readouterr().out
    manifest = load_manifest(path)
    assert manifest.world_size == 8 and manifest.peers[4].host == "10.0.0.2"
    assert manifest.peers[4].port == 7000
    assert manifest.training.algorithm == "dsgd" and manifest.training.steps == 30
    assert manifest.topology.params == {"rows": 2}
    assert main(argv) == 2
    assert "already exists (use --force" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0
    capsys.readouterr()

    assert main(["manifest", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path}: OK (version 1, digest {manifest.digest()[:16]})" in out
    assert "peers: 8 on 2 host(s)" in out
    assert "topology: torus (rows=2), weights metropolis, rho 0.5000" in out
    summary = run_json(capsys, "manifest", "check", str(path))
    assert summary["digest"] == manifest.digest() and summary["rho"] == pytest.approx(0.5)


def test_manifest_init_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["manifest", "init", "--nodes", "4", "--graph", "exponential"]) == 0
    out = capsys.readouterr().out
    modeline, header = out.splitlines()[:2]  # the first line is for editors (JSON Schema)
    assert modeline.startswith("# yaml-language-server: $schema=")
    assert header.startswith("# decentlam cluster manifest") and "graph: exponential" in out


def test_manifest_check_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["manifest", "check", str(EXAMPLES / "local-4.yaml")]) == 0
    assert "peers: 4 on 1 host(s)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["init", "--nodes", "6", "--graph", "hypercube"], "topology.graph: cannot build"),
        (
            ["init", "--nodes", "4", "--graph", "ring", "--algorithm", "adam"],
            "training.algorithm: 'adam' is not one of",
        ),
        (["init", "--nodes", "4", "--graph", "ring", "--lr", "0"], "training.lr: must be > 0"),
        (
            ["init", "--nodes", "4", "--graph", "ring", "--base-port", "70000"],
            "peers[0].port: 70000 is out of range 1..65535",
        ),
        (["init", "--nodes", "4", "--graph", "ring", "--device", "tpu"], "invalid device 'tpu'"),
        (["check", "/nonexistent/m.yaml"], "manifest file not found"),
    ],
)
def test_manifest_user_errors(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(["manifest", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("decentlam: error: ") and message in err
    assert err.count("\n") == 1


def test_manifest_check_invalid_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "version: 1\npeers:\n- {rank: 0, port: 5000}\n- {rank: 0, port: 5001}\n"
        "topology: {graph: ring}\n"
    )
    assert main(["manifest", "check", str(path)]) == 2
    assert "peers[1].rank: duplicate rank 0 (also peers[0])" in capsys.readouterr().err


def test_subcommand_without_action_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["topology"]) == 2
    assert "show" in capsys.readouterr().out
