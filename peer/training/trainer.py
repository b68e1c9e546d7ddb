"""The synchronous training loop of one peer.

The loop is plain torch: forward, backward, ``optimizer.step()``. All communication hides in the
optimizer (which starts exchanges from gradient hooks when overlap is on) and the communicator
(whose gRPC server runs in its own thread), so there is no ``async`` here and no global barrier:
each peer waits only for the vectors its in-neighbours publish, within the staleness bound.

The trainer measures what the metrics and ``summary.json`` report: iteration time, time
blocked on exchanges, compute time, bytes, staleness and consensus distance.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from peer.errors import ExchangeError, FellBehind
from peer.training.checkpoint import (
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from peer.training.metrics import TrainingMetrics
from peer.training.tasks import batches_from
from peer.transport.base import Communicator, ExchangeStats

logger = logging.getLogger(__name__)

CONSENSUS_VECTOR = "consensus/params"


@dataclass
class TrainerConfig:
    """How long to train and when to evaluate and checkpoint.

    Attributes:
        steps: total iterations (a resumed run continues up to the same total).
        eval_every: evaluate (and measure consensus distance) every this many steps; 0 = only
            at the end.
        checkpoint_every: write ``rank-<r>.pt`` every this many steps; 0 = only at the end.
        checkpoint_dir: where checkpoints go (``None``: never written).
        resume: continue from ``checkpoint_dir/rank-<r>.pt`` when it exists.
        max_staleness: staleness accepted for the consensus-distance exchange.
        deadline_seconds: deadline of that exchange.
    """

    steps: int
    eval_every: int = 0
    checkpoint_every: int = 0
    checkpoint_dir: Path | None = None
    resume: bool = False
    max_staleness: int = 0
    deadline_seconds: float = 30.0


@dataclass
class TrainResult:
    """What one peer reports at the end (one entry of ``summary.json``)."""

    rank: int
    steps: int
    start_step: int
    stopped_early: bool
    final_loss: float
    eval: dict[str, float]
    mean_iteration_seconds: float
    mean_compute_seconds: float
    mean_blocked_seconds: float
    total_seconds: float
    bytes_received: int
    bytes_sent: int
    consensus_distance: float
    max_staleness_seen: int
    history: list[dict[str, float]] = field(default_factory=list)
    max_blocked_seconds: float = 0.0
    # Steady-state figures: the first step also waits for the neighbours to start, which
    # skews the mean of a short run.
    median_iteration_seconds: float = math.nan
    median_blocked_seconds: float = math.nan
    # Why the run ended before ``steps``: "signal" for a requested stop, else the one-line
    # error that made this peer give up (``failed`` is then true); None when it finished.
    stop_reason: str | None = None
    failed: bool = False
    # Every iteration of this run, in order (seconds; blocked = waiting for exchanges), so a
    # benchmark can drop warm-up steps or plot the step times.
    step_seconds: list[float] = field(default_factory=list)
    step_blocked_seconds: list[float] = field(default_factory=list)
    # CPU seconds of every iteration: the whole process (all threads) and the training thread
    # alone; the difference is what the exchange's threads (event loop, grpc) took meanwhile.
    step_cpu_seconds: list[float] = field(default_factory=list)
    step_training_cpu_seconds: list[float] = field(default_factory=list)
    # Seconds the training thread was runnable but waiting for a core in every iteration
    # (Linux schedstat; empty elsewhere): CPU contention, as opposed to waiting on a lock
    # (the GIL) or an exchange, which the thread spends asleep.
    step_training_runqueue_seconds: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def thread_runqueue_seconds() -> float | None:
    """Seconds the calling thread has spent runnable but not running (waiting for a core),
    from ``/proc/thread-self/schedstat``; None where the kernel does not report it."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def flat_vector(model: torch.nn.Module) -> torch.Tensor:
    """All parameters of ``model`` as one float64 CPU vector (for distances and digests)."""
    return torch.cat([p.detach().reshape(-1).double().cpu() for p in model.parameters()])


