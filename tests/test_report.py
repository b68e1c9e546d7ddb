"""``benchmarks/report.py``: the results page generator.

One end-to-end run of the quick mode's smallest section (the bias figure with one method and
two real peers: the page, the plot and the JSON are written, and the real peers' error curve
equals the simulator's), plus fast checks of the pure pieces: the large-batch table and
verdict, the merge with an earlier page, and a benchmark script missing from the build.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_report() -> ModuleType:
    """Import benchmarks/report.py (benchmarks/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["report"] = module
    spec.loader.exec_module(module)
    return module


report = load_report()


@pytest.mark.slow
@pytest.mark.timeout(240)  # two real peer processes: ~30 s idle, ~110 s at load average 30
def test_quick_bias_section_writes_page_plot_and_json(tmp_path: Path) -> None:
    page = tmp_path / "docs" / "RESULTS.md"
    argv = ["--quick", "--sections", "bias", "--bias-nodes", "2", "--bias-methods", "dsgd",
            "--bias-steps", "20", "--page", str(page)]  # fmt: skip
    assert report.main(argv) == 0
    text = page.read_text()
    assert "## 1. The bias of decentralized momentum, through real peers" in text
    assert "Status: **ok**" in text
    assert "load average" in text and "cores" in text
    png = page.parent / "results" / "bias.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload = json.loads((page.parent / "results" / "bias.json").read_text())
    real = payload["real_peers"]["dsgd"]
    simulated = payload["simulator"]["dsgd"]
    # the peers evaluate every step from step 1; the simulator records step 0 too
    by_step = dict(zip(simulated["steps"], simulated["error"], strict=True))
    assert real["steps"] == list(range(1, 21))
    for step, error in zip(real["steps"], real["error"], strict=True):
        assert error == pytest.approx(by_step[step], rel=1e-9)


def run(method: str, batch: str, seed: int, accuracy: float, peers: float) -> dict[str, object]:
    global_batch = {"256": 256, "512": 512, "full": 1432}[batch]
    return {
        "method": method, "batch": batch, "seed": seed, "global_batch": global_batch,
        "steps": 10, "averaged_accuracy": accuracy, "peer_accuracy": [peers, peers],
    }  # fmt: skip


def test_large_batch_table_and_verdict() -> None:
    runs = [
        run("decentlam", "256", 0, 0.95, 0.9), run("decentlam", "256", 1, 0.93, 0.8),
        run("dmsgd", "256", 0, 0.93, 0.5), run("dmsgd", "256", 1, 0.93, 0.5),
        run("decentlam", "full", 0, 0.92, 0.9), run("dmsgd", "full", 0, 0.80, 0.5),
        run("pmsgd", "full", 0, 0.925, 0.925),
    ]  # fmt: skip
    table = report._large_batch_table(runs, ["decentlam", "dmsgd", "pmsgd"], ["256", "full"])
    assert table["decentlam"]["256"]["mean"] == pytest.approx(94.0)
    assert table["decentlam"]["256"]["std"] == pytest.approx(2**0.5)  # stdev of 95, 93
    assert table["decentlam"]["256"]["peer_mean"] == pytest.approx(85.0)
    assert "256" not in table["pmsgd"]
    verdict = "\n".join(report._large_batch_verdict(table, ["256", "full"]))
    assert "global batch 256: DecentLaM - DmSGD = +1.0 points" in verdict
    assert "global batch 1432: DecentLaM - DmSGD = +12.0 points, PmSGD - DecentLaM = +0.5" in (
        verdict
    )
    assert "every global batch >= 512: **yes**" in verdict
    assert "grows with the batch (within 0.5 point of noise): **yes**" in verdict


def test_verdict_says_no_when_the_gap_is_small() -> None:
    runs = [run("decentlam", "512", 0, 0.90, 0.9), run("dmsgd", "512", 0, 0.89, 0.9)]
    table = report._large_batch_table(runs, ["decentlam", "dmsgd"], ["512"])
    assert "every global batch >= 512: **no**" in "\n".join(
        report._large_batch_verdict(table, ["512"])
    )


def test_page_keeps_sections_it_did_not_rerun(tmp_path: Path) -> None:
    page = tmp_path / "RESULTS.md"
    args = report.parse_args(["--quick", "--page", str(page)])
    first = report.Section("large-batch", "2. Large batch", body=["the table"])
    report.write_page([first], args, page)
    second = report.Section("bias", "1. Bias", body=["the figure"])
    report.write_page([second], args, page)
    text = page.read_text()
    assert text.index("## 1. Bias") < text.index("## 2. Large batch")
    assert "the table" in text and "the figure" in text
    assert text.count("<!-- section: ") == 2


def test_missing_script_is_reported_not_available(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = report.ExternalScript("benchmarks/not-here.py", "9. Missing", "nothing")
    monkeypatch.setitem(report.EXTERNAL, "scaling", missing)
    args = report.parse_args(["--quick"])
    section = report.run_section("scaling", args, tmp_path, tmp_path)
    assert section.status == "not available"
    assert "Not available in this build: `benchmarks/not-here.py` does not exist" in "\n".join(
        section.body
    )


def test_unknown_section_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        report.parse_args(["--sections", "bias,nope"])
    assert exit_info.value.code == 2
    assert "unknown section(s) nope" in capsys.readouterr().err


def test_reuse_keeps_only_runs_the_current_settings_would_repeat(tmp_path: Path) -> None:
    args = report.parse_args(["--quick", "--min-steps", "150"])
    config = {k: getattr(args, k) for k in report.LARGE_BATCH_CONFIG}
    earlier = {**config, "min_steps": 0}
    runs = [
        {"method": "dmsgd", "batch": "256", "seed": 0, "steps": 169},  # set by the epochs
        {"method": "dmsgd", "batch": "full", "seed": 0, "steps": 30},  # now floored at 150
    ]
    path = tmp_path / "large_batch.json"
    path.write_text(json.dumps({"config": earlier, "runs": runs}))
    assert list(report._reusable_runs(path, config)) == [("dmsgd", "256", 0)]
    path.write_text(json.dumps({"config": {**earlier, "hidden": 7}, "runs": runs}))
    assert report._reusable_runs(path, config) == {}


def test_digits_task_label_split_is_the_simulators() -> None:
    from peer.simulation.problems import split_digits
    from peer.training.tasks import digits_task

    split = split_digits(8, "label", 0.5, 0.2, 3)
    for rank in (0, 5):
        task = digits_task(rank, 8, split="label", seed=3, batch_size=0)
        assert task.train_y.tolist() == split.train_y[split.shards[rank]].tolist()
        assert len(set(task.train_y.tolist())) <= 2  # label-sorted shards: one or two classes


FAKE_SCRIPT = """
import argparse, json, sys, time
parser = argparse.ArgumentParser()
parser.add_argument("--out")
parser.add_argument("--sleep", type=float, default=0.0)
args = parser.parse_args()
time.sleep(args.sleep)
open(args.out, "w").write(json.dumps({"rows": [1]}))
print("size  GB/s")
print("1MB   0.5")
"""


def test_external_script_output_json_and_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = tmp_path / "fake.py"
    script.write_text(FAKE_SCRIPT)
    fake = report.ExternalScript(str(script), "3. Fake", "a fake", quick_args=(("--sleep", "0"),))
    monkeypatch.setitem(report.EXTERNAL, "exchange", fake)
    args = report.parse_args(["--quick", "--script-timeout", "60"])
    section = report.run_section("exchange", args, tmp_path, tmp_path)
    assert section.status == "ok", section.body
    assert "1MB   0.5" in section.body and json.loads((tmp_path / "exchange.json").read_text())
    assert section.command.endswith("--sleep 0")
    slow = dataclasses.replace(fake, quick_args=(("--sleep", "30"),))
    monkeypatch.setitem(report.EXTERNAL, "exchange", slow)
    args = report.parse_args(["--quick", "--script-timeout", "3"])
    section = report.run_section("exchange", args, tmp_path, tmp_path)
    assert section.status == "failed"
    assert "The script overran its 3 s deadline." in section.body
