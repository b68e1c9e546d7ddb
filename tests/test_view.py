"""The live cluster view of ``decentlam launch`` (launcher/view.py), without a screen: rich's
recording Console stands in for the terminal, a StringIO for a CI log."""

from __future__ import annotations

import io
import math
from pathlib import Path

from rich.console import Console

from launcher.cluster import PeerProgress, parse_progress
from launcher.view import ClusterView, format_line

NAN = math.nan


def terminal() -> Console:
    return Console(record=True, force_terminal=True, width=120, file=io.StringIO())


def rows(text: str) -> dict[str, list[str]]:
    """Table rows by rank: the cells between the box-drawing separators."""
    found = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.replace("┃", "│").split("│")]
        cells = [c for c in cells if c != ""] if len(cells) > 2 else []
        if cells and cells[0].isdigit():
            found[cells[0]] = cells[1:]
    return found


SCRAPE = {
    0: PeerProgress(
        step=12, loss=0.51234, accuracy=0.875, latency_p50_seconds=0.0042,
        blocked_share=0.25, reachable=True,
    ),
    1: PeerProgress(step=10, loss=0.6, latency_p50_seconds=0.0052, reachable=True),  # no accuracy
    2: PeerProgress(),  # did not answer
}  # fmt: skip


def test_live_table_has_one_row_per_peer() -> None:
    console = terminal()
    view = ClusterView(4, 100, console=console)
    assert view.live
    with view:
        view.update(SCRAPE)
    text = console.export_text()
    table = rows(text)
    assert table["0"] == ["12", "0.5123", "0.875", "4.2 ms", "25%", "up"]
    assert table["1"] == ["10", "0.6000", "5.2 ms", "up"]  # empty accuracy and blocked cells
    assert table["2"] == ["down"]
    assert table["3"] == ["-"]  # never scraped
    assert "step 10/100" in text and "2/4 peers up" in text
    assert "nan" not in text.lower()


def test_a_peer_that_stops_answering_keeps_its_last_row() -> None:
    console = terminal()
    view = ClusterView(2, 20, console=console)
    view.update({0: SCRAPE[0], 1: SCRAPE[1]})
    view.update({1: PeerProgress(step=20, loss=0.1, reachable=True)})  # rank 0 exited
    console.print(view.render(view._progress))
    table = rows(console.export_text())
    assert table["0"] == ["12", "0.5123", "0.875", "4.2 ms", "25%", "-"]
    assert table["1"] == ["20", "0.1000", "up"]


def test_a_peer_that_finished_shows_done_with_its_last_values() -> None:
    console = terminal()
    view = ClusterView(3, 12, console=console)
    view.update({0: SCRAPE[0], 1: SCRAPE[1], 2: PeerProgress(step=3, reachable=True)})
    # rank 0 exited 0 (its run is complete), rank 2 died: no row
    view.update({0: PeerProgress(finished=True), 1: SCRAPE[1]})
    console.print(view.render(view._progress))
    text = console.export_text()
    table = rows(text)
    assert table["0"] == ["12", "0.5123", "0.875", "4.2 ms", "25%", "done"]
    assert table["1"] == ["10", "0.6000", "5.2 ms", "up"]
    assert table["2"] == ["3", "-"]
    assert "1/3 peers up, 1 done" in text
    assert format_line(view._progress, 12, 3).endswith("1/3 peers up, 1 done")


def test_cluster_progress_marks_finished_peers(tmp_path: Path) -> None:
    """LocalCluster.progress(): a peer that exited 0 gets a finished row, a dead one none."""
    import subprocess
    import sys

    from launcher.cluster import LocalCluster, PeerProcess

    done = subprocess.Popen([sys.executable, "-c", "pass"])
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    done.wait(timeout=30)
    dead.wait(timeout=30)
    peers = [
        PeerProcess(rank=0, process=done, metrics_url=None, log_path=tmp_path / "0.log"),
        PeerProcess(rank=1, process=dead, metrics_url=None, log_path=tmp_path / "1.log"),
    ]
    cluster = LocalCluster(tmp_path / "m.yaml", tmp_path, peers=peers)  # not started
    assert cluster.progress() == {0: PeerProgress(finished=True)}


def test_plain_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    view = ClusterView(3, 100, console=Console(file=out, width=80), plain_every_seconds=10)
    assert not view.live
    with view:
        view.update({}, now=0.0)  # before any peer answers: no "loss nan"
        view.update(SCRAPE, now=5.0)  # within the interval: nothing
        view.update(SCRAPE, now=10.0)
    lines = out.getvalue().splitlines()
    assert lines == [
        "[------------------------] step 0/100 | 0/3 peers up",
        "[##----------------------] step 10/100 | loss 0.5562 | acc 0.875 "
        "| exchange p50 4.7 ms | blocked 25% | 2/3 peers up",
    ]
    assert "\x1b" not in out.getvalue()  # no escape codes in logs


def test_quiet_shows_no_progress_but_the_summary() -> None:
    out = io.StringIO()
    view = ClusterView(1, 10, console=Console(file=out, force_terminal=True), quiet=True)
    assert not view.live
    with view:
        view.update(SCRAPE, now=100.0)
    assert out.getvalue() == ""
    summary = {
        "peers": {
            "0": {
                "steps": 10, "final_loss": 0.25, "eval": {}, "mean_iteration_seconds": 0.012,
                "mean_blocked_seconds": 0.003, "consensus_distance": 1.5e-4,
            }
        },
        "mean_accuracy": None,
    }  # fmt: skip
    view.print_summary(summary, Path("runs/x/summary.json"))
    text = out.getvalue()
    assert rows(text)["0"] == ["10", "0.2500", "12.00", "3.00", "0.00015"]
    assert "summary: runs/x/summary.json" in text and "mean test accuracy" not in text


def test_format_line_leaves_out_unknown_values() -> None:
    line = format_line({0: PeerProgress(step=0, reachable=True)}, 50, 2)
    assert line == "[------------------------] step 0/50 | 1/2 peers up"


def test_scrape_before_the_first_step_has_no_loss_and_blocked_share_after() -> None:
    page = (
        'decentlam_step{rank="0"} 0.0\n'
        'decentlam_loss{rank="0"} 0.0\n'
        'decentlam_exchange_blocked_seconds_total{rank="0"} 0.0\n'
    )
    first = parse_progress(page)
    assert first.step == 0 and math.isnan(first.loss) and math.isnan(first.blocked_share)
    later = parse_progress(
        "# TYPE decentlam_iteration_seconds histogram\n"
        'decentlam_step{rank="0"} 5.0\n'
        'decentlam_loss{rank="0"} 0.7\n'
        'decentlam_exchange_blocked_seconds_total{rank="0"} 0.5\n'
        'decentlam_iteration_seconds_sum{rank="0"} 2.0\n'
    )
    assert later.loss == 0.7 and later.blocked_share == 0.25