class Trainer:
    """Runs one peer's training loop.

    Args:
        task: the task (``model``, ``train_batches``, ``loss``, ``evaluate``).
        optimizer: a decentralized optimizer (``peer.training.optim``) or any torch optimizer whose
            ``last_exchange_stats`` (if present) lists the exchanges of the last step.
        rank: this peer.
        config: loop configuration.
        communicator: used for the consensus-distance exchange (``None`` skips it).
        metrics: Prometheus collectors (optional).
        on_step: called after every iteration with ``(step, loss)`` (e.g. to publish progress).
        bytes_sent: callable returning the bytes this peer has served so far (for the summary).
        stop_event: set to stop (e.g. by a signal handler installed before the trainer existed).
        rejoin: called when a step raised :class:`~peer.errors.FellBehind`: takes a live
            neighbour's state into the model and optimizer and returns the step to go on
            from (``None``: the error ends the run).
    """

    def __init__(
        self,
        task: Any,
        optimizer: torch.optim.Optimizer,
        *,
        rank: int,
        config: TrainerConfig,
        communicator: Communicator | None = None,
        metrics: TrainingMetrics | None = None,
        on_step: Callable[[int, float], None] | None = None,
        bytes_sent: Callable[[], int] | None = None,
        stop_event: threading.Event | None = None,
        rejoin: Callable[[FellBehind], int] | None = None,
    ) -> None:
        self.task = task
        self.rejoin = rejoin
        self.model: torch.nn.Module = task.model
        self.optimizer = optimizer
        self.rank = rank
        self.config = config
        self.communicator = communicator
        self.metrics = metrics
        self.on_step = on_step
        self.bytes_sent = bytes_sent
        self.stop_event = stop_event if stop_event is not None else threading.Event()
        if hasattr(optimizer, "interrupt"):
            optimizer.interrupt = self.stop_event
        self.step = 0

    def request_stop(self) -> None:
        """Ask the loop to stop after the current iteration (signal-handler safe)."""
        self.stop_event.set()

    def maybe_resume(self) -> bool:
        """Load the checkpoint when ``config.resume`` and one exists; returns True if loaded."""
        directory = self.config.checkpoint_dir
        if not self.config.resume or directory is None:
            return False
        path = checkpoint_path(directory, self.rank)
        if not path.exists():
            logger.info("no checkpoint at %s: starting from step 0", path)
            return False
        payload = load_checkpoint(path)
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        set_rng_state(payload["rng"])
        self.step = int(payload["step"])
        published = payload.get("published") or {}
        if published and self.communicator is not None:
            # Neighbours that stopped a step or two behind need these to catch up.
            for name, versions in published.items():
                for step, tensor in sorted(versions.items()):
                    self.communicator.publish(name, tensor, int(step))
        logger.info("resumed from %s at step %d", path, self.step)
        return True

    def checkpoint(self) -> Path | None:
        """Write this peer's checkpoint now (atomic)."""
        if self.config.checkpoint_dir is None:
            return None
        extra = None
        if self.communicator is not None:
            # Peers stopped by a signal are at most max_staleness + 1 steps apart: keep the
            # vectors this peer published for those steps (see maybe_resume).
            window = self.step - (self.config.max_staleness + 1)
            extra = {"published": self.communicator.retained_versions(window)}
        return save_checkpoint(
            self.config.checkpoint_dir,
            self.rank,
            model=self.model,
            optimizer=self.optimizer,
            step=self.step,
            extra=extra,
        )

    def consensus_distance(self) -> float:
        """``||x_i - sum_j w_ij x_j||`` through one extra neighbour average of the parameters."""
        if self.communicator is None or not hasattr(self.communicator, "topology"):
            return 0.0
        if getattr(self.communicator, "topology", None) is None:
            return 0.0
        own = flat_vector(self.model)
        try:
            mixed = self.communicator.neighbor_average(
                CONSENSUS_VECTOR,
                own,
                self.step,
                max_staleness=self.config.max_staleness,
                timeout=self.config.deadline_seconds,
            )
        except ExchangeError as exc:
            # A neighbour that stopped early must not fail the evaluation of this one.
            logger.warning("consensus distance unavailable at step %d: %s", self.step, exc)
            return math.nan
        return float(torch.linalg.vector_norm(own - mixed))

    def _current_lr(self) -> float:
        lr = getattr(self.optimizer, "current_lr", None)
        if callable(lr):
            return float(lr())
        return float(self.optimizer.param_groups[0]["lr"])

    def _evaluate(self, record: dict[str, float]) -> dict[str, float]:
        results = {k: float(v) for k, v in self.task.evaluate(self.model).items()}
        distance = self.consensus_distance()
        record.update({f"eval_{k}": v for k, v in results.items()})
        record["consensus_distance"] = distance
        if self.metrics is not None:
            self.metrics.record_eval(results)
            self.metrics.consensus_distance.set(distance)
        return results

    def run(self) -> TrainResult:
        """Train from the current step up to ``config.steps`` (or until a stop is requested).

        Returns:
            The peer's :class:`TrainResult`; a checkpoint is written at the end either way.
        """
        self.maybe_resume()
        start_step = self.step
        batches = batches_from(self.task, start_step)
        self.model.train()
        iteration_times: list[float] = []
        blocked_times: list[float] = []
        cpu_times: list[float] = []
        training_cpu_times: list[float] = []
        queued_times: list[float] = []
        bytes_received = 0
        max_staleness_seen = 0
        loss_value = math.nan
        history: list[dict[str, float]] = []
        eval_results: dict[str, float] = {}
        distance = math.nan
        gave_up: ExchangeError | None = None
        started = time.perf_counter()
        while self.step < self.config.steps and not self.stop_event.is_set():
            begin = time.perf_counter()
            begin_cpu, begin_thread_cpu = time.process_time(), time.thread_time()
            begin_queued = thread_runqueue_seconds()
            batch = next(batches)
            self.optimizer.zero_grad()
            loss = self.task.loss(self.model, batch)
            loss.backward()
            try:
                self.optimizer.step()
            except ExchangeError as exc:
                if self.stop_event.is_set():
                    logger.warning("stop requested: step %d abandoned", self.step)
                    break  # parameters untouched: the checkpoint below is at self.step
                if isinstance(exc, FellBehind) and self.rejoin is not None:
                    logger.warning("%s: rejoining", exc)
                    self.step = self.rejoin(exc)  # the step was abandoned whole
                    batches = batches_from(self.task, self.step)
                    continue
                if self.metrics is not None and exc.neighbor is not None:
                    self.metrics.set_neighbor_up(exc.neighbor, False)
                # This peer cannot go on: checkpoint what it has (the parameters of a failed
                # step are untouched) and report why; the process exits non-zero.
                logger.error("peer %d gives up at step %d: %s", self.rank, self.step, exc)
                gave_up = exc
                break
            loss_value = float(loss.detach())
            elapsed = time.perf_counter() - begin
            stats: list[ExchangeStats] = list(getattr(self.optimizer, "last_exchange_stats", []))
            blocked = sum(s.wait_seconds for s in stats)
            exchange = max(
                (max(s.latency_seconds.values(), default=0.0) for s in stats), default=0.0
            )
            used: dict[int, int] = {}
            for s in stats:
                bytes_received += s.bytes_received
                for neighbor, used_step in s.used_steps.items():
                    used[neighbor] = min(used.get(neighbor, used_step), used_step)
                    max_staleness_seen = max(max_staleness_seen, self.step - used_step)
            self.step += 1
            iteration_times.append(elapsed)
            blocked_times.append(blocked)
            cpu_times.append(time.process_time() - begin_cpu)
            training_cpu_times.append(time.thread_time() - begin_thread_cpu)
            queued = thread_runqueue_seconds()
            if queued is not None and begin_queued is not None:
                queued_times.append(queued - begin_queued)
            if self.metrics is not None:
                self.metrics.record_iteration(
                    step=self.step,
                    iteration_seconds=elapsed,
                    blocked_seconds=blocked,
                    exchange_seconds=exchange,
                    loss=loss_value,
                    learning_rate=self._current_lr(),
                    used_steps=used,
                )
            if self.on_step is not None:
                self.on_step(self.step, loss_value)
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"peer {self.rank}: loss is {loss_value} at step {self.step}"
                )
            record: dict[str, float] = {"step": self.step, "loss": loss_value}
            every = self.config.eval_every
            if every and self.step % every == 0 and self.step < self.config.steps:
                record["seconds"] = time.perf_counter() - started  # wall clock since training began
                eval_results = self._evaluate(record)
                distance = record["consensus_distance"]
                history.append(record)
            every = self.config.checkpoint_every
            if every and self.step % every == 0:
                self.checkpoint()
        stopped_early = self.step < self.config.steps
        if gave_up is not None:
            stop_reason: str | None = str(gave_up)
        else:
            stop_reason = "signal" if stopped_early else None
        if not stopped_early:
            record = {"step": self.step, "loss": loss_value}
            record["seconds"] = time.perf_counter() - started
            eval_results = self._evaluate(record)
            distance = record["consensus_distance"]
            history.append(record)
        self.checkpoint()
        count = max(1, len(iteration_times))
        mean_iteration = sum(iteration_times) / count
        mean_blocked = sum(blocked_times) / count
        return TrainResult(
            rank=self.rank,
            steps=self.step,
            start_step=start_step,
            stopped_early=stopped_early,
            final_loss=loss_value,
            eval=eval_results,
            mean_iteration_seconds=mean_iteration,
            mean_compute_seconds=mean_iteration - mean_blocked,
            mean_blocked_seconds=mean_blocked,
            total_seconds=time.perf_counter() - started,
            bytes_received=bytes_received,
            bytes_sent=int(self.bytes_sent()) if self.bytes_sent else 0,
            consensus_distance=distance,
            max_staleness_seen=max_staleness_seen,
            history=history,
            max_blocked_seconds=max(blocked_times, default=0.0),
            median_iteration_seconds=statistics.median(iteration_times)
            if iteration_times
            else math.nan,
            median_blocked_seconds=statistics.median(blocked_times) if blocked_times else math.nan,
            stop_reason=stop_reason,
            failed=gave_up is not None,
            step_seconds=[round(t, 6) for t in iteration_times],
            step_blocked_seconds=[round(t, 6) for t in blocked_times],
            step_cpu_seconds=[round(t, 6) for t in cpu_times],
            step_training_cpu_seconds=[round(t, 6) for t in training_cpu_times],
            step_training_runqueue_seconds=[round(t, 6) for t in queued_times],
        )


def summarize(results: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """Cluster summary from per-peer results (``summary.json``)."""
    accuracies = [r["eval"].get("accuracy") for r in results.values() if r.get("eval")]
    accuracies = [a for a in accuracies if a is not None]
    return {
        "peers": {str(rank): dict(result) for rank, result in sorted(results.items())},
        "world_size": len(results),
        "mean_accuracy": sum(accuracies) / len(accuracies) if accuracies else None,
        "mean_final_loss": (
            sum(r["final_loss"] for r in results.values()) / len(results) if results else None
        ),
    }
