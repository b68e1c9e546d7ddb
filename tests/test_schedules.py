"""Learning-rate schedules: values at chosen iterations, spec parsing and errors."""

from __future__ import annotations

import logging
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from peer.algorithms.schedules import (
    ConstantSchedule,
    CosineSchedule,
    LinearWarmup,
    StepDecay,
    make_schedule,
    parse_schedule_string,
)

logger = logging.getLogger(__name__)


def test_constant_and_none() -> None:
    assert make_schedule(None, 0.3, 10).lr_at(7) == 0.3
    assert make_schedule("constant", 0.3, 10)(0) == ConstantSchedule(0.3).lr_at(99)


def test_linear_warmup_then_constant_or_other() -> None:
    warm = LinearWarmup(1.0, 4)
    assert [warm.lr_at(k) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    chained = make_schedule(
        {"name": "warmup", "warmup_steps": 2, "then": "step:milestones=3,gamma=0.5"}, 2.0, 10
    )
    assert [chained.lr_at(k) for k in range(7)] == [1.0, 2.0, 2.0, 2.0, 2.0, 1.0, 1.0]


def test_step_decay() -> None:
    schedule = make_schedule("step:milestones=2+4,gamma=0.1", 1.0, 10)
    assert isinstance(schedule, StepDecay)
    assert [schedule.lr_at(k) for k in (0, 1, 2, 3, 4, 9)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01]
    )


def test_cosine_with_warmup() -> None:
    schedule = make_schedule({"name": "cosine", "warmup_steps": 10, "min_lr": 0.1}, 1.0, 110)
    assert isinstance(schedule, CosineSchedule)
    assert schedule.lr_at(0) == pytest.approx(0.1)
    assert schedule.lr_at(10) == pytest.approx(1.0)
    assert schedule.lr_at(60) == pytest.approx(0.55)
    assert schedule.lr_at(110) == pytest.approx(0.1) == schedule.lr_at(10_000)


@given(st.integers(min_value=0, max_value=10_000))
def test_cosine_is_positive_and_bounded_before_the_end(k: int) -> None:
    schedule = CosineSchedule(0.5, total_steps=10_001, warmup_steps=100)
    assert 0.0 < schedule.lr_at(k) <= 0.5 + 1e-15
    assert math.isfinite(schedule(k))


def test_parsing_and_errors() -> None:
    assert parse_schedule_string("cosine:warmup_steps=5,min_lr=0.5") == {
        "name": "cosine",
        "warmup_steps": 5,
        "min_lr": 0.5,
    }
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("triangle", 1.0, 10)
    with pytest.raises(ValueError, match="key=value"):
        make_schedule("cosine:warmup", 1.0, 10)
    with pytest.raises(ValueError, match="bad parameters"):
        make_schedule({"name": "step", "milestones": [1], "bogus": 1}, 1.0, 10)
    with pytest.raises(ValueError, match="warmup_steps"):
        make_schedule("cosine:warmup_steps=20", 1.0, 10)
    with pytest.raises(ValueError, match="increasing"):
        StepDecay(1.0, (5, 2))
