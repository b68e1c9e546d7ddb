"""Unit tests of the pure update rules (peer.algorithms.rules) and the global-averaging
convention."""

from __future__ import annotations

import logging

import pytest
import torch

from peer.algorithms.rules import ALGORITHMS, make_rule, uses_global_average

logger = logging.getLogger(__name__)


def test_registry_has_the_seven_methods() -> None:
    assert set(ALGORITHMS) == {
        "decentlam",
        "dmsgd",
        "dsgd",
        "pmsgd",
        "awc-dmsgd",
        "qg-dmsgd",
        "dgd",
    }
    assert make_rule("QG_DmSGD").name == "qg-dmsgd"


def test_unknown_name_and_bad_momentum_are_value_errors() -> None:
    with pytest.raises(ValueError, match="unknown algorithm 'adam'"):
        make_rule("adam")
    with pytest.raises(ValueError, match="momentum"):
        make_rule("dmsgd", momentum=1.0)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_outgoing_is_pure_and_apply_is_in_place(name: str) -> None:
    rule = make_rule(name, momentum=0.5)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    g = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    state = rule.init_state(x)
    for value in state.values():
        value.copy_(torch.randn(3, 5, generator=gen, dtype=torch.float64))
    before_x, before_state = x.clone(), {k: v.clone() for k, v in state.items()}
    msg = rule.outgoing(x, g, state, 0.1, 0)
    assert msg.data_ptr() != x.data_ptr() and msg.data_ptr() != g.data_ptr()
    assert torch.equal(x, before_x)
    assert all(torch.equal(state[k], before_state[k]) for k in state)
    x_ptr = x.data_ptr()
    rule.apply(x, g, state, 0.1, msg.mean(0, keepdim=True).expand_as(msg), 0)
    assert x.data_ptr() == x_ptr and not torch.equal(x, before_x)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_rules_are_elementwise(name: str) -> None:
    """Applying a rule to slices gives the same result as applying it to the whole vector."""
    rule = make_rule(name)
    gen = torch.Generator().manual_seed(1)
    x, g, mixed = (torch.randn(10, generator=gen, dtype=torch.float64) for _ in range(3))
    whole_x, whole_state = x.clone(), rule.init_state(x)
    whole_msg = rule.outgoing(whole_x, g, whole_state, 0.05, 3)
    rule.apply(whole_x, g, whole_state, 0.05, mixed, 3)
    part_state = rule.init_state(x)
    for lo, hi in ((0, 4), (4, 10)):
        piece = {k: v[lo:hi] for k, v in part_state.items()}
        msg = rule.outgoing(x[lo:hi], g[lo:hi], piece, 0.05, 3)
        assert torch.equal(msg, whole_msg[lo:hi])
        rule.apply(x[lo:hi], g[lo:hi], piece, 0.05, mixed[lo:hi], 3)
    assert torch.equal(x, whole_x)


def test_decentlam_closed_form() -> None:
    """x^{k+1} = W (x^k - gamma g) + beta (x^k - x^{k-1}) (docs/algorithms.md)."""
    rule = make_rule("decentlam", momentum=0.9)
    gen = torch.Generator().manual_seed(2)
    W = (
        torch.full((4, 4), 0.25, dtype=torch.float64) * 0.5
        + torch.eye(4, dtype=torch.float64) * 0.5
    )
    x = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    state = rule.init_state(x)
    previous = x.clone()
    for k in range(5):
        g = torch.randn(4, 3, generator=gen, dtype=torch.float64)
        expected = W @ (x - 0.1 * g) + 0.9 * (x - previous)
        previous = x.clone()
        rule.apply(x, g, state, 0.1, W @ rule.outgoing(x, g, state, 0.1, k), k)
        torch.testing.assert_close(x, expected, rtol=1e-12, atol=1e-12)


def test_decentlam_rejects_zero_learning_rate() -> None:
    rule = make_rule("decentlam")
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="positive learning rate"):
        rule.apply(x, x, rule.init_state(x), 0.0, x, 0)


def test_global_average_convention() -> None:
    dsgd, pmsgd = make_rule("dsgd"), make_rule("pmsgd")
    assert [k for k in range(10) if uses_global_average(dsgd, k, 4)] == [3, 7]
    assert not any(uses_global_average(dsgd, k, 0) for k in range(10))
    assert all(uses_global_average(pmsgd, k, 0) for k in range(10))
    assert pmsgd.communication == "global" and dsgd.communication == "partial"
    with pytest.raises(ValueError):
        uses_global_average(dsgd, 0, -1)
