"""In-process simulator: ``n`` peers stacked as an ``[n, d]`` tensor, one matrix product per mix.

The simulator is the second driver of the update rules of :mod:`peer.algorithms.rules` (the torch
optimizers of :mod:`peer.training.optim` are the first). Every iteration ``k``::

    G   = problem.stacked_gradient(X) + weight_decay * X
    out = rule.outgoing(X, G, state, gamma_k, k)
    mixed = W(k) @ out            # or the global average, see peer.algorithms.rules
    rule.apply(X, G, state, gamma_k, mixed, k)

with no Python loop over nodes. ``W`` is either a plain ``[n, n]`` array/tensor (static) or any
object with ``mixing_matrix(k)`` (``topology.Topology`` or a test double). Along the way it
records the error ``sum_i ||x_i - x*||^2`` (when ``x*`` is known), the consensus distance
``(1/n) sum_i ||x_i - xbar||^2`` and the global loss at the averaged model.

**Delay model** (bounded staleness ``max_staleness = T > 0``, :class:`DelayModel`): peer ``i``
needs ``compute_time[i]`` time units per step and a published vector reaches a neighbour
``latency`` units later. Peer ``i`` publishes its step-``k`` message when its compute ends, then
mixes, for every in-neighbour ``j``, the freshest version of step ``[k - T, k]`` that has arrived,
waiting only when none has -- the real transports' semantics, made deterministic. Mixing
becomes ``mixed_i = sum_j w_ij out_j^{s_ij}`` over the retained messages of the last ``T + 1``
steps (damped weights when the rule asks for them). ``T = 0`` keeps the one matrix product.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from peer.algorithms.rules import UpdateRule, make_rule, uses_global_average
from peer.algorithms.schedules import ConstantSchedule, Schedule

logger = logging.getLogger(__name__)


@dataclass
class SimulationResult:
    """What one simulated run recorded.

    Attributes:
        algorithm: the rule's registry name.
        steps: iterations at which the curves were recorded (``0`` = before the first step;
            ``k`` = after ``k`` iterations).
        error: ``sum_i ||x_i - x*||^2`` at each recorded step (empty when ``x*`` is unknown).
        consensus: ``(1/n) sum_i ||x_i - xbar||^2`` at each recorded step.
        loss: global loss of the averaged model at each recorded step.
        metrics: the problem's final metrics (e.g. test accuracy).
        params: final stacked parameters ``[n, d]``.
        diverged: the run stopped early on a non-finite value.
        time: simulated wall-clock time (delay model units) at which every peer had finished
            each recorded step (``steps`` itself without a delay model).
        max_staleness_seen: the largest staleness of a mixed neighbour vector.
    """

    algorithm: str
    steps: list[int] = field(default_factory=list)
    error: list[float] = field(default_factory=list)
    consensus: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    params: torch.Tensor | None = None
    diverged: bool = False
    time: list[float] = field(default_factory=list)
    max_staleness_seen: int = 0

    @property
    def final_error(self) -> float | None:
        """The last recorded error (``None`` when ``x*`` is unknown)."""
        return self.error[-1] if self.error else None

    def iterations_to_floor(self, factor: float = 1.1, resolution: float = 1e-12) -> int | None:
        """First recorded iteration from which the error stays within ``factor`` x its floor.

        Args:
            factor: tolerance above the floor (the final error).
            resolution: errors below ``resolution * error[0]`` count as reached, so that a
                method converging to ``x*`` exactly (floor ~ rounding noise) gets a
                meaningful answer.

        Returns:
            The iteration, or ``None`` without an error curve.
        """
        if not self.error or self.diverged:
            return None
        threshold = max(factor * self.error[-1], resolution * self.error[0])
        index = len(self.error) - 1
        while index > 0 and self.error[index - 1] <= threshold:
            index -= 1
        return self.steps[index]


class _MixingMatrices:
    """``W(k)`` as a tensor of the simulation dtype, cached over the topology's period."""

    def __init__(self, topology: Any, n: int, dtype: torch.dtype) -> None:
        self._dtype = dtype
        self._cache: dict[int, torch.Tensor] = {}
        if isinstance(topology, torch.Tensor | np.ndarray):
            self._static: torch.Tensor | None = self._as_tensor(topology)
            self._topology = None
            self._period = 1
        else:
            if not hasattr(topology, "mixing_matrix"):
                raise TypeError("topology must be an [n, n] matrix or have mixing_matrix(k)")
            self._static = None
            self._topology = topology
            period = getattr(topology, "period", None)
            time_varying = getattr(topology, "is_time_varying", period is None or period > 1)
            self._period = int(period) if period else (0 if time_varying else 1)
        probe = self.at(0)
        if probe.shape != (n, n):
            raise ValueError(f"mixing matrix has shape {tuple(probe.shape)}, expected ({n}, {n})")

    def _as_tensor(self, matrix: Any) -> torch.Tensor:
        if isinstance(matrix, torch.Tensor):
            return matrix.detach().to(dtype=self._dtype, device="cpu").clone()
        return torch.tensor(np.array(matrix, dtype=np.float64), dtype=self._dtype)

    def at(self, k: int) -> torch.Tensor:
        if self._static is not None:
            return self._static
        assert self._topology is not None
        if self._period == 0:  # unknown period: ask every time
            return self._as_tensor(self._topology.mixing_matrix(k))
        key = k % self._period
        if key not in self._cache:
            self._cache[key] = self._as_tensor(self._topology.mixing_matrix(k))
        return self._cache[key]


