"""Pure update rules of every decentralized method (``docs/algorithms.md``), split around
communication.

One implementation of each rule, two drivers: the in-process :mod:`peer.simulation.simulator` (all
``n``
peers stacked as an ``[n, d]`` tensor, ``mixed = W @ outgoing``) and the torch optimizers of
:mod:`peer.training.optim` (one peer, one flat ``[d]`` bucket at a time, ``mixed`` from a
:class:`peer.transport.base.Communicator`). Each iteration ``k`` is two phases:

1. ``msg = rule.outgoing(x, g, state, lr, k)``: the vector this peer communicates. Pure: it
   never modifies ``x`` or ``state``.
2. ``rule.apply(x, g, state, lr, mixed, k)``: given ``mixed`` -- the partial average
   ``sum_j w_ij msg_j`` (or, for ``communication == "global"`` rules and for periodic
   global-averaging steps, the exact average ``(1/n) sum_j msg_j``) -- update ``x`` and
   ``state`` in place.

Between the two phases the driver is free to overlap the exchange with other work. Every rule
is elementwise, so the same code runs on a ``[d]`` slice and on an ``[n, d]`` stack. Weight
decay is folded into ``g`` by the driver (``g = grad + wd * x``) before both phases, and a
learning-rate schedule is the driver's business too: it passes the current ``lr = gamma_k``.

Periodic global averaging (option ``H``): at iteration ``k`` with ``(k + 1) % H == 0`` the driver
replaces the partial average by the global average of the same outgoing vectors (so with
``H = 1`` every decentralized method becomes its centralized counterpart).
:func:`uses_global_average` implements that convention for both drivers.

Bounded staleness (``max_staleness = T > 0``): a rule may ask the driver to mix stale
neighbour vectors with their exact weights (:attr:`UpdateRule.damps_stale_weights` False) and
adapt its coefficients to ``T``; DecentLaM does both (:mod:`peer.algorithms.stability`).

This module imports only torch (and numpy through :mod:`peer.algorithms.stability`) and does no
I/O.
"""

from __future__ import annotations

import abc
import logging
from typing import Any, ClassVar

import torch

from peer.algorithms.stability import stable_coefficients

logger = logging.getLogger(__name__)

Tensor = torch.Tensor
State = dict[str, Tensor]

DEFAULT_MOMENTUM = 0.9


def _require_positive(lr: float, name: str) -> None:
    # DecentLaM and QG-DmSGD divide by gamma_k: a schedule that reaches 0 would give inf/nan.
    if not lr > 0.0:
        raise ValueError(f"{name} needs a positive learning rate, got {lr}")


