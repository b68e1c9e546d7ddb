"""Torch optimizers for the real peers: the rules of :mod:`peer.algorithms.rules` over a
Communicator.

:class:`DecentralizedOptimizer` is a ``torch.optim.Optimizer`` that runs one peer's side of a
decentralized method. At construction its parameters are moved into **flat contiguous
buffers**, one per ``(dtype, device)`` (``p.data`` and ``p.grad`` become views into them, so a
step never concatenates), and each buffer is cut into buckets of about ``bucket_bytes`` along
parameter boundaries. Iteration ``k`` of :meth:`~DecentralizedOptimizer.step`, per bucket::

    g      = grad + weight_decay * x
    msg    = rule.outgoing(x, g, state, gamma_k, k)
    handle = communicator.neighbor_average_async(f"{group}/{bucket}", msg, k)   # or global
    ...    # all buckets started before the first wait
    rule.apply(x, g, state, gamma_k, handle.wait(), k)

With ``overlap=True`` a post-accumulate-grad hook starts a bucket's exchange as soon as all of
its parameters have their gradient, while backward is still running; ``step()`` then starts
whatever bucket is left (parameters that got no gradient count as zero) and only waits.
Overlap assumes one backward pass per step (no gradient accumulation across passes).

With ``pipeline=True`` (requires ``max_staleness=1``, partial averaging only) an exchange is
consumed one step later: step ``k`` publishes ``msg^k`` and starts fetching the neighbours'
``msg_j^k`` (their part ``sum_j w_ij msg_j^k`` only, ``self_weight = 0``), then applies with
``mixed = w_ii msg^k + sum_j w_ij msg_j^{k-1}`` from the exchange started at step ``k - 1``. Every
exchange thus has the whole next step (forward, backward, update) to finish, and every neighbour
vector is exactly one step old (the staleness-aware DecentLaM's ``T = 1`` case,
docs/async-decentlam.md). The first step after construction or a resume waits for its own
exchange (``mixed = W msg^k``).

Message names depend only on the parameter order, so every peer of a run built from the same
model agrees on them. Do not move the model to another device after building the optimizer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from peer.algorithms.rules import UpdateRule, make_rule, uses_global_average
from peer.errors import ExchangeError
from peer.transport.base import Communicator, ExchangeStats, Handle, resolve_weights
from topology.manifest import ExchangeSpec

logger = logging.getLogger(__name__)

# The manifest's exchange.bucket_bytes default: one definition for peers, simulator and tests.
DEFAULT_BUCKET_BYTES = ExchangeSpec().bucket_bytes
INTERRUPT_POLL_SECONDS = 0.2


class StepInterrupted(ExchangeError):
    """The step was abandoned because :attr:`DecentralizedOptimizer.interrupt` was set."""


@dataclass
class _Bucket:
    name: str
    group: int
    start: int
    end: int
    params: list[int]  # indices into the optimizer's parameter list


@dataclass
class _FlatGroup:
    name: str
    data: torch.Tensor
    grad: torch.Tensor
    params: list[torch.nn.Parameter]
    offsets: list[int]
    state: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class _InFlight:
    handle: Handle
    gradient: torch.Tensor
    lr: float
    message: torch.Tensor | None = None  # pipeline: this step's own message
    self_weight: float = 0.0  # pipeline: w_ii of the row the exchange was started with


class DecentralizedOptimizer(torch.optim.Optimizer):
    """One peer of a decentralized method, as a ``torch.optim.Optimizer``.

    Args:
        params: parameters or parameter groups (all groups must share lr, momentum and
            weight decay: one flat buffer spans them).
        algorithm: a name of :data:`peer.algorithms.rules.ALGORITHMS`.
        lr: learning rate ``gamma`` (used when ``schedule`` is ``None``; torch lr schedulers
            that edit ``param_groups[0]["lr"]`` work too).
        momentum: ``beta`` (``mu`` for QG-DmSGD).
        weight_decay: added to the gradient as ``weight_decay * x``.
        communicator: this peer's :class:`peer.transport.base.Communicator`.
        schedule: object with ``lr_at(k)`` (:mod:`peer.algorithms.schedules`); overrides ``lr``.
        global_average_every: ``H`` of periodic global averaging (``0``: never).
        max_staleness: accept neighbour vectors up to this many steps old.
        overlap: start each bucket's exchange from backward hooks.
        bucket_bytes: target bucket size.
        deadline_seconds: timeout of each wait (``None``: the transport's deadline).
        pipeline: consume each exchange one step later (see the module docstring).
    """

    def __init__(
        self,
        params: Iterable[Any],
        algorithm: str = "decentlam",
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        communicator: Communicator | None = None,
        schedule: Any = None,
        global_average_every: int = 0,
        max_staleness: int = 0,
        overlap: bool = False,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        deadline_seconds: float | None = None,
        pipeline: bool = False,
    ) -> None:
        if communicator is None:
            raise ValueError("a communicator (peer.transport.base.Communicator) is required")
        if lr <= 0 or weight_decay < 0 or bucket_bytes < 1 or max_staleness < 0:
            raise ValueError(
                "need lr > 0, weight_decay >= 0, bucket_bytes >= 1, max_staleness >= 0"
            )
        self._building = True
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self._building = False
        for group in self.param_groups[1:]:
            for key in defaults:
                if group[key] != self.param_groups[0][key]:
                    raise ValueError(f"all parameter groups must share {key!r}")
        self.rule: UpdateRule = make_rule(algorithm, momentum, max_staleness=max_staleness)
        if pipeline and (
            max_staleness != 1 or self.rule.communication != "partial" or global_average_every
        ):
            raise ValueError(
                "pipeline=True needs max_staleness=1 and neighbour averaging only "
                "(no pmsgd, no global_average_every)"
            )
        self.pipeline = bool(pipeline)
        # pipeline: the exchanges started by the previous step, consumed by this one.
        self._previous: dict[int, _InFlight] = {}
        self.communicator = communicator
        self.schedule = schedule
        self.global_average_every = int(global_average_every)
        self.max_staleness = int(max_staleness)
        self.overlap = bool(overlap)
        self.deadline_seconds = deadline_seconds
        self.last_exchange_stats: list[ExchangeStats] = []
        # Set by the training loop (e.g. on SIGTERM): waits stop and the step is abandoned.
        self.interrupt: threading.Event | None = None
        self._step = 0
        self._params = self._unique_params()
        self._groups, self._buckets = self._flatten(bucket_bytes)
        self._in_flight: dict[int, _InFlight] = {}
        self._waiting: list[set[int]] = []
        self._hooks: list[Any] = []
        if self.overlap:
            self._reset_waiting()
            self._param_buckets: dict[int, list[int]] = {}
            for b, bucket in enumerate(self._buckets):
                for index in bucket.params:
                    self._param_buckets.setdefault(index, []).append(b)
            for index, param in enumerate(self._params):
                self._hooks.append(param.register_post_accumulate_grad_hook(self._hook(index)))

    # ----------------------------------------------------------------- construction
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Only during construction: the flat buffers are fixed afterwards."""
        if not getattr(self, "_building", False):
            raise RuntimeError("DecentralizedOptimizer does not accept parameter groups later")
        super().add_param_group(param_group)

    def _unique_params(self) -> list[torch.nn.Parameter]:
        seen: set[int] = set()
        params = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params

    def _flatten(self, bucket_bytes: int) -> tuple[list[_FlatGroup], list[_Bucket]]:
        by_kind: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for index, p in enumerate(self._params):
            by_kind.setdefault((p.dtype, p.device), []).append(index)
        groups: list[_FlatGroup] = []
        buckets: list[_Bucket] = []
        self._spans: dict[int, tuple[int, int]] = {}
        for gi, ((dtype, device), indices) in enumerate(by_kind.items()):
            members = [self._params[i] for i in indices]
            offsets = [0]
            for p in members:
                offsets.append(offsets[-1] + p.numel())
            data = torch.empty(offsets[-1], dtype=dtype, device=device)
            grad = torch.zeros_like(data)
            for p, start, end in zip(members, offsets, offsets[1:], strict=False):
                data[start:end].copy_(p.detach().reshape(-1))
                p.data = data[start:end].view_as(p)
                if p.grad is not None:
                    grad[start:end].copy_(p.grad.reshape(-1))
                p.grad = grad[start:end].view_as(p)
            name = f"params{gi}.{str(dtype).removeprefix('torch.')}"
            group = _FlatGroup(name, data, grad, members, offsets, self.rule.init_state(data))
            groups.append(group)
            element_bytes = data.element_size()
            first = 0
            for local, index in enumerate(indices):
                self._spans[index] = (offsets[local], offsets[local + 1])
                size_bytes = (offsets[local + 1] - offsets[first]) * element_bytes
                if size_bytes >= bucket_bytes or local == len(indices) - 1:
                    start, end = offsets[first], offsets[local + 1]
                    bucket_name = f"{name}/{len(buckets)}"
                    buckets.append(_Bucket(bucket_name, gi, start, end, indices[first : local + 1]))
                    first = local + 1
        logger.debug("flattened %d parameters into %d buckets", len(self._params), len(buckets))
        return groups, buckets

    # ----------------------------------------------------------------- the step
    def current_lr(self) -> float:
        """``gamma_k`` of the coming step: the schedule's, else ``param_groups[0]["lr"]``."""
        if self.schedule is not None:
            return float(self.schedule.lr_at(self._step))
        return float(self.param_groups[0]["lr"])

    def _sync_grads(self, bucket: _Bucket) -> None:
        """Put every parameter's gradient back into the flat grad buffer (as a view)."""
        group = self._groups[bucket.group]
        for index in bucket.params:
            p = self._params[index]
            start, end = self._spans[index]
            view = group.grad[start:end]
            if p.grad is None:
                view.zero_()  # no gradient this step: counts as zero
            elif p.grad.data_ptr() != view.data_ptr():
                view.copy_(p.grad.reshape(-1))  # someone replaced p.grad (e.g. set it to None)
            else:
                continue
            p.grad = view.view_as(p)

    def _start(self, b: int) -> None:
        bucket = self._buckets[b]
        if b in self._in_flight:
            return
        self._sync_grads(bucket)
        group = self._groups[bucket.group]
        x = group.data[bucket.start : bucket.end]
        g = group.grad[bucket.start : bucket.end]
        weight_decay = self.param_groups[0]["weight_decay"]
        # A view is enough without weight decay: the flat gradient is not touched again before
        # this step's apply (zero_grad comes with the next step).
        g = g + weight_decay * x if weight_decay else g
        state = {key: value[bucket.start : bucket.end] for key, value in group.state.items()}
        lr = self.current_lr()
        k = self._step
        msg = self.rule.outgoing(x, g, state, lr, k)
        # msg is a fresh tensor nobody modifies: hand it over instead of having it copied.
        if self.pipeline:
            communicator = self.communicator
            self_weight, weights = resolve_weights(
                communicator.topology, communicator.rank, k, None, None
            )
            handle = self.communicator.neighbor_average_async(
                bucket.name, msg, k, 0.0, weights, copy=False,
                damp_stale=self.rule.damps_stale_weights,
            )  # fmt: skip
            self._in_flight[b] = _InFlight(handle, g, lr, msg, self_weight)
            return
        if uses_global_average(self.rule, k, self.global_average_every):
            handle = self.communicator.global_average_async(bucket.name, msg, k, copy=False)
        else:
            handle = self.communicator.neighbor_average_async(
                bucket.name,
                msg,
                k,
                max_staleness=self.max_staleness,
                copy=False,
                damp_stale=self.rule.damps_stale_weights,
            )
        self._in_flight[b] = _InFlight(handle, g, lr)

    def _reset_waiting(self) -> None:
        self._waiting = [set(bucket.params) for bucket in self._buckets]

    def _hook(self, index: int) -> Callable[[torch.Tensor], None]:
        def on_grad_ready(param: torch.Tensor) -> None:
            for b in self._param_buckets[index]:
                if b in self._in_flight:
                    raise RuntimeError(
                        f"gradient of parameter {index} arrived after its bucket was sent: "
                        "overlap=True supports one backward pass per optimizer step"
                    )
                self._waiting[b].discard(index)
                if not self._waiting[b]:
                    with torch.no_grad():
                        self._start(b)

        return on_grad_ready

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One iteration: start every bucket's exchange (if hooks have not), wait, apply.

        Args:
            closure: optional callable that recomputes the loss (with backward).

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        k = self._step
        for b in range(len(self._buckets)):
            self._start(b)
        stats = []
        try:
            # Every bucket's mixed vector first, then every update: a failed or interrupted
            # exchange leaves parameters and state exactly as they were (the step is abandoned
            # whole, never half-applied), so a checkpoint written after it is consistent.
            if self.pipeline:
                mixed = [self._pipelined_mix(b) for b in range(len(self._buckets))]
            else:
                mixed = [self._wait(self._in_flight[b].handle) for b in range(len(self._buckets))]
            for b, bucket in enumerate(self._buckets):
                flight = self._in_flight[b]
                group = self._groups[bucket.group]
                x = group.data[bucket.start : bucket.end]
                state = {key: v[bucket.start : bucket.end] for key, v in group.state.items()}
                self.rule.apply(x, flight.gradient, state, flight.lr, mixed[b], k)
                stats.append(flight.handle.stats)
            if self.pipeline:
                stats = [self._previous[b].handle.stats for b in self._previous] or stats
                self._previous = dict(self._in_flight)
        finally:
            self._in_flight.clear()
            if self.overlap:
                self._reset_waiting()
        self.last_exchange_stats = stats
        self._step += 1
        if self.schedule is not None:
            for param_group in self.param_groups:
                param_group["lr"] = self.current_lr()
        return loss

    def _pipelined_mix(self, b: int) -> torch.Tensor:
        """``w_ii msg^k + sum_j w_ij msg_j^{k-1}`` (``k - 1``: the previous step's exchange)."""
        current = self._in_flight[b]
        assert current.message is not None
        previous = self._previous.get(b)
        if previous is None:  # first step: this step's own exchange, synchronously
            neighbours = self._wait(current.handle)
            return neighbours.add(current.message, alpha=current.self_weight)
        neighbours = self._wait(previous.handle)
        if self.rule.damps_stale_weights:
            # Every neighbour vector is one step old: w_ij / 2, the rest to the peer itself
            # (symmetric on every edge, so W stays doubly stochastic).
            moved = 0.5 * (1.0 - previous.self_weight)
            return neighbours.mul(0.5).add(current.message, alpha=previous.self_weight + moved)
        return neighbours.add(current.message, alpha=previous.self_weight)

    def _wait(self, handle: Handle) -> torch.Tensor:
        """``handle.wait`` that gives up early when :attr:`interrupt` is set.

        It waits in slices of :data:`INTERRUPT_POLL_SECONDS` for the exchange to *finish*
        (:meth:`Handle.wait_done` never raises), so an exchange that failed ends the wait at
        once with its own error instead of being re-raised slice after slice.
        """
        if self.interrupt is None:
            return handle.wait(self.deadline_seconds)
        budget = self.deadline_seconds if self.deadline_seconds is not None else 30.0
        deadline = time.monotonic() + budget
        while True:
            if self.interrupt.is_set():
                raise StepInterrupted(f"step {self._step} abandoned: stop requested")
            remaining = deadline - time.monotonic()
            if handle.wait_done(max(0.0, min(INTERRUPT_POLL_SECONDS, remaining))):
                break
            if remaining <= INTERRUPT_POLL_SECONDS:
                break  # the budget is spent: wait(0) below raises ExchangeTimeout
        return handle.wait(0.0)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradient buffers (gradients stay views; ``set_to_none`` is ignored)."""
        for group in self._groups:
            group.grad.zero_()
            for p, start, end in zip(group.params, group.offsets, group.offsets[1:], strict=False):
                if p.grad is None or p.grad.data_ptr() != group.grad[start:end].data_ptr():
                    p.grad = group.grad[start:end].view_as(p)

    # ----------------------------------------------------------------- introspection
    @property
    def step_count(self) -> int:
        """Iterations completed (the ``k`` of the next step)."""
        return self._step

    def flat_parameters(self) -> list[torch.Tensor]:
        """The flat parameter buffers, one per ``(dtype, device)`` (views, not copies)."""
        return [group.data for group in self._groups]

    def state_dict(self) -> dict[str, Any]:
        """Step count, hyperparameters and every rule state buffer (cloned).

        Returns:
            A dict for :meth:`load_state_dict` (``torch.save``-able).
        """
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        return {
            "algorithm": self.rule.name,
            "step": self._step,
            "param_groups": hyper,
            "layout": [group.data.numel() for group in self._groups],
            "flat_state": [
                {name: value.detach().clone() for name, value in group.state.items()}
                for group in self._groups
            ],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (into the existing buffers).

        Args:
            state_dict: the saved dict.

        Raises:
            ValueError: saved by another algorithm or for a different parameter layout.
        """
        if state_dict.get("algorithm") != self.rule.name:
            raise ValueError(
                f"state was saved by {state_dict.get('algorithm')!r}, not {self.rule.name!r}"
            )
        layout = [group.data.numel() for group in self._groups]
        if list(state_dict["layout"]) != layout:
            raise ValueError(f"parameter layout {state_dict['layout']} does not match {layout}")
        for group, saved in zip(self._groups, state_dict["flat_state"], strict=True):
            if set(saved) != set(group.state):
                raise ValueError(
                    f"state buffers {sorted(saved)} do not match {self.rule.name}'s "
                    f"{sorted(group.state)} (saved by another version of decentlam)"
                )
            for name, value in group.state.items():
                value.copy_(saved[name])
        for param_group, saved_group in zip(
            self.param_groups, state_dict["param_groups"], strict=True
        ):
            param_group.update(saved_group)
        self._step = int(state_dict["step"])
        self._in_flight.clear()
        self._previous.clear()


class DecentLaM(DecentralizedOptimizer):
    """DecentLaM (the paper's Algorithm 2).

    Arguments as :class:`DecentralizedOptimizer` (without ``algorithm``).
    """

    def __init__(self, params: Iterable[Any], **kwargs: Any) -> None:
        super().__init__(params, algorithm="decentlam", **kwargs)


class DmSGD(DecentralizedOptimizer):
    """Decentralized momentum SGD (the paper's Algorithm 1).

    Arguments as :class:`DecentralizedOptimizer` (without ``algorithm``).
    """

    def __init__(self, params: Iterable[Any], **kwargs: Any) -> None:
        super().__init__(params, algorithm="dmsgd", **kwargs)


class DSGD(DecentralizedOptimizer):
    """D-PSGD in adapt-then-combine form.

    Arguments as :class:`DecentralizedOptimizer` (without ``algorithm``).
    """

    def __init__(self, params: Iterable[Any], **kwargs: Any) -> None:
        super().__init__(params, algorithm="dsgd", **kwargs)


class PmSGD(DecentralizedOptimizer):
    """Parallel momentum SGD over exact global averaging (the all-reduce baseline).

    Arguments as :class:`DecentralizedOptimizer` (without ``algorithm``).
    """

    def __init__(self, params: Iterable[Any], **kwargs: Any) -> None:
        super().__init__(params, algorithm="pmsgd", **kwargs)


class AWCDmSGD(DecentralizedOptimizer):
    """Adapt-while-combine DmSGD.

    Arguments as :class:`DecentralizedOptimizer` (without ``algorithm``).
    """

    def __init__(self, params: Iterable[Any], **kwargs: Any) -> None:
        super().__init__(params, algorithm="awc-dmsgd", **kwargs)


class QGDmSGD(DecentralizedOptimizer):
    """Quasi-global momentum DmSGD (Lin et al. 2021).

    Arguments as :class:`DecentralizedOptimizer` (without ``algorithm``).
    """

    def __init__(self, params: Iterable[Any], **kwargs: Any) -> None:
        super().__init__(params, algorithm="qg-dmsgd", **kwargs)


class DGD(DecentralizedOptimizer):
    """Decentralized gradient descent (Nedic-Ozdaglar).

    Arguments as :class:`DecentralizedOptimizer` (without ``algorithm``).
    """

    def __init__(self, params: Iterable[Any], **kwargs: Any) -> None:
        super().__init__(params, algorithm="dgd", **kwargs)


def make_optimizer(name: str, params: Iterable[Any], **kwargs: Any) -> DecentralizedOptimizer:
    """Build the optimizer of a method by its registry name.

    Args:
        name: one of :data:`peer.algorithms.rules.ALGORITHMS`.
        params: parameters or parameter groups.
        **kwargs: :class:`DecentralizedOptimizer` arguments (``communicator`` is required).

    Returns:
        The optimizer.
    """
    return DecentralizedOptimizer(params, algorithm=name, **kwargs)
