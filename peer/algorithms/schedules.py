"""Learning-rate schedules: pure functions of the iteration ``k`` (0-based).

Every schedule is a small immutable object with ``lr_at(k) -> float`` (also callable as
``schedule(k)``), so the simulator, the optimizers and a restarted peer all compute the same
``gamma_k`` from nothing but ``k``. :func:`make_schedule` builds one from a manifest/CLI spec:

* ``None`` or ``"constant"``: ``gamma_k = base_lr``;
* ``"cosine"`` / ``{"name": "cosine", "warmup_steps": 100, "min_lr": 0.0}``;
* ``"step"`` / ``{"name": "step", "milestones": [1000, 2000], "gamma": 0.1}``;
* ``"warmup"`` / ``{"name": "warmup", "warmup_steps": 100, "then": <spec>}``: a linear warmup
  followed by another schedule (constant by default), which sees ``k - warmup_steps``.

Strings may carry parameters: ``"cosine:warmup_steps=50,min_lr=0.001"``,
``"step:milestones=100+200,gamma=0.5"``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

logger = logging.getLogger(__name__)


class Schedule(Protocol):
    """Anything with ``lr_at(k)``."""

    def lr_at(self, k: int) -> float:
        """The learning rate of iteration ``k``."""
        ...


def _warmup_factor(k: int, warmup_steps: int) -> float:
    # Linear ramp that reaches the full rate at k = warmup_steps - 1 and never yields 0.
    return (k + 1) / warmup_steps


@dataclass(frozen=True)
class ConstantSchedule:
    """``gamma_k = base_lr``."""

    base_lr: float

    def lr_at(self, k: int) -> float:
        """The learning rate of iteration ``k``."""
        return float(self.base_lr)

    def __call__(self, k: int) -> float:
        return self.lr_at(k)


@dataclass(frozen=True)
class LinearWarmup:
    """``gamma_k = base_lr (k + 1) / warmup_steps`` for ``k < warmup_steps``, then ``after``.

    Attributes:
        base_lr: rate reached at the end of the warmup.
        warmup_steps: length of the ramp (``>= 1``).
        after: schedule used from ``k = warmup_steps`` on, evaluated at ``k - warmup_steps``;
            ``None`` keeps ``base_lr``.
    """

    base_lr: float
    warmup_steps: int
    after: Any = None

    def __post_init__(self) -> None:
        if self.warmup_steps < 1:
            raise ValueError(f"warmup_steps must be >= 1, got {self.warmup_steps}")

    def lr_at(self, k: int) -> float:
        """The learning rate of iteration ``k``."""
        if k < self.warmup_steps:
            return float(self.base_lr) * _warmup_factor(k, self.warmup_steps)
        if self.after is None:
            return float(self.base_lr)
        return float(self.after.lr_at(k - self.warmup_steps))

    def __call__(self, k: int) -> float:
        return self.lr_at(k)


@dataclass(frozen=True)
class StepDecay:
    """``gamma_k = base_lr * gamma ** (number of milestones <= k)``."""

    base_lr: float
    milestones: tuple[int, ...] = field(default=())
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"milestones must be increasing, got {list(self.milestones)}")

    def lr_at(self, k: int) -> float:
        """The learning rate of iteration ``k``."""
        passed = sum(1 for milestone in self.milestones if k >= milestone)
        return float(self.base_lr) * float(self.gamma) ** passed

    def __call__(self, k: int) -> float:
        return self.lr_at(k)


@dataclass(frozen=True)
class CosineSchedule:
    """Optional linear warmup, then a half cosine from ``base_lr`` to ``min_lr``.

    ``gamma_k = min_lr + (base_lr - min_lr) (1 + cos(pi t)) / 2`` with
    ``t = (k - warmup_steps) / (total_steps - warmup_steps)`` clipped to ``[0, 1]``.
    """

    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(
                f"warmup_steps must be in [0, total_steps={self.total_steps}), "
                f"got {self.warmup_steps}"
            )

    def lr_at(self, k: int) -> float:
        """The learning rate of iteration ``k``."""
        if k < self.warmup_steps:
            return float(self.base_lr) * _warmup_factor(k, self.warmup_steps)
        t = min(1.0, (k - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))

    def __call__(self, k: int) -> float:
        return self.lr_at(k)


def _parse_value(text: str) -> Any:
    if "+" in text:
        return [int(part) for part in text.split("+") if part]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_schedule_string(text: str) -> dict[str, Any]:
    """Turn ``"name:key=value,key=value"`` into a spec mapping (``a+b`` is a list of ints).

    Args:
        text: the schedule string.

    Returns:
        ``{"name": name, key: value, ...}``.
    """
    name, _, rest = text.partition(":")
    spec: dict[str, Any] = {"name": name.strip()}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"schedule parameter {item!r} is not key=value (in {text!r})")
        spec[key.strip()] = _parse_value(value.strip())
    return spec


_KNOWN = ("constant", "warmup", "step", "cosine")


def make_schedule(
    spec: Mapping[str, Any] | str | None, base_lr: float, total_steps: int
) -> Schedule:
    """Build a schedule from a spec (see the module docstring).

    Args:
        spec: ``None``, a name/parameter string, or a mapping with a ``"name"`` key.
        base_lr: the peak learning rate (a mapping may override it with ``"base_lr"``).
        total_steps: the run length (used by cosine).

    Returns:
        A schedule with ``lr_at(k)``.

    Raises:
        ValueError: unknown name, unknown or invalid parameters.
    """
    if spec is None:
        return ConstantSchedule(float(base_lr))
    params = parse_schedule_string(spec) if isinstance(spec, str) else dict(spec)
    name = str(params.pop("name", "constant")).lower()
    base_lr = float(params.pop("base_lr", base_lr))
    try:
        if name == "constant":
            schedule: Schedule = ConstantSchedule(base_lr, **params)
        elif name == "warmup":
            after_spec = params.pop("then", None)
            warmup_steps = int(params.pop("warmup_steps", params.pop("steps", 0)))
            after = None
            if after_spec is not None:
                after = make_schedule(after_spec, base_lr, max(1, total_steps - warmup_steps))
            schedule = LinearWarmup(base_lr, warmup_steps, after, **params)
        elif name == "step":
            milestones = params.pop("milestones", ())
            if isinstance(milestones, int):
                milestones = [milestones]
            schedule = StepDecay(base_lr, tuple(int(m) for m in milestones), **params)
        elif name == "cosine":
            steps = int(params.pop("total_steps", total_steps))
            schedule = CosineSchedule(base_lr, steps, **params)
        else:
            raise ValueError(f"unknown schedule {name!r}; choose one of: {', '.join(_KNOWN)}")
    except TypeError as exc:
        raise ValueError(f"bad parameters for schedule {name!r}: {exc}") from exc
    return schedule