class UpdateRule(abc.ABC):
    """One decentralized method's iteration, split into ``outgoing`` and ``apply``.

    Attributes:
        name: registry name (see :data:`ALGORITHMS`).
        communication: ``"partial"`` (neighbour averaging) or ``"global"`` (all-reduce).
        state_names: names of the per-parameter state buffers (all zero-initialised).
        damps_stale_weights: with ``max_staleness > 0``, whether stale neighbour vectors are
            mixed with damped weights (``w_ij / (1 + tau)``, the transports' default) rather
            than their exact ``w_ij``.
    """

    name: ClassVar[str]
    communication: ClassVar[str] = "partial"
    state_names: ClassVar[tuple[str, ...]] = ()
    damps_stale_weights: ClassVar[bool] = True

    def init_state(self, x: torch.Tensor) -> State:
        """Fresh state buffers for parameters shaped like ``x``.

        Args:
            x: the parameters (a flat ``[d]`` buffer or an ``[n, d]`` stack).

        Returns:
            ``{name: zeros_like(x)}`` for every name in :attr:`state_names`.
        """
        return {name: torch.zeros_like(x) for name in self.state_names}

    @abc.abstractmethod
    def outgoing(
        self, x: torch.Tensor, g: torch.Tensor, state: State, lr: float, step: int
    ) -> torch.Tensor:
        """The vector to communicate at iteration ``step`` (a new tensor; inputs untouched).

        Args:
            x: current parameters ``x^k``.
            g: stochastic gradient ``g^k`` (weight decay already included).
            state: this rule's state buffers (read only here).
            lr: the current learning rate ``gamma_k``.
            step: the iteration ``k``.

        Returns:
            The message whose (partial or global) average is passed to :meth:`apply`.
        """

    @abc.abstractmethod
    def apply(
        self,
        x: torch.Tensor,
        g: torch.Tensor,
        state: State,
        lr: float,
        mixed: torch.Tensor,
        step: int,
    ) -> None:
        """Update ``x`` and ``state`` in place, given the averaged messages.

        Args:
            x: current parameters ``x^k``; becomes ``x^{k+1}``.
            g: the same gradient that was given to :meth:`outgoing`.
            state: this rule's state buffers, updated in place.
            lr: the same learning rate that was given to :meth:`outgoing`.
            mixed: the average of the outgoing vectors (partial or global).
            step: the iteration ``k``.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class _MomentumRule(UpdateRule):
    """A rule with one momentum buffer and its coefficient ``beta``."""

    state_names: ClassVar[tuple[str, ...]] = ("momentum",)

    def __init__(self, momentum: float = DEFAULT_MOMENTUM) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(momentum={self.momentum})"


class DSGDRule(UpdateRule):
    """D-PSGD, adapt-then-combine: ``x_i <- sum_j w_ij (x_j - gamma g_j)``."""

    name = "dsgd"

    def __init__(self, momentum: float = 0.0) -> None:
        # DSGD has no momentum; the argument exists so that make_rule can pass it uniformly.
        del momentum

    def outgoing(self, x: Tensor, g: Tensor, state: State, lr: float, step: int) -> Tensor:
        return x - lr * g

    def apply(
        self, x: Tensor, g: Tensor, state: State, lr: float, mixed: Tensor, step: int
    ) -> None:
        x.copy_(mixed)


class DGDRule(UpdateRule):
    """DGD (Nedic-Ozdaglar): ``x_i <- sum_j w_ij x_j - gamma g_i``."""

    name = "dgd"

    def __init__(self, momentum: float = 0.0) -> None:
        del momentum

    def outgoing(self, x: Tensor, g: Tensor, state: State, lr: float, step: int) -> Tensor:
        return x.clone()

    def apply(
        self, x: Tensor, g: Tensor, state: State, lr: float, mixed: Tensor, step: int
    ) -> None:
        x.copy_(mixed - lr * g)


class DmSGDRule(_MomentumRule):
    """DmSGD (Algorithm 1): ``m_i <- beta m_i + g_i``; ``x_i <- sum_j w_ij (x_j - gamma m_j)``."""

    name = "dmsgd"

    def outgoing(self, x: Tensor, g: Tensor, state: State, lr: float, step: int) -> Tensor:
        return x - lr * (self.momentum * state["momentum"] + g)

    def apply(
        self, x: Tensor, g: Tensor, state: State, lr: float, mixed: Tensor, step: int
    ) -> None:
        state["momentum"].mul_(self.momentum).add_(g)
        x.copy_(mixed)


class DecentLaMRule(_MomentumRule):
    """DecentLaM (Algorithm 2), staleness-aware.

    ``psi_j = x_j - gamma g_j`` is sent; ``gt_i = (x_i - sum_j w_ij psi_j) / gamma``;
    ``m_i <- beta m_i + gt_i``; ``x_i <- x_i - gamma m_i`` -- with the current ``gamma_k``
    everywhere, and the momentum corrected when the learning rate changes (Goyal et al. 2017):
    ``m_i <- beta (gamma_{k-1} / gamma_k) m_i + gt_i``. The state holds the velocity
    ``u_i = gamma_k m_i``, so the update reads ``u_i <- beta u_i + (x_i - sum_j w_ij psi_j)``,
    ``x_i <- x_i - u_i``: the closed form ``x^{k+1} = W (x^k - gamma_k g^k) + beta (x^k -
    x^{k-1})`` under any schedule (without the correction, a warmup multiplies the momentum by
    ``gamma_k / gamma_{k-1}`` -- 2 at its second step -- and the consensus correction it carries
    overshoots: docs/algorithms.md, "DecentLaM under a learning-rate schedule").

    With a staleness bound ``T > 0`` the update is ``m_i <- beta' m_i + alpha gt_i`` with
    ``(alpha, beta') = stable_coefficients(beta, T)`` (docs/async-decentlam.md): the fixed point
    ``x = W psi`` is unchanged, so there is still no momentum-incurred bias, and stale vectors
    must keep their exact weights (damping them would make ``W`` asymmetric and bias the fixed
    point), hence :attr:`damps_stale_weights` is False. ``T = 0`` runs the synchronous code.

    Args:
        momentum: ``beta``.
        max_staleness: ``T``, the staleness bound of the run.
    """

    name = "decentlam"
    damps_stale_weights: ClassVar[bool] = False
    state_names: ClassVar[tuple[str, ...]] = ("velocity",)

    def __init__(self, momentum: float = DEFAULT_MOMENTUM, max_staleness: int = 0) -> None:
        super().__init__(momentum)
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.max_staleness = int(max_staleness)
        self.gradient_scale, self.effective_momentum = stable_coefficients(
            self.momentum, self.max_staleness
        )

    @property
    def effective_step(self) -> float:
        """How far the averaged model moves per step, in learning rates: ``alpha / (1 - beta')``.

        ``1 / (1 - beta)`` synchronously (10 for momentum 0.9); with a staleness bound the
        stable coefficients bring it to about 1 (docs/async-decentlam.md).
        """
        return self.gradient_scale / (1.0 - self.effective_momentum)

    def outgoing(self, x: Tensor, g: Tensor, state: State, lr: float, step: int) -> Tensor:
        return x - lr * g

    def apply(
        self, x: Tensor, g: Tensor, state: State, lr: float, mixed: Tensor, step: int
    ) -> None:
        _require_positive(lr, self.name)
        velocity = state["velocity"]  # gamma_k m_k: lr * corrected gradient = x - mixed
        if self.max_staleness == 0:
            velocity.mul_(self.momentum).add_(x - mixed)
        else:
            velocity.mul_(self.effective_momentum).add_(x - mixed, alpha=self.gradient_scale)
        x.sub_(velocity)

    def __repr__(self) -> str:
        if self.max_staleness == 0:
            return super().__repr__()
        return (
            f"DecentLaMRule(momentum={self.momentum}, max_staleness={self.max_staleness}: "
            f"alpha={self.gradient_scale:.4g}, beta'={self.effective_momentum:.2f})"
        )


class AWCDmSGDRule(_MomentumRule):
    """Adapt-while-combine DmSGD: ``m_i <- beta m_i + g_i``; ``x_i <- sum_j w_ij x_j - gamma m_i``.

    The message is ``x`` itself, so its exchange can overlap the gradient computation.
    """

    name = "awc-dmsgd"

    def outgoing(self, x: Tensor, g: Tensor, state: State, lr: float, step: int) -> Tensor:
        return x.clone()

    def apply(
        self, x: Tensor, g: Tensor, state: State, lr: float, mixed: Tensor, step: int
    ) -> None:
        momentum = state["momentum"]
        momentum.mul_(self.momentum).add_(g)
        x.copy_(mixed - lr * momentum)


class QGDmSGDRule(_MomentumRule):
    """Quasi-global momentum (Lin et al. 2021), with ``mu`` the momentum coefficient.

    ``m = mu mh + g``; send ``x - gamma m``; ``x_new = sum_j w_ij (x_j - gamma m_j)``;
    ``mh <- mu mh + (1 - mu) (x - x_new) / gamma``; ``x <- x_new``. The state buffer
    ``"momentum"`` holds ``mh``.
    """

    name = "qg-dmsgd"

    def outgoing(self, x: Tensor, g: Tensor, state: State, lr: float, step: int) -> Tensor:
        return x - lr * (self.momentum * state["momentum"] + g)

    def apply(
        self, x: Tensor, g: Tensor, state: State, lr: float, mixed: Tensor, step: int
    ) -> None:
        quasi_global = state["momentum"]
        _require_positive(lr, self.name)
        displacement = (x - mixed) / lr  # uses x^k, before it is overwritten
        quasi_global.mul_(self.momentum).add_(displacement, alpha=1.0 - self.momentum)
        x.copy_(mixed)


class PmSGDRule(_MomentumRule):
    """Parallel momentum SGD: ``g = (1/n) sum_j g_j``; ``m_i <- beta m_i + g``; ``x -= gamma m``."""

    name = "pmsgd"
    communication: ClassVar[str] = "global"

    def outgoing(self, x: Tensor, g: Tensor, state: State, lr: float, step: int) -> Tensor:
        return g.clone()

    def apply(
        self, x: Tensor, g: Tensor, state: State, lr: float, mixed: Tensor, step: int
    ) -> None:
        momentum = state["momentum"]
        momentum.mul_(self.momentum).add_(mixed)
        x.sub_(lr * momentum)


_RULES: dict[str, type[UpdateRule]] = {
    rule.name: rule
    for rule in (
        DecentLaMRule,
        DmSGDRule,
        DSGDRule,
        PmSGDRule,
        AWCDmSGDRule,
        QGDmSGDRule,
        DGDRule,
    )
}

#: Registry names of every method, in display order.
ALGORITHMS: tuple[str, ...] = tuple(_RULES)


def make_rule(
    name: str, momentum: float = DEFAULT_MOMENTUM, *, max_staleness: int = 0
) -> UpdateRule:
    """Build a method's update rule from its registry name.

    Args:
        name: one of :data:`ALGORITHMS` (case-insensitive; ``_`` accepted for ``-``).
        momentum: ``beta`` (``mu`` for QG-DmSGD); ignored by DSGD and DGD.
        max_staleness: the run's staleness bound ``T`` (DecentLaM adapts to it; the other
            rules do not depend on it).

    Returns:
        The :class:`UpdateRule`.

    Raises:
        ValueError: unknown name or momentum outside ``[0, 1)``.
    """
    key = name.strip().lower().replace("_", "-")
    if key not in _RULES:
        raise ValueError(f"unknown algorithm {name!r}; choose one of: {', '.join(ALGORITHMS)}")
    if max_staleness < 0:
        raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
    if _RULES[key] is DecentLaMRule:
        return DecentLaMRule(momentum=momentum, max_staleness=max_staleness)
    rule_class: Any = _RULES[key]  # every concrete rule takes momentum=
    return rule_class(momentum=momentum)


def staleness_cost(momentum: float, max_staleness: int) -> str:
    """One line telling a user what a staleness bound costs DecentLaM per step.

    The staleness-aware coefficients keep the run stable and its fixed point unbiased, but they
    give up momentum's acceleration (docs/async-decentlam.md): the averaged model moves
    :attr:`DecentLaMRule.effective_step` learning rates per step instead of ``1 / (1 - beta)``.

    Args:
        momentum: the configured ``beta``.
        max_staleness: ``T > 0``.

    Returns:
        The message (the peer logs it as a warning at start).
    """
    asynchronous = DecentLaMRule(momentum=momentum, max_staleness=max_staleness)
    synchronous = DecentLaMRule(momentum=momentum)
    return (
        f"DecentLaM with max_staleness={max_staleness} runs alpha="
        f"{asynchronous.gradient_scale:.3g}, beta'={asynchronous.effective_momentum:.2f} to stay "
        f"stable and unbiased: the averaged model moves {asynchronous.effective_step:.2f} lr per "
        f"step against {synchronous.effective_step:.2f} lr synchronously, so it needs more steps "
        f"or a larger lr (docs/async-decentlam.md)"
    )


def uses_global_average(rule: UpdateRule, step: int, global_average_every: int = 0) -> bool:
    """Whether iteration ``step`` mixes with the exact global average instead of ``W``.

    Args:
        rule: the update rule (``communication == "global"`` rules always do).
        step: the iteration ``k`` (0-based).
        global_average_every: ``H``; ``0`` disables periodic global averaging. Iteration ``k``
            averages globally when ``(k + 1) % H == 0``, i.e. after every ``H`` iterations.

    Returns:
        True for a global-average iteration.
    """
    if global_average_every < 0:
        raise ValueError(f"global_average_every must be >= 0, got {global_average_every}")
    if rule.communication == "global":
        return True
    return global_average_every > 0 and (step + 1) % global_average_every == 0
