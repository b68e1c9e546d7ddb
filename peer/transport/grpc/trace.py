"""Per-transfer exchange trace: one JSON line per fetch (receiver) and per served version (sender).

With ``ExchangeConfig.trace_dir`` (``decentlam peer --trace-exchanges DIR``) every peer appends
to ``DIR/exchanges-<rank>.jsonl``:

* ``{"event": "fetch", "rank", "neighbor", "name", "step", "start", "end", "bytes", "retries"}``
  when a fetch completes (``start``: the call was made, ``end``: the whole version is in);
* ``{"event": "serve", "rank", "caller", "name", "step", "start", "end", "bytes"}`` when this
  peer has written a version to a caller (``start``: the header went out, i.e. the version
  existed and was asked for; ``end``: the last chunk was handed to gRPC, which may be long
  before it reaches the caller).

Times are wall-clock Unix seconds so that lines from several peers can be joined: on one machine
that is exact, across machines it is as good as their clock synchronisation.
:func:`transfer_summary` joins both ends of every transfer and says how long a transfer takes
when it has its sender's uplink to itself and when the sender's previous transfer to another
neighbour is still under way. The trace costs one line write per fetch and per served version
(not per chunk).
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO


def trace_path(directory: str | Path, rank: int) -> Path:
    """The trace file of ``rank`` in ``directory``."""
    return Path(directory) / f"exchanges-{rank}.jsonl"


class ExchangeTrace:
    """Appends trace lines for one peer; safe to call from the server's and the client's threads.

    Args:
        directory: where ``exchanges-<rank>.jsonl`` goes (created if missing).
        rank: this peer.
    """

    def __init__(self, directory: str | Path, rank: int) -> None:
        self.rank = rank
        self.path = trace_path(directory, rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._file: TextIO | None = self.path.open("a", buffering=1)  # one line, one write

    @staticmethod
    def now() -> float:
        """The clock the trace uses (wall-clock seconds)."""
        return time.time()

    def _write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with self._lock:
            if self._file is not None:
                self._file.write(line)

    def fetched(
        self,
        neighbor: int,
        name: str,
        step: int,
        start: float,
        end: float,
        nbytes: int,
        retries: int,
    ) -> None:
        """A fetch of ``neighbor``'s ``name`` at ``step`` (the step served) completed."""
        self._write(
            {
                "event": "fetch", "rank": self.rank, "neighbor": neighbor, "name": name,
                "step": step, "start": start, "end": end, "bytes": nbytes, "retries": retries,
            }
        )  # fmt: skip

    def served(
        self, caller: int, name: str, step: int, start: float, end: float, nbytes: int
    ) -> None:
        """This peer wrote ``name`` at ``step`` to ``caller`` (header at ``start``)."""
        self._write(
            {
                "event": "serve", "rank": self.rank, "caller": caller, "name": name,
                "step": step, "start": start, "end": end, "bytes": nbytes,
            }
        )  # fmt: skip

    def close(self) -> None:
        """Flush and close the file; later records are dropped."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def load_trace(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every record of the given trace files (lines that are not JSON objects are skipped)."""
    records = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a killed peer
            if isinstance(record, dict) and "event" in record:
                records.append(record)
    return records


def transfer_summary(records: Iterable[dict[str, Any]], skip_steps: int = 2) -> dict[str, Any]:
    """Join the two ends of every transfer and split them by whether they shared an uplink.

    A transfer runs from its sender's ``serve`` start (the version exists and was asked for) to
    the receiver's ``fetch`` end. It *shared the uplink* when another transfer from the same
    sender to another neighbour overlapped it in time. ``wait`` is the receiver's time between
    asking and the sender starting (the sender had not published yet).

    Args:
        records: trace records of all peers of one run.
        skip_steps: steps below this are left out (start-up: connections, first versions).

    Returns:
        ``transfers``, ``shared`` (counts), ``alone_median_seconds``,
        ``shared_median_seconds``, ``wait_median_seconds`` (NaN where there is no transfer of
        that kind), ``unmatched`` (fetches with no serve record, e.g. from an untraced peer).
    """
    records = list(records)
    serves: dict[tuple[int, int, str, int], dict[str, Any]] = {}
    for r in records:
        if r["event"] == "serve":
            serves[(r["rank"], r["caller"], r["name"], r["step"])] = r  # the last try wins
    transfers: list[tuple[int, int, float, float, float]] = []  # sender, receiver, start, end, wait
    unmatched = 0
    for r in records:
        if r["event"] != "fetch" or r["step"] < skip_steps:
            continue
        serve = serves.get((r["neighbor"], r["rank"], r["name"], r["step"]))
        if serve is None:
            unmatched += 1
            continue
        transfers.append(
            (r["neighbor"], r["rank"], serve["start"], r["end"], serve["start"] - r["start"])
        )
    alone: list[float] = []
    shared: list[float] = []
    by_sender: dict[int, list[tuple[int, int, float, float, float]]] = {}
    for t in transfers:
        by_sender.setdefault(t[0], []).append(t)
    for group in by_sender.values():
        for t in group:
            overlaps = any(o[1] != t[1] and o[2] < t[3] and o[3] > t[2] for o in group)
            (shared if overlaps else alone).append(t[3] - t[2])

    def median(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    return {
        "transfers": len(transfers),
        "shared": len(shared),
        "alone_median_seconds": median(alone),
        "shared_median_seconds": median(shared),
        "wait_median_seconds": median([max(0.0, t[4]) for t in transfers]),
        "unmatched": unmatched,
    }
