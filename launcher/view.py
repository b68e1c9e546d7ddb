"""The live cluster view of ``decentlam launch``, drawn with rich.

:class:`ClusterView` takes plain progress rows (:class:`launcher.cluster.PeerProgress`, one per
rank, as scraped from the peers' metrics endpoints) and shows them:

* on a terminal, a live table (one row per peer: step, loss, accuracy, exchange p50, blocked
  share, up/down) under a progress bar, redrawn in place;
* elsewhere (CI logs, a pipe), one plain line every ``plain_every_seconds``;
* at the end, :meth:`ClusterView.print_summary` prints the per-peer summary table.

A value the peers have not reported yet (loss before the first step, accuracy of a task without
one) shows as an empty cell, never as ``nan``. The columns are data (:data:`COLUMNS`): a new
column is one more :class:`Column` with a function of the row.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from launcher.cluster import PeerProgress

logger = logging.getLogger(__name__)

#: How often the plain (non-terminal) view prints a line.
PLAIN_EVERY_SECONDS = 10.0


def _number(value: float, fmt: str) -> str:
    """``value`` formatted, or ``""`` if it is not known (NaN or None)."""
    if value is None or not math.isfinite(value):
        return ""
    return format(value, fmt)


def _ms(seconds: float) -> str:
    text = _number(seconds * 1e3 if seconds is not None else math.nan, ".1f")
    return f"{text} ms" if text else ""


def _percent(share: float) -> str:
    text = _number(share * 100 if share is not None else math.nan, ".0f")
    return f"{text}%" if text else ""


def _state(progress: PeerProgress) -> str:
    if progress.finished:
        return "done"
    return "up" if progress.reachable else "down"


def _state_style(progress: PeerProgress) -> str:
    if progress.finished:
        return "cyan"
    return "green" if progress.reachable else "red"


def _peers_line(rows: Sequence[PeerProgress], world_size: int) -> str:
    """``"3/4 peers up"``, with ``", 1 done"`` once peers have finished their run."""
    up = sum(p.reachable for p in rows)
    done = sum(p.finished for p in rows)
    return f"{up}/{world_size} peers up" + (f", {done} done" if done else "")


@dataclass(frozen=True)
class Column:
    """One column of the live table.

    Attributes:
        header: column title.
        cell: the cell text for a peer's progress row (``""`` when unknown).
        justify: ``"right"`` or ``"left"``.
        style: the rich style of a cell, from the row (None: plain).
        stale: the cell of a peer that was not scraped this time (it exited, or has no
            metrics endpoint); None keeps its last value.
    """

    header: str
    cell: Callable[[PeerProgress], str]
    justify: Literal["left", "center", "right"] = "right"
    style: Callable[[PeerProgress], str] | None = None
    stale: str | None = None


#: The columns of the live table, after the rank.
COLUMNS: tuple[Column, ...] = (
    Column("step", lambda p: _number(p.step, ".0f")),
    Column("loss", lambda p: _number(p.loss, ".4f")),
    Column("accuracy", lambda p: _number(p.accuracy, ".3f")),
    Column("exchange p50", lambda p: _ms(p.latency_p50_seconds)),
    Column("blocked", lambda p: _percent(p.blocked_share)),
    Column("live nbrs", lambda p: _number(p.live_neighbors, ".0f")),
    Column(
        "changes", lambda p: _number(p.membership_changes, ".0f") if p.membership_changes else ""
    ),
    Column("rejoin", lambda p: f"{p.rejoin_seconds:.1f} s" if p.rejoins else ""),
    Column("state", _state, justify="left", style=_state_style, stale="-"),
)


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def slowest_step(progress: Mapping[int, PeerProgress]) -> int:
    """The step every reporting peer has reached (0 before any report)."""
    steps = [p.step for p in progress.values() if math.isfinite(p.step)]
    return int(min(steps)) if steps else 0


def format_line(progress: Mapping[int, PeerProgress], steps: int, world_size: int) -> str:
    """One plain progress line: bar, slowest step, means of loss, accuracy and p50, peers up.

    Unknown values are left out (no ``loss nan`` before the first step).
    """
    step = slowest_step(progress)
    width = 24
    done = int(width * min(1.0, step / max(1, steps)))
    parts = [f"[{'#' * done}{'-' * (width - done)}] step {step}/{steps}"]
    rows = list(progress.values())
    for label, text in (
        ("loss", _number(_mean([p.loss for p in rows]), ".4f")),
        ("acc", _number(_mean([p.accuracy for p in rows]), ".3f")),
        ("exchange p50", _ms(_mean([p.latency_p50_seconds for p in rows]))),
        ("blocked", _percent(_mean([p.blocked_share for p in rows]))),
    ):
        if text:
            parts.append(f"{label} {text}")
    parts.append(_peers_line(rows, world_size))
    changes = sum(p.membership_changes for p in rows if p.reachable)
    if changes:
        parts.append(f"{changes:.0f} membership changes")
    rejoins = [p.rejoin_seconds for p in rows if p.rejoins and math.isfinite(p.rejoin_seconds)]
    if rejoins:
        parts.append(f"rejoin {max(rejoins):.1f} s")
    return " | ".join(parts)


class ClusterView:
    """Progress of a running cluster, live on a terminal and as plain lines elsewhere.

    Use as a context manager around the watch loop and call :meth:`update` with each scrape.

    Args:
        world_size: number of peers (rows).
        steps: training steps of the run (the progress bar's total).
        console: where to draw (default: stdout); its ``is_terminal`` picks live or plain.
        quiet: show no progress at all (the summary is still printed).
        columns: the table's columns after the rank.
        plain_every_seconds: interval between plain lines.
    """

    def __init__(
        self,
        world_size: int,
        steps: int,
        console: Console | None = None,
        *,
        quiet: bool = False,
        columns: Sequence[Column] = COLUMNS,
        plain_every_seconds: float = PLAIN_EVERY_SECONDS,
    ) -> None:
        self.world_size = world_size
        self.steps = steps
        self.console = console or Console()
        self.quiet = quiet
        self.columns = tuple(columns)
        self.plain_every_seconds = plain_every_seconds
        self._live: Live | None = None
        self._last_line = -math.inf
        self._progress: dict[int, PeerProgress] = {}
        self._seen: dict[int, PeerProgress] = {}  # the last row scraped from each rank

    @property
    def live(self) -> bool:
        """Whether the view redraws in place (a terminal and not quiet)."""
        return self.console.is_terminal and not self.quiet

    def __enter__(self) -> ClusterView:
        if self.live:
            self._live = Live(
                self.render({}), console=self.console, refresh_per_second=4, transient=False
            )
            self._live.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop redrawing; the last frame stays on screen."""
        if self._live is not None:
            self._live.update(self.render(self._progress), refresh=True)
            self._live.stop()
            self._live = None

    def update(self, progress: Mapping[int, PeerProgress], now: float | None = None) -> None:
        """Show a new scrape (``{rank: progress}``; ranks missing from it show as ``-``).

        Args:
            progress: the latest row of each peer that answered or was asked.
            now: monotonic time (for the plain view's interval; default: now).
        """
        # A finished peer's row has no values of its own: keep its last scraped ones.
        self._progress = {
            rank: dataclasses.replace(self._seen[rank], finished=True, reachable=False)
            if row.finished and rank in self._seen
            else row
            for rank, row in progress.items()
        }
        self._seen.update(self._progress)
        if self.quiet:
            return
        if self._live is not None:
            self._live.update(self.render(self._progress))
            return
        now = time.monotonic() if now is None else now
        if now - self._last_line >= self.plain_every_seconds:
            self._last_line = now
            line = format_line(self._progress, self.steps, self.world_size)
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def table(self, progress: Mapping[int, PeerProgress]) -> Table:
        """The per-peer table of one scrape (peers missing from it keep their last values)."""
        table = Table()
        table.add_column("rank", justify="right")
        for column in self.columns:
            table.add_column(column.header, justify=column.justify)
        for rank in range(self.world_size):
            row = progress.get(rank)
            last = row if row is not None else self._seen.get(rank)
            cells: list[Text | str] = [str(rank)]
            for column in self.columns:
                if last is None or (row is None and column.stale is not None):
                    cells.append(column.stale or "")
                    continue
                style = column.style(last) if column.style is not None else ""
                cells.append(Text(column.cell(last), style=style))
            table.add_row(*cells)
        return table

    def render(self, progress: Mapping[int, PeerProgress]) -> RenderableType:
        """Progress bar and table of one scrape (what the live view draws)."""
        step = slowest_step(progress)
        peers = _peers_line(list(progress.values()), self.world_size)
        bar = Table.grid(padding=(0, 1))
        bar.add_row(
            ProgressBar(total=max(1, self.steps), completed=min(step, self.steps), width=40),
            Text(f"step {step}/{self.steps}  {peers}"),
        )
        return Group(bar, self.table(progress))

    def print_summary(self, summary: Mapping[str, Any], path: Path) -> None:
        """The end-of-run table: per peer steps, loss, accuracy, times and consensus distance.

        Args:
            summary: :func:`peer.training.trainer.summarize` of the peers' results.
            path: where the summary JSON was written.
        """
        table = Table(title="summary")
        for header in (
            "rank",
            "steps",
            "loss",
            "accuracy",
            "iter ms",
            "blocked ms",
            "consensus",
        ):
            table.add_column(header, justify="right")
        for rank, result in summary["peers"].items():
            table.add_row(
                str(rank),
                str(result["steps"]),
                _number(result["final_loss"], ".4f"),
                _number(result.get("eval", {}).get("accuracy", math.nan), ".4f"),
                _number(result["mean_iteration_seconds"] * 1e3, ".2f"),
                _number(result["mean_blocked_seconds"] * 1e3, ".2f"),
                _number(result["consensus_distance"], ".3g"),
            )
        self.console.print(table)
        if summary.get("mean_accuracy") is not None:
            self.console.print(f"mean test accuracy: {summary['mean_accuracy']:.4f}")
        self.console.print(f"summary: {path}", markup=False, highlight=False, soft_wrap=True)
