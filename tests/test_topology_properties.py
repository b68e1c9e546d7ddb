"""Property tests: weight schemes on random connected graphs."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from topology.checks import check_mixing_matrix
from topology.graphs import erdos_renyi, from_edges, make_graph
from topology.mixing import metropolis_hastings_weights
from topology.spectral import consensus_rate
from topology.topology import make_topology


@st.composite
def connected_graphs(draw: st.DrawFn):
    n = draw(st.integers(2, 12))
    # A random spanning tree (keeps the graph connected) plus random extra edges.
    edges = [(draw(st.integers(0, i - 1)), i) for i in range(1, n)]
    extra = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=20))
    edges += [(a, b) for a, b in extra if a != b]
    perm = draw(st.permutations(range(n)))
    return from_edges(n, [(perm[a], perm[b]) for a, b in edges])


@settings(max_examples=60, deadline=None)
@given(connected_graphs())
def test_metropolis_is_symmetric_doubly_stochastic(graph) -> None:
    W = metropolis_hastings_weights(graph)
    np.testing.assert_allclose(W, W.T, atol=1e-12)
    np.testing.assert_allclose(W.sum(axis=1), 1, atol=1e-12)
    assert (W >= 0).all()
    check_mixing_matrix(W, graph, require_symmetric="error")
    assert 0 <= consensus_rate(W) < 1  # connected: strictly mixes


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 24), st.floats(0.3, 1.0), st.integers(0, 2**16))
def test_erdos_renyi_topologies_are_valid(n: int, p: float, seed: int) -> None:
    graph = erdos_renyi(n, p, seed)
    assert graph == erdos_renyi(n, p, seed)
    make_topology(graph, require_symmetric="error")


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["ring", "torus", "exponential", "full", "grid"]), st.integers(1, 20))
def test_consensus_rate_in_unit_interval(name: str, n: int) -> None:
    topo = make_topology(make_graph(name, n), require_symmetric="error")
    assert 0.0 <= topo.consensus_rate() <= 1.0
    if n > 1:
        assert topo.consensus_rate() < 1.0
