"""Invariants of the live-graph decisions (topology.live): pure, no network, made-up clocks."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from topology import make_topology
from topology.live import (
    LinkState,
    MembershipPolicy,
    MixingMode,
    NeighborStatus,
    fell_behind,
    live_set,
    mark_down,
    may_readmit,
    metropolis_live_row,
    mixing_mode,
    probe_answered,
    probe_sent,
    saw_step,
    self_absorbing_row,
    should_probe,
)

POLICY = MembershipPolicy(detection_seconds=2.0, probe_interval_seconds=0.5)


def reference_live_matrix(W: np.ndarray, alive: set[int]) -> np.ndarray:
    """Plain reference: MH on the subgraph of live nodes, topology weights where both ends keep
    their full degree, dead nodes isolated (identity rows)."""
    n = len(W)
    full = {i: {j for j in range(n) if j != i and W[i, j] > 0} for i in range(n)}
    live = {i: (full[i] & alive) if i in alive else set() for i in range(n)}
    out = np.zeros_like(W)
    for i in range(n):
        for j in live[i]:
            if len(live[i]) == len(full[i]) and len(live[j]) == len(full[j]):
                out[i, j] = W[i, j]
            else:
                out[i, j] = 1.0 / (1 + max(len(live[i]), len(live[j])))
        out[i, i] = W[i, i] if out[i].sum() == W[i].sum() - W[i, i] else 1.0 - out[i].sum()
    return out


def assembled_matrix(topo, alive: set[int]) -> np.ndarray:
    """Every live peer's row from metropolis_live_row, with the views agreeing."""
    n = topo.n
    W = np.eye(n)
    declared = {i: frozenset(j for j in topo.view(i).in_neighbors if j in alive) for i in range(n)}
    degrees = {i: len(topo.view(i).in_neighbors) for i in range(n)}
    for i in sorted(alive):
        view = topo.view(i)
        received = {j: declared[j] for j in declared[i]}
        w_ii, row = metropolis_live_row(
            i, view.self_weight, view.in_neighbors, declared[i], received, degrees
        )
        W[i] = 0.0
        W[i, i] = w_ii
        for j, w in row.items():
            W[i, j] = w
    return W


@pytest.mark.parametrize(("graph", "n"), [("ring", 8), ("exponential", 8), ("grid", 9)])
def test_fault_free_row_is_the_topology_row_bit_for_bit(graph: str, n: int) -> None:
    topo = make_topology(graph, n)
    degrees = {i: len(topo.view(i).in_neighbors) for i in range(n)}
    for i in range(n):
        view = topo.view(i)
        full = frozenset(view.in_neighbors)
        their = {j: frozenset(topo.view(j).in_neighbors) for j in full}
        w_ii, row = metropolis_live_row(
            i, view.self_weight, view.in_neighbors, full, their, degrees
        )
        assert w_ii == view.self_weight
        assert row == dict(view.in_neighbors)
        # an older peer that declares nothing is taken as fully live
        legacy = metropolis_live_row(
            i, view.self_weight, view.in_neighbors, full, dict.fromkeys(full), degrees
        )
        assert legacy == (view.self_weight, dict(view.in_neighbors))


@pytest.mark.parametrize(("graph", "n"), [("ring", 8), ("exponential", 8), ("grid", 9)])
def test_agreeing_views_give_symmetric_doubly_stochastic_w(graph: str, n: int) -> None:
    topo = make_topology(graph, n)
    W = topo.mixing_matrix()
    for dead_count in range(0, 4):
        for dead in itertools.combinations(range(n), dead_count):
            alive = set(range(n)) - set(dead)
            live_W = assembled_matrix(topo, alive)
            np.testing.assert_allclose(live_W, live_W.T, atol=1e-15)
            np.testing.assert_allclose(live_W.sum(axis=1), 1.0, atol=1e-12)
            np.testing.assert_allclose(live_W.sum(axis=0), 1.0, atol=1e-12)
            assert (live_W >= 0).all()
            np.testing.assert_allclose(live_W, reference_live_matrix(W, alive), atol=1e-15)


