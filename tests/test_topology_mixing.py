"""Weight schemes and every check of check_mixing_matrix (each failure message)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from topology.checks import TopologyError, check_mixing_matrix
from topology.graphs import (
    exponential,
    from_edges,
    fully_connected,
    grid,
    one_peer_exponential,
    ring,
    star,
)
from topology.mixing import (
    explicit_weights,
    metropolis_hastings_weights,
    resolve_weight_scheme,
    uniform_neighbor_weights,
)

PATH3 = from_edges(3, [[0, 1], [1, 2]])


def test_uniform_weights_ring() -> None:
    W = uniform_neighbor_weights(ring(8))
    assert W[0, 0] == W[0, 1] == W[0, 7] == pytest.approx(1 / 3)
    assert W[0, 2] == 0
    np.testing.assert_allclose(W, metropolis_hastings_weights(ring(8)))


def test_uniform_weights_one_peer_is_half_identity_half_shift() -> None:
    graph = one_peer_exponential(8)
    for k, offset in enumerate((1, 2, 4)):
        shift = np.roll(np.eye(8), offset, axis=1)  # row i has its 1 at column i + offset
        shift = shift.T  # peer i receives from i - offset
        expected = (np.eye(8) + shift) / 2
        np.testing.assert_array_equal(uniform_neighbor_weights(graph, k), expected)
        check_mixing_matrix(expected, graph, k, require_symmetric=False)


def test_metropolis_is_symmetric_doubly_stochastic_on_irregular_graph() -> None:
    W = metropolis_hastings_weights(star(5))
    np.testing.assert_allclose(W, W.T)
    np.testing.assert_allclose(W.sum(axis=0), 1)
    np.testing.assert_allclose(W.sum(axis=1), 1)
    assert W[0, 1] == pytest.approx(1 / 5) and W[0, 0] == pytest.approx(1 / 5)
    assert W[1, 1] == pytest.approx(4 / 5)
    check_mixing_matrix(W, star(5), require_symmetric="error")


def test_metropolis_rejects_directed_graph() -> None:
    with pytest.raises(TopologyError, match="need an undirected graph"):
        metropolis_hastings_weights(exponential(8, symmetric=False))


def test_resolve_weight_scheme() -> None:
    assert resolve_weight_scheme("auto", ring(4)) == "metropolis"
    assert resolve_weight_scheme("auto", exponential(4, symmetric=False)) == "uniform"
    assert resolve_weight_scheme("auto", one_peer_exponential(8)) == "uniform"
    assert resolve_weight_scheme("MH", ring(4)) == "metropolis"
    with pytest.raises(ValueError, match="unknown weight scheme 'metro'"):
        resolve_weight_scheme("metro", ring(4))


def test_explicit_weights() -> None:
    rows = [[0.5, 0.5, 0], [0.5, 0.25, 0.25], [0, 0.25, 0.75]]
    W = explicit_weights(rows, PATH3)
    assert W.dtype == np.float64 and W.shape == (3, 3)
    with pytest.raises(TopologyError, match="not a numeric"):
        explicit_weights([[1, "a"], [0, 1]])
    with pytest.raises(TopologyError, match="need a static graph"):
        explicit_weights(np.eye(8), one_peer_exponential(8))


@pytest.mark.parametrize(
    ("W", "graph", "message"),
    [
        (np.ones((2, 3)) / 3, None, "must be square n x n, got shape (2, 3)"),
        (np.eye(2), PATH3, "is 2 x 2 but graph 'explicit' has 3 peers"),
        ([[np.nan, 1], [1, 0]], None, "W[0, 0] = nan is not finite"),
        ([[1.5, -0.5], [-0.5, 1.5]], None, "W[0, 1] = -0.5 is negative"),
        ([[0.5, 0.6], [0.5, 0.4]], None, "row 0 sums to 1.1"),
        ([[0.5, 0.5], [0.6, 0.4]], None, "column 0 sums to 1.1"),
        (
            [[0.5, 0.5, 0], [0.5, 0.25, 0.25], [0, 0.25, 0.75]],
            from_edges(3, [[0, 1], [0, 2]]),
            "W[1, 2] = 0.25 but 2 -> 1 is not an edge",
        ),
        (np.eye(3), PATH3, "edge 0 -> 1 of graph 'explicit' has zero weight W[1, 0]"),
        (np.eye(3), None, "the support of W is not strongly connected: peer(s) 1, 2"),
        (
            np.eye(4),
            from_edges(4, [[0, 1], [2, 3]]),
            "edge 0 -> 1 of graph 'explicit' has zero weight",
        ),
    ],
)
def test_check_failures(W, graph, message: str) -> None:
    with pytest.raises(TopologyError) as info:
        check_mixing_matrix(np.asarray(W, dtype=float), graph)
    assert message in str(info.value)


def test_disconnected_graph_with_matching_weights() -> None:
    graph = from_edges(4, [[0, 1], [2, 3]])
    W = metropolis_hastings_weights(graph)
    with pytest.raises(TopologyError, match="graph 'explicit' is not strongly connected: peer"):
        check_mixing_matrix(W, graph)


def test_symmetry_policy(caplog: pytest.LogCaptureFixture) -> None:
    graph = one_peer_exponential(4)
    W = uniform_neighbor_weights(graph, 0)
    with pytest.raises(TopologyError, match=r"not symmetric: W\[0, 1\] = 0 but W\[1, 0\] = 0.5"):
        check_mixing_matrix(W, graph, 0, require_symmetric="error")
    with caplog.at_level(logging.WARNING, logger="topology.checks"):
        check_mixing_matrix(W, graph, 0)  # default "warn"
    assert "not symmetric" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="topology.checks"):
        check_mixing_matrix(W, graph, 0, require_symmetric=False)
    assert caplog.text == ""
    with pytest.raises(ValueError, match="require_symmetric must be"):
        check_mixing_matrix(W, graph, require_symmetric="maybe")


def test_valid_matrices_pass() -> None:
    for graph in (ring(6), grid(6), exponential(8), fully_connected(5), star(7)):
        check_mixing_matrix(metropolis_hastings_weights(graph), graph, require_symmetric="error")
    check_mixing_matrix(np.full((3, 3), 1 / 3))
    check_mixing_matrix(np.array([[0.0, 1.0], [1.0, 0.0]]))  # zero diagonal is allowed