class DelayModel:
    """Deterministic timing of asynchronous peers: which neighbour step each peer mixes.

    Args:
        compute_time: time units per step of each peer (e.g. ``[2, 1, 1, ...]``: peer 0 is
            twice as slow).
        max_staleness: ``T``; a neighbour's version of step ``k - T`` or later is required.
        latency: time from a publish to the vector being available to a neighbour.
    """

    def __init__(self, compute_time: Sequence[float], max_staleness: int, latency: float = 0.0):
        times = [float(t) for t in compute_time]
        if not times or min(times) <= 0 or latency < 0 or max_staleness < 0:
            raise ValueError("need compute times > 0, latency >= 0 and max_staleness >= 0")
        self.compute_time = np.array(times)
        self.max_staleness = int(max_staleness)
        self.latency = float(latency)
        self.n = len(times)
        self._start = np.zeros(self.n)
        # Arrival times of the last T + 1 steps' messages, newest last: [step, peer].
        self._arrivals: deque[np.ndarray] = deque(maxlen=self.max_staleness + 1)
        self.finished = 0.0

    def advance(self, k: int, mixing: torch.Tensor, barrier: bool = False) -> np.ndarray:
        """Time step ``k`` on every peer and return the lags ``[n, n]`` (``k - s_ij``).

        Args:
            k: the iteration (called once per iteration, in order).
            mixing: ``W(k)``; ``w_ij > 0`` marks ``j`` as an in-neighbour of ``i``.
            barrier: a global-average step (every peer waits for every peer's step ``k``).

        Returns:
            ``lag[i, j]``: steps by which the version of ``j`` mixed by ``i`` is late (0 on the
            diagonal and for non-neighbours).
        """
        published = self._start + self.compute_time
        self._arrivals.append(published + self.latency)
        lag = np.zeros((self.n, self.n), dtype=np.int64)
        ready = published.copy()
        if barrier:
            ready[:] = max(published.max(), (published + self.latency).max())
        else:
            arrivals = np.stack(self._arrivals)  # [versions, n]: row -1 is step k
            oldest = len(arrivals) - 1  # row of step max(k - T, 0)
            neighbours = mixing.numpy() > 0
            np.fill_diagonal(neighbours, False)
            # arrived[v, i, j]: version v of j is at i when i has published its own step k.
            arrived = arrivals[:, None, :] <= published[None, :, None]
            newest = oldest - np.argmax(arrived[::-1], axis=0)  # newest arrived row, if any
            waits = neighbours & ~arrived[0]  # not even step k - T there: wait for it
            lag = np.where(neighbours & ~waits, oldest - newest, 0)
            lag = np.where(waits, oldest, lag)
            wait_until = np.where(waits, arrivals[0][None, :], -np.inf).max(axis=1)
            ready = np.maximum(ready, wait_until)
        self._start = ready
        self.finished = float(ready.max())
        return lag


