"""Rejoining a running cluster: serve this peer's state at a step boundary, take a neighbour's.

A peer restarted with the same rank (with or without its checkpoint), or one that finds itself
far behind (stopped with SIGSTOP, partitioned), does not drag its neighbours back: it pulls the
parameters, the optimizer state (momentum) and the step from a live neighbour through
``GetState`` (authenticated like every RPC) and trains on from there. Its neighbours re-admit
it by the rules of :mod:`topology.live` once its step is close to theirs, and both ends agree
on the edge through the live sets declared in the exchange headers.

* :class:`StepBoundaryState` -- the GetState provider: a request from a neighbour is answered
  by the training thread at its next step boundary (so the state is never torn), or directly
  once training has finished.
* :func:`state_tensors` / :func:`load_state_tensors` -- the model's and optimizer's state as
  named tensors and back (no pickle crosses the wire).
* :func:`process_start_time` -- when this process started (rejoin time is measured from it).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

import torch

logger = logging.getLogger(__name__)

MODEL_PREFIX = "model/"
OPTIMIZER_PREFIX = "optimizer/"


def process_start_time() -> float:
    """Wall-clock time (``time.time()`` scale) at which this process started.

    Read from ``/proc`` on Linux (so interpreter start-up and imports count); elsewhere the
    time of the first call.
    """
    try:
        with open("/proc/self/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat(5), counted after the comm field
        with open("/proc/stat") as handle:
            boot = next(int(line.split()[1]) for line in handle if line.startswith("btime"))
        return boot + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _FIRST_CALL


_FIRST_CALL = time.time()


def state_tensors(model: torch.nn.Module, optimizer: Any) -> dict[str, torch.Tensor]:
    """The model's state dict and the optimizer's flat state buffers as named CPU tensors
    (clones: safe to serve while training goes on)."""
    out = {
        MODEL_PREFIX + key: value.detach().to("cpu", copy=True)
        for key, value in model.state_dict().items()
    }
    for index, group in enumerate(optimizer.state_dict()["flat_state"]):
        for name, value in group.items():
            out[f"{OPTIMIZER_PREFIX}{index}/{name}"] = value.detach().to("cpu", copy=True)
    return out


def load_state_tensors(
    model: torch.nn.Module, optimizer: Any, step: int, tensors: Mapping[str, torch.Tensor]
) -> None:
    """Load what :func:`state_tensors` produced on a neighbour, at ``step``.

    Raises:
        ValueError: the tensors do not fit this model and optimizer (another task or
            algorithm), naming the first mismatch.
    """
    model_state = model.state_dict()
    own = {k[len(MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    if own.keys() != model_state.keys():
        missing = sorted(model_state.keys() ^ own.keys())
        raise ValueError(f"neighbour state does not fit this model: {missing[:3]} differ")
    for key, value in own.items():
        if value.shape != model_state[key].shape:
            raise ValueError(f"neighbour state {key!r} has shape {list(value.shape)}")
    saved = optimizer.state_dict()
    for index, group in enumerate(saved["flat_state"]):
        for name, value in group.items():
            key = f"{OPTIMIZER_PREFIX}{index}/{name}"
            if key not in tensors or tensors[key].shape != value.shape:
                raise ValueError(f"neighbour state lacks optimizer buffer {key!r} of this shape")
            group[name] = tensors[key]
    model.load_state_dict(own)
    saved["step"] = int(step)
    optimizer.load_state_dict(saved)


class StepBoundaryState:
    """The GetState provider of a training peer (see the module docstring).

    Args:
        model: the model being trained.
        optimizer: its decentralized optimizer.
        timeout_seconds: how long a request waits for the next step boundary.
    """

    def __init__(self, model: torch.nn.Module, optimizer: Any, timeout_seconds: float) -> None:
        self.model = model
        self.optimizer = optimizer
        self.timeout_seconds = timeout_seconds
        self._lock = threading.Lock()
        self._waiting: list[tuple[threading.Event, list[tuple[int, dict[str, torch.Tensor]]]]] = []
        self._finished_step: int | None = None

    def __call__(self) -> tuple[int, dict[str, torch.Tensor]]:
        """Called by the server (worker thread): the state at the next step boundary."""
        with self._lock:
            if self._finished_step is not None:
                return self._finished_step, state_tensors(self.model, self.optimizer)
            event: threading.Event = threading.Event()
            box: list[tuple[int, dict[str, torch.Tensor]]] = []
            self._waiting.append((event, box))
        if not event.wait(self.timeout_seconds):
            with self._lock:
                if (event, box) in self._waiting:
                    self._waiting.remove((event, box))
            if not box:
                raise TimeoutError(
                    f"no step boundary within {self.timeout_seconds:.3g} s (training blocked)"
                )
        return box[0]

    def at_boundary(self, step: int) -> None:
        """Called by the training thread between steps: answer pending requests."""
        if not self._waiting:  # racy read on purpose: a late request waits one more step
            return
        with self._lock:
            waiting, self._waiting = self._waiting, []
        snapshot = (int(step), state_tensors(self.model, self.optimizer))
        for event, box in waiting:
            box.append(snapshot)
            event.set()

    def finish(self, step: int) -> None:
        """Training is over: answer from the final state directly from now on."""
        with self._lock:
            self._finished_step = int(step)
        self.at_boundary(step)


class Rejoiner:
    """Takes a live neighbour's state when this peer (re)joins, and reports how long it took.

    Args:
        comm: the peer's gRPC communicator (``probe_neighbors``, ``fetch_state``,
            ``set_current_step``, ``link_states``, ``membership``).
        model: the model.
        optimizer: its decentralized optimizer.
        metrics: the peer's :class:`~peer.training.metrics.TrainingMetrics` (or None).
        timeout_seconds: deadline of one GetState.
        neighbours: the in-neighbours of the full graph (for the live-neighbours gauge).
    """

    def __init__(
        self,
        comm: Any,
        model: torch.nn.Module,
        optimizer: Any,
        metrics: Any,
        timeout_seconds: float,
        neighbours: frozenset[int] = frozenset(),
    ) -> None:
        self.comm = comm
        self.neighbours = neighbours
        self.model = model
        self.optimizer = optimizer
        self.metrics = metrics
        self.timeout_seconds = timeout_seconds
        self.rejoins: list[dict[str, Any]] = []
        self._pending: dict[str, Any] | None = None
        self._links: dict[int, bool] = {}
        self._changes = 0

    def neighbours_ahead(self, min_step: int = 1) -> dict[int, int]:
        """``{rank: step}`` of the neighbours that answer Info, serve state, and are at
        ``min_step`` or beyond (a running cluster to rejoin)."""
        infos = self.comm.probe_neighbors(timeout=1.0)
        return {
            r: info.current_step
            for r, info in infos.items()
            if info.state_available and info.current_step >= min_step
        }

    def take_state(self, candidates: Mapping[int, int], started: float, kind: str) -> int:
        """Load the state of the most advanced candidate that answers; returns its step.

        Args:
            candidates: ``{rank: step}`` to try, most advanced first.
            started: ``time.time()`` the rejoin is measured from.
            kind: ``"restart"`` or ``"fell-behind"`` (reported).

        Raises:
            RuntimeError: no candidate gave a usable state (naming each failure).
        """
        failures = []
        for rank in sorted(candidates, key=lambda r: (-candidates[r], r)):
            try:
                state = self.comm.fetch_state(rank, self.timeout_seconds)
                if state.tensors is None:
                    raise ValueError("it sent an opaque blob, not named tensors")
                load_state_tensors(self.model, self.optimizer, state.step, state.tensors)
            except Exception as exc:  # any neighbour may fail; try the next one
                failures.append(f"peer {rank}: {exc}")
                logger.warning("could not take the state of peer %d: %s", rank, exc)
                continue
            self.comm.set_current_step(state.step)
            self._pending = {"kind": kind, "from": rank, "step": state.step, "started": started}
            logger.info("took the state of peer %d at step %d (%s)", rank, state.step, kind)
            return int(state.step)
        raise RuntimeError("could not rejoin: " + "; ".join(failures or ["no neighbour ahead"]))

    def on_fell_behind(self, exc: Exception) -> int:
        """Trainer hook for :class:`~peer.errors.FellBehind`: take the freshest state."""
        started = time.time()
        ahead = self.neighbours_ahead(min_step=0)
        neighbor = getattr(exc, "neighbor", None)
        if neighbor is not None and neighbor not in ahead:
            ahead[neighbor] = getattr(exc, "step", None) or 0
        return self.take_state(ahead, started, "fell-behind")

    def after_step(self, step: int) -> None:
        """Between steps: report a finished rejoin (first mixed step) and membership metrics."""
        if self._pending is not None:
            stats = getattr(self.optimizer, "last_exchange_stats", [])
            if any(s.used_steps for s in stats):
                pending, self._pending = self._pending, None
                seconds = time.time() - pending.pop("started")
                record = {**pending, "first_mixed_step": step, "seconds": seconds}
                self.rejoins.append(record)
                logger.warning(
                    "rejoined (%s) from peer %d at step %d: first mixed step %d after %.2f s",
                    record["kind"], record["from"], record["step"], step, seconds,
                )  # fmt: skip
                if self.metrics is not None:
                    self.metrics.rejoins.inc()
                    self.metrics.rejoin_seconds.set(seconds)
        links = self.comm.link_states()
        membership = getattr(self.comm, "membership", None)
        if self.metrics is not None and links != self._links:
            for rank, up in links.items():
                if self._links.get(rank) != up:
                    self.metrics.set_neighbor_up(rank, up)
            self._links = links
            down = {r for r, up in links.items() if not up}
            self.metrics.live_neighbors.set(len(self.neighbours - down))
        if self.metrics is not None and membership is not None:
            changes = membership.changes
            if changes > self._changes:
                self.metrics.membership_changes.inc(changes - self._changes)
                self._changes = changes

    def report(self) -> dict[str, Any]:
        """What goes into ``peer-<r>.json`` under ``membership``."""
        membership = getattr(self.comm, "membership", None)
        return {
            "rejoins": list(self.rejoins),
            "membership_changes": 0 if membership is None else membership.changes,
            "down_at_end": sorted(r for r, up in self.comm.link_states().items() if not up),
        }
