"""``decentlam simulate``: table, result.json and error.png from a tiny configuration."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from launcher.cli import main

logger = logging.getLogger(__name__)


def test_simulate_writes_result_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    code = main(
        [
            "simulate",
            "--nodes",
            "4",
            "--steps",
            "200",
            "--lr",
            "0.01",
            "--algorithms",
            "dsgd,dmsgd,decentlam,pmsgd",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "decentlam" in printed and "iters to 1.1x floor" in printed
    result = json.loads((out / "result.json").read_text())
    assert result["config"]["nodes"] == 4 and result["config"]["graph"] == "ring"
    methods = {m["algorithm"]: m for m in result["methods"]}
    assert set(methods) == {"dsgd", "dmsgd", "decentlam", "pmsgd"}
    assert len(methods["dsgd"]["error"]) == len(methods["dsgd"]["steps"]) == 201
    assert methods["dmsgd"]["final_error"] > methods["decentlam"]["final_error"]
    assert (out / "error.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simulate_digits_reports_accuracy(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(
        [
            "simulate",
            "--problem",
            "digits-logreg",
            "--nodes",
            "4",
            "--steps",
            "20",
            "--batch-size",
            "8",
            "--algorithms",
            "decentlam",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    assert "test acc" in capsys.readouterr().out
    method = json.loads((tmp_path / "result.json").read_text())["methods"][0]
    assert 0.0 <= method["test_accuracy"] <= 1.0 and method["final_error"] is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--algorithms", "adam"], "unknown algorithm"),
        (["--problem", "mnist"], "unknown problem"),
        (["--graph", "moebius"], "moebius"),
        (["--nodes", "1"], "--nodes"),
        (["--lr", "-1"], "--lr"),
    ],
)
def test_bad_input_is_a_one_line_usage_error(
    argv: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    assert main(["simulate", "--steps", "2", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("decentlam: error:") and message in err and "\n" not in err