class Simulator:
    """Runs one update rule on all ``n`` nodes of a problem, stacked and vectorised.

    Args:
        rule: an :class:`~peer.algorithms.rules.UpdateRule` or a registry name.
        topology: ``[n, n]`` mixing matrix, or an object with ``mixing_matrix(k)``.
        problem: a problem of :mod:`peer.simulation.problems` (or any object with the same
            interface).
        lr: constant learning rate, used when ``schedule`` is ``None``.
        schedule: object with ``lr_at(k)`` (see :mod:`peer.algorithms.schedules`).
        momentum: ``beta`` when ``rule`` is a name.
        weight_decay: added to every gradient as ``weight_decay * x``.
        global_average_every: ``H`` of periodic global averaging (``0``: never).
        batch_size: samples per node per step; ``None`` for full-batch gradients.
        dtype: ``torch.float64`` or ``torch.float32``.
        seed: minibatch sampling seed.
        x0: starting point ``[d]`` (or ``[n, d]``); default ``problem.initial_point``.
        max_staleness: ``T``; with ``T > 0`` the :class:`DelayModel` decides which neighbour
            step each peer mixes (a named ``rule`` is built for ``T``, see
            :func:`peer.algorithms.rules.make_rule`).
        compute_time: per-peer time units per step (default all 1).
        latency: delay model link latency in time units.
        pipeline: every neighbour vector exactly one step old from iteration 1 on (the
            optimizers' ``pipeline=True``; needs ``max_staleness=1``).
    """

    def __init__(
        self,
        rule: UpdateRule | str,
        topology: Any,
        problem: Any,
        lr: float = 0.01,
        schedule: Schedule | None = None,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        global_average_every: int = 0,
        batch_size: int | None = None,
        dtype: torch.dtype = torch.float64,
        seed: int = 0,
        x0: torch.Tensor | None = None,
        max_staleness: int = 0,
        compute_time: Sequence[float] | None = None,
        latency: float = 0.0,
        pipeline: bool = False,
    ) -> None:
        if pipeline and max_staleness != 1:
            raise ValueError("pipeline needs max_staleness=1")
        self.pipeline = bool(pipeline)
        if isinstance(rule, str):
            self.rule = make_rule(rule, momentum, max_staleness=max_staleness)
        else:
            self.rule = rule
        self.problem = problem
        self.n = int(problem.n)
        self.schedule = schedule if schedule is not None else ConstantSchedule(lr)
        self.weight_decay = float(weight_decay)
        self.global_average_every = int(global_average_every)
        self.batch_size = batch_size
        self.dtype = dtype
        self.generator = torch.Generator().manual_seed(seed)
        self.mixing = _MixingMatrices(topology, self.n, dtype)
        start = problem.initial_point(dtype) if x0 is None else x0.to(dtype)
        self.params = start.expand(self.n, -1).clone() if start.dim() == 1 else start.clone()
        self.state = self.rule.init_state(self.params)
        self.step_count = 0
        x_star = getattr(problem, "x_star", None)
        self._x_star = None if x_star is None else x_star.to(torch.float64)
        self.max_staleness = int(max_staleness)
        self.delays: DelayModel | None = None
        if max_staleness > 0 or compute_time is not None or latency:
            times = [1.0] * self.n if compute_time is None else list(compute_time)
            if len(times) != self.n:
                raise ValueError(f"compute_time has {len(times)} entries for {self.n} peers")
            self.delays = DelayModel(times, max_staleness, latency)
        self._history: deque[torch.Tensor] = deque(maxlen=self.max_staleness + 1)
        self.max_staleness_seen = 0

    def step(self) -> None:
        """Run one iteration on every node."""
        k = self.step_count
        lr = float(self.schedule.lr_at(k))
        X = self.params
        G = self.problem.stacked_gradient(X, self.batch_size, self.generator).to(self.dtype)
        if self.weight_decay:
            G = G + self.weight_decay * X
        out = self.rule.outgoing(X, G, self.state, lr, k)
        global_step = uses_global_average(self.rule, k, self.global_average_every)
        lag = None
        if self.delays is not None:
            lag = self.delays.advance(k, self.mixing.at(k), barrier=global_step)
        if global_step:
            mixed = out.mean(dim=0, keepdim=True).expand_as(out)
        elif self.max_staleness == 0:
            mixed = self.mixing.at(k) @ out
        else:
            if self.pipeline:
                neighbours = (self.mixing.at(k) > 0) & ~torch.eye(self.n, dtype=torch.bool)
                lag = neighbours.numpy().astype(np.int64) * min(k, 1)
            assert lag is not None
            self._history.append(out)
            mixed = self._stale_mix(self.mixing.at(k), lag)
        self.rule.apply(X, G, self.state, lr, mixed, k)
        self.step_count += 1

    def _stale_mix(self, W: torch.Tensor, lag: np.ndarray) -> torch.Tensor:
        """``mixed_i = sum_j w_ij out_j^{k - lag_ij}`` (damped weights if the rule asks)."""
        lags = torch.from_numpy(lag)
        self.max_staleness_seen = max(self.max_staleness_seen, int(lags.max()))
        weights = W.clone()
        if self.rule.damps_stale_weights:
            off_diagonal = ~torch.eye(self.n, dtype=torch.bool)
            damped = torch.where(off_diagonal, W / (1 + lags).to(W.dtype), W)
            moved = (W - damped).sum(dim=1)
            weights = damped + torch.diag(moved)
        mixed = torch.zeros_like(self._history[-1])
        for tau in range(len(self._history)):
            mask = lags == tau
            if tau == 0:
                mask |= torch.eye(self.n, dtype=torch.bool)
            if mask.any():
                mixed += torch.where(mask, weights, 0.0) @ self._history[-1 - tau]
        return mixed

    def error(self) -> float | None:
        """``sum_i ||x_i - x*||^2`` in float64 (``None`` when ``x*`` is unknown)."""
        if self._x_star is None:
            return None
        return float((self.params.to(torch.float64) - self._x_star).pow(2).sum())

    def consensus_distance(self) -> float:
        """``(1/n) sum_i ||x_i - xbar||^2``."""
        X = self.params.to(torch.float64)
        return float((X - X.mean(dim=0)).pow(2).sum() / self.n)

    def _record(self, result: SimulationResult) -> bool:
        error = self.error()
        loss = float(self.problem.loss(self.params))
        consensus = self.consensus_distance()
        result.steps.append(self.step_count)
        result.time.append(self.delays.finished if self.delays else float(self.step_count))
        if error is not None:
            result.error.append(error)
        result.consensus.append(consensus)
        result.loss.append(loss)
        return all(math.isfinite(v) for v in (error or 0.0, loss, consensus))

    def run(self, steps: int, record_every: int = 1) -> SimulationResult:
        """Run ``steps`` iterations, recording the curves every ``record_every`` iterations.

        Args:
            steps: number of iterations.
            record_every: recording period (the first and the last iterate are always recorded).

        Returns:
            The :class:`SimulationResult` (curves, final metrics and parameters).
        """
        if steps < 0 or record_every < 1:
            raise ValueError("steps must be >= 0 and record_every >= 1")
        result = SimulationResult(algorithm=self.rule.name)
        healthy = self._record(result)
        end = self.step_count + steps
        while healthy and self.step_count < end:
            self.step()
            if self.step_count % record_every == 0 or self.step_count == end:
                healthy = self._record(result)
        if not healthy:
            result.diverged = True
            logger.warning("%s diverged at iteration %d", self.rule.name, self.step_count)
        else:
            result.metrics = {k: float(v) for k, v in self.problem.metrics(self.params).items()}
        result.params = self.params.clone()
        result.max_staleness_seen = self.max_staleness_seen
        return result
