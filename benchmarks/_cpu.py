"""CPU time of running processes, per thread, from ``/proc`` (Linux): who pays for a transfer.

A benchmark that times one transfer at a time snapshots the processes of that transfer before
and after it and charges the difference to the row. Threads are grouped by the name the kernel
shows (``/proc/<pid>/task/<tid>/comm``): the peer's event loop names itself ``decentlam-r<rank>``
(``peer.transport.grpc.server.LoopThread``) and the worker threads it starts (``to_thread``: the
synchronous readers of ``blocking_receive``, checksums) inherit that name, so "event loop" is
the loop and its workers; grpc's C-core threads name themselves (``event_engine``,
``grpc_global_tim``...); every other Python thread is ``python``. Run time comes from
``schedstat`` (nanoseconds); where it is missing, from ``stat`` (clock ticks, usually 10 ms).

Imported by the scripts in this folder (run as ``python benchmarks/<name>.py``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

_TICK_SECONDS = 1.0 / os.sysconf("SC_CLK_TCK")

# Kernel thread names -> group label; names not listed are "gRPC C-core" when they are not
# Python threads, so new grpc thread names need no update here.
LOOP_PREFIX = "decentlam-r"
PYTHON_NAME = "python"


def thread_group(name: str) -> str:
    """The group a thread of kernel name ``name`` is charged to."""
    if name.startswith(LOOP_PREFIX):
        return "event loop"
    if name.startswith(PYTHON_NAME):
        return "other Python"
    return "gRPC C-core"


def _thread_seconds(task_dir: str) -> float:
    try:
        with open(f"{task_dir}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        with open(f"{task_dir}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * _TICK_SECONDS


def thread_seconds(pid: int) -> dict[int, tuple[str, float]]:
    """``{tid: (kernel name, CPU seconds so far)}`` of every live thread of ``pid``."""
    out: dict[int, tuple[str, float]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        task_dir = f"/proc/{pid}/task/{tid}"
        try:
            with open(f"{task_dir}/comm") as f:
                name = f.read().strip()
            out[int(tid)] = (name, _thread_seconds(task_dir))
        except (OSError, ValueError, IndexError):
            continue  # the thread ended between listdir and the read
    return out


Snapshot = dict[int, dict[int, tuple[str, float]]]


def snapshot(pids: Iterable[int]) -> Snapshot:
    """Per-thread CPU seconds of every process in ``pids``."""
    return {pid: thread_seconds(pid) for pid in pids}


def charged(before: Snapshot, after: Snapshot, roles: Mapping[int, str]) -> dict[str, float]:
    """CPU seconds spent between two snapshots, as ``{"<role> <group>": seconds}`` plus
    ``{"<role> total": seconds}`` for every process (``roles``: pid -> e.g. ``"receiver"``).
    Threads born in between count from zero; threads that ended are lost (not charged)."""
    spent: dict[str, float] = {}
    for pid, role in roles.items():
        old = before.get(pid, {})
        for tid, (name, seconds) in after.get(pid, {}).items():
            delta = seconds - old.get(tid, (name, 0.0))[1]
            for key in (f"{role} {thread_group(name)}", f"{role} total"):
                spent[key] = spent.get(key, 0.0) + delta
    return spent