def test_disagreeing_views_keep_rows_stochastic() -> None:
    topo = make_topology("exponential", 8)
    degrees = {i: len(topo.view(i).in_neighbors) for i in range(8)}
    rng = random.Random(0)
    for _ in range(300):
        i = rng.randrange(8)
        view = topo.view(i)
        nbrs = sorted(view.in_neighbors)
        own = frozenset(j for j in nbrs if rng.random() < 0.7)
        received = {}
        for j in own:
            if rng.random() < 0.8:
                theirs = [k for k in topo.view(j).in_neighbors if rng.random() < 0.7]
                received[j] = frozenset(theirs)
        w_ii, row = metropolis_live_row(
            i, view.self_weight, view.in_neighbors, own, received, degrees
        )
        assert w_ii >= 0 and all(w > 0 for w in row.values())
        assert w_ii + sum(row.values()) == pytest.approx(1.0, abs=1e-12)
        assert set(row) <= set(received)
        assert all(i in received[j] for j in row)


def test_one_sided_link_is_dropped_by_the_other_side() -> None:
    topo = make_topology("ring", 4)
    degrees = dict.fromkeys(range(4), 2)
    v0 = topo.view(0)
    # peer 1 declared it no longer mixes 0: peer 0 must not mix 1 either
    w_ii, row = metropolis_live_row(
        0, v0.self_weight, v0.in_neighbors, frozenset({1, 3}),
        {1: frozenset({2}), 3: frozenset({0, 2})}, degrees,
    )  # fmt: skip
    assert set(row) == {3}
    assert row[3] == pytest.approx(1 / 3)  # MH of live degrees max(2, 2)
    assert w_ii == pytest.approx(2 / 3)


@pytest.mark.parametrize("graph", ["one-peer-exponential", "ring"])
def test_self_absorbing_rows(graph: str) -> None:
    topo = make_topology(graph, 8, weights="uniform")
    for k in range(topo.period):
        for i in range(8):
            view = topo.view(i, k)
            assert self_absorbing_row(
                view.self_weight, view.in_neighbors, set(view.in_neighbors)
            ) == (
                view.self_weight,
                dict(view.in_neighbors),
            )
            w_ii, row = self_absorbing_row(view.self_weight, view.in_neighbors, set())
            assert row == {} and w_ii == pytest.approx(1.0)


def test_mixing_mode() -> None:
    assert mixing_mode("metropolis", False) is MixingMode.METROPOLIS
    assert mixing_mode("metropolis", True) is MixingMode.SELF_ABSORBING
    assert mixing_mode("uniform", False) is MixingMode.SELF_ABSORBING
    assert mixing_mode(make_topology("ring", 8).weights, False) is MixingMode.METROPOLIS


def test_down_probe_readmit_cycle_with_a_made_up_clock() -> None:
    status = NeighborStatus()
    assert status.up and not should_probe(status, 0.0, POLICY)
    status = mark_down(status, 10.0, "DEADLINE_EXCEEDED")
    assert status.state is LinkState.DOWN and status.changes == 1 and status.since == 10.0
    assert should_probe(status, 10.0, POLICY)
    status = probe_sent(status, 10.0)
    assert not should_probe(status, 10.4, POLICY)
    assert should_probe(status, 10.5, POLICY)
    # answered, but far behind (a restarted peer at step 0): stays down
    status = probe_answered(status, 10.6, their_step=0, own_step=100, policy=POLICY)
    assert not status.up and status.known_step == 0
    # caught up from a neighbour's state: re-admitted
    status = probe_answered(status, 11.0, their_step=99, own_step=100, policy=POLICY)
    assert status.up and status.changes == 2 and status.since == 11.0
    assert mark_down(mark_down(status, 12.0, "x"), 13.0, "y").since == 12.0


def test_readmit_window_and_fell_behind() -> None:
    assert may_readmit(98, 100, POLICY) and may_readmit(103, 100, POLICY)
    assert not may_readmit(97, 100, POLICY) and not may_readmit(104, 100, POLICY)
    statuses = {1: saw_step(NeighborStatus(), 103), 2: saw_step(NeighborStatus(), 90)}
    assert fell_behind(100, statuses, POLICY) is None
    statuses[3] = saw_step(NeighborStatus(), 140)
    statuses[4] = saw_step(NeighborStatus(), 140)
    assert fell_behind(100, statuses, POLICY) == 3
    assert saw_step(statuses[3], 120).known_step == 140


def test_live_set_and_policy_checks() -> None:
    statuses = {1: mark_down(NeighborStatus(), 0.0, "x"), 2: NeighborStatus()}
    assert live_set(statuses, {1, 2, 3}) == frozenset({2, 3})
    with pytest.raises(ValueError, match="positive"):
        MembershipPolicy(detection_seconds=0)
    with pytest.raises(ValueError, match="readmit_margin_steps"):
        MembershipPolicy(readmit_margin_steps=4, behind_steps=4)
