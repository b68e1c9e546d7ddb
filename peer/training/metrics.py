"""Prometheus collectors of the training loop (per peer).

The exchange engine's per-edge collectors live in :mod:`peer.transport.grpc.metrics`; this module
holds what
the training loop reports: iterations, compute vs time blocked on exchanges, loss, evaluation
metrics, learning rate, staleness, consensus distance, neighbour liveness and build info.
Every peer owns one :class:`prometheus_client.CollectorRegistry` holding both sets, served on
its manifest ``metrics_port``. Labels stay bounded: ``rank``, ``neighbor``, ``metric`` (eval
metric name), never a step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.process_collector import ProcessCollector

from peer.transport.base import LATENCY_BUCKETS_SECONDS

logger = logging.getLogger(__name__)

# Iteration times of tiny CPU models up to large GPU ones: the exchange latency buckets.
ITERATION_BUCKETS_SECONDS = LATENCY_BUCKETS_SECONDS
STALENESS_BUCKETS_STEPS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32)


class TrainingMetrics:
    """Collectors of one peer's training loop.

    Args:
        registry: the peer's registry (shared with :mod:`peer.transport.grpc.metrics`).
        rank: this peer's rank (the ``rank`` label of every series).
        build: build information (``version``, ``algorithm``, ``topology``, ``world_size``...).
        process_collector: also export ``process_*`` series (start time, CPU, memory).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        rank: int,
        build: Mapping[str, str] | None = None,
        *,
        process_collector: bool = True,
    ) -> None:
        self.rank = str(rank)
        label = ("rank",)
        self.iteration_seconds = Histogram(
            "decentlam_iteration_seconds",
            "Wall time of one training iteration.",
            label,
            buckets=ITERATION_BUCKETS_SECONDS,
            registry=registry,
        ).labels(self.rank)
        self.compute_seconds = Counter(
            "decentlam_compute_seconds",
            "Time spent computing (forward, backward, update).",
            label,
            registry=registry,
        ).labels(self.rank)
        self.blocked_seconds = Counter(
            "decentlam_exchange_blocked_seconds",
            "Time the training loop spent blocked waiting for exchanges.",
            label,
            registry=registry,
        ).labels(self.rank)
        self.overlap_ratio = Gauge(
            "decentlam_overlap_ratio",
            "Share of exchange time hidden behind compute in the last iteration (1 = fully).",
            label,
            registry=registry,
        ).labels(self.rank)
        self.step = Gauge(
            "decentlam_step", "Completed training iterations.", label, registry=registry
        ).labels(self.rank)
        self.steps_per_second = Gauge(
            "decentlam_steps_per_second",
            "Iterations per second (moving average).",
            label,
            registry=registry,
        ).labels(self.rank)
        self.staleness = Histogram(
            "decentlam_staleness_steps",
            "Steps by which a mixed neighbour vector lagged the current step.",
            label,
            buckets=STALENESS_BUCKETS_STEPS,
            registry=registry,
        ).labels(self.rank)
        self.loss = Gauge(
            "decentlam_loss", "Training loss of the last iteration.", label, registry=registry
        ).labels(self.rank)
        self._eval = Gauge(
            "decentlam_eval",
            "Latest evaluation metrics of the local model.",
            ("rank", "metric"),
            registry=registry,
        )
        self.learning_rate = Gauge(
            "decentlam_learning_rate", "Current learning rate.", label, registry=registry
        ).labels(self.rank)
        self.consensus_distance = Gauge(
            "decentlam_consensus_distance",
            "||x_i - sum_j w_ij x_j||: distance of the local model to its neighbourhood average.",
            label,
            registry=registry,
        ).labels(self.rank)
        self._neighbor_up = Gauge(
            "decentlam_neighbor_up",
            "1 if the neighbour answered the last exchange and its link is not stalled, else 0.",
            ("rank", "neighbor"),
            registry=registry,
        )
        self.live_neighbors = Gauge(
            "decentlam_live_neighbors",
            "In-neighbours this peer currently mixes (its live view of the graph).",
            label,
            registry=registry,
        ).labels(self.rank)
        self.membership_changes = Counter(
            "decentlam_membership_changes",
            "Neighbours marked down or re-admitted by this peer.",
            label,
            registry=registry,
        ).labels(self.rank)
        self.rejoins = Counter(
            "decentlam_rejoins",
            "Times this peer took a neighbour's state and rejoined (restart or fell behind).",
            label,
            registry=registry,
        ).labels(self.rank)
        self.rejoin_seconds = Gauge(
            "decentlam_rejoin_seconds",
            "Duration of the last rejoin: process start (or falling behind) to first mixed step.",
            label,
            registry=registry,
        ).labels(self.rank)
        self.info = Info(
            "decentlam_build",
            "Version, algorithm, topology and world size of this peer.",
            registry=registry,
        )
        self.info.info({"rank": self.rank, **{k: str(v) for k, v in (build or {}).items()}})
        if process_collector:
            ProcessCollector(registry=registry)
        self._up: dict[int, bool] = {}  # last neighbour state set, to skip redundant updates
        self._last_step_time: float | None = None
        self._rate = 0.0

    def record_iteration(
        self,
        *,
        step: int,
        iteration_seconds: float,
        blocked_seconds: float,
        exchange_seconds: float,
        loss: float,
        learning_rate: float,
        used_steps: Mapping[int, int] | None = None,
    ) -> None:
        """Record one finished iteration.

        Args:
            step: the number of completed iterations.
            iteration_seconds: wall time of the iteration.
            blocked_seconds: time blocked in exchange waits during it.
            exchange_seconds: the longest exchange latency of the iteration (start to arrival).
            loss: training loss.
            learning_rate: the rate used.
            used_steps: per neighbour, the step of the vector that was mixed.
        """
        self.iteration_seconds.observe(iteration_seconds)
        self.blocked_seconds.inc(blocked_seconds)
        self.compute_seconds.inc(max(0.0, iteration_seconds - blocked_seconds))
        if exchange_seconds > 0:
            hidden = max(0.0, exchange_seconds - blocked_seconds)
            self.overlap_ratio.set(min(1.0, hidden / exchange_seconds))
        self.step.set(step)
        self.loss.set(loss)
        self.learning_rate.set(learning_rate)
        for neighbor, used in (used_steps or {}).items():
            self.staleness.observe(max(0, (step - 1) - used))
            if self._up.get(neighbor) is not True:
                self.set_neighbor_up(neighbor, True)
        now = time.monotonic()
        if self._last_step_time is not None:
            instant = 1.0 / max(1e-9, now - self._last_step_time)
            self._rate = instant if self._rate == 0.0 else 0.9 * self._rate + 0.1 * instant
            self.steps_per_second.set(self._rate)
        self._last_step_time = now

    def record_eval(self, metrics: Mapping[str, float]) -> None:
        """Set the latest evaluation metrics (``metric`` label = their names)."""
        for name, value in metrics.items():
            self._eval.labels(self.rank, name).set(float(value))

    def set_neighbor_up(self, neighbor: int, up: bool) -> None:
        """Mark a neighbour as answering (1) or not (0)."""
        self._up[neighbor] = up
        self._neighbor_up.labels(self.rank, str(neighbor)).set(1 if up else 0)
