"""Spectral numbers (the acceptance values) and the Topology object."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from topology.checks import TopologyError
from topology.graphs import ring
from topology.spectral import (
    consensus_rate,
    iterations_to_consensus,
    per_iteration_rate,
    period_consensus_rate,
    period_product,
    spectral_gap,
)
from topology.topology import PeerView, Topology, make_topology


def test_acceptance_numbers() -> None:
    assert round(make_topology("ring", 8, "uniform").consensus_rate(), 4) == 0.8047
    assert make_topology("ring", 8, "metropolis").consensus_rate() == pytest.approx(0.80474, 1e-4)
    assert make_topology("exponential", 8, "uniform").consensus_rate() == pytest.approx(1 / 3)
    assert make_topology("full", 8).consensus_rate() == 0.0
    assert make_topology("full", 8).spectral_gap() == 1.0


@pytest.mark.parametrize("n", [2, 4, 8, 16, 32, 64])
def test_one_peer_exponential_period_product_is_exact_average(n: int) -> None:
    topo = make_topology("one-peer-exponential", n, require_symmetric=False)
    assert topo.period == max(1, int(np.log2(n)))
    product = period_product(topo.mixing_matrices())
    assert np.abs(product - 1 / n).max() <= 1e-15
    assert topo.consensus_rate() == 0.0


def test_rates_of_single_matrices() -> None:
    W = ring(8)
    topo = make_topology(W, weights="uniform")
    M = topo.mixing_matrix()
    assert spectral_gap(M) == pytest.approx(1 - 0.8047378541243649)
    assert consensus_rate(np.eye(3)) == 1.0
    with pytest.raises(ValueError, match="square"):
        consensus_rate(np.ones(3))


def test_period_rates() -> None:
    topo = make_topology("one-peer-exponential", 6, require_symmetric=False)
    rate = period_consensus_rate(topo.mixing_matrices())
    assert 0 < rate < 1
    assert per_iteration_rate(topo.mixing_matrices()) == pytest.approx(rate ** (1 / 3))
    assert topo.per_iteration_rate() == pytest.approx(rate ** (1 / 3))
    with pytest.raises(ValueError, match="at least one"):
        period_consensus_rate([])


def test_iterations_to_consensus() -> None:
    assert iterations_to_consensus(0.5, 0.25) == pytest.approx(2)
    assert iterations_to_consensus(0.0) == 1.0
    assert iterations_to_consensus(1.0) == float("inf")


@pytest.mark.parametrize(
    ("graph", "params"),
    [
        ("ring", {}),
        ("star", {}),
        ("grid", {"rows": 2}),
        ("directed-exponential", {}),
        ("one-peer-exponential", {}),
        ("random-regular", {"degree": 3, "seed": 0}),
    ],
)
def test_view_matches_mixing_matrix(graph: str, params: dict) -> None:
    topo = make_topology(graph, 8, require_symmetric=False, **params)
    for k in range(topo.period + 1):
        W = topo.mixing_matrix(k)
        for rank in range(topo.n):
            view = topo.view(rank, k)
            assert isinstance(view, PeerView) and view.step == k
            assert view.self_weight == W[rank, rank]
            assert list(view.in_neighbors) == sorted(view.in_neighbors)
            row = np.zeros(topo.n)
            row[rank] = view.self_weight
            for j, w in view.in_neighbors.items():
                row[j] = w
                assert w > 0 and j != rank
            np.testing.assert_array_equal(row, W[rank])
            assert view.out_neighbors == tuple(
                i for i in range(topo.n) if i != rank and W[i, rank] > 0
            )
            assert view.out_neighbors == topo.graph.out_neighbors(rank, k)


def test_topology_properties_and_caching() -> None:
    topo = make_topology("one-peer-exponential", 8, require_symmetric=False)
    assert topo.n == 8 and topo.is_time_varying and topo.period == 3
    assert topo.weights == "uniform"
    assert topo.mixing_matrix(4) is topo.mixing_matrix(1)
    assert len(topo.mixing_matrices()) == 3
    with pytest.raises(ValueError, match="read-only"):
        topo.mixing_matrix(0)[0, 0] = 1.0
    assert topo.messages_per_peer(0) == {
        "max": 1,
        "min": 1,
        "mean": 1.0,
        "max_received": 1,
        "min_received": 1,
        "mean_received": 1.0,
        "total": 8,
    }
    star = make_topology("star", 5)
    assert star.messages_per_peer()["max"] == 4 and star.messages_per_peer()["min"] == 1
    assert repr(star) == "Topology(graph='star', n=5, weights='metropolis')"
    with pytest.raises(IndexError):
        star.view(5)


def test_explicit_weights_topology() -> None:
    W = np.array([[0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    graph = make_topology("ring", 3).graph  # triangle; W misses edge 0 <-> 2
    with pytest.raises(TopologyError, match="has zero weight"):
        make_topology(graph, weights=W)
    from topology.graphs import from_edges

    topo = make_topology(from_edges(3, [[0, 1], [1, 2]]), weights=W)
    assert topo.weights == "explicit"
    np.testing.assert_array_equal(topo.mixing_matrix(), W)


def test_make_topology_errors_and_warning(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError, match="n is required"):
        make_topology("ring")
    with pytest.raises(ValueError, match="does not match"):
        make_topology(ring(4), 5)
    with pytest.raises(ValueError, match="only accepted with a graph name"):
        make_topology(ring(4), rows=2)
    with pytest.raises(TopologyError, match="column 0 sums to"):
        make_topology("star", 5, "uniform")
    with pytest.raises(TopologyError, match="undirected"):
        make_topology("directed-exponential", 8, "metropolis")
    with pytest.raises(TopologyError, match="not symmetric"):
        make_topology("one-peer-exponential", 8, require_symmetric="error")
    with pytest.raises(ValueError, match="need an n x n matrix"):
        Topology(ring(3), "explicit")
    with caplog.at_level(logging.WARNING):
        make_topology("one-peer-exponential", 8)
    warnings = [r for r in caplog.records if "not symmetric" in r.getMessage()]
    assert len(warnings) == 1 and "iteration(s) 0, 1 of 3" in warnings[0].getMessage()
