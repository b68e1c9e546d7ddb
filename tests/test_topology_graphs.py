"""Graph constructors, the registry, and Graph invariants."""

from __future__ import annotations

import math

import pytest

from topology.graphs import (
    GRAPH_NAMES,
    Graph,
    erdos_renyi,
    exponential,
    from_edges,
    fully_connected,
    grid,
    hypercube,
    make_graph,
    one_peer_exponential,
    random_regular,
    ring,
    star,
    torus,
    unreachable_peers,
)


def degrees(graph: Graph, k: int = 0) -> list[int]:
    return [len(graph.in_neighbors(i, k)) for i in range(graph.n)]


@pytest.mark.parametrize(
    ("graph", "n_edges", "degree_set"),
    [
        (ring(8), 16, {2}),
        (ring(2), 2, {1}),
        (ring(1), 0, {0}),
        (star(5), 8, {1, 4}),
        (grid(6), 14, {2, 3}),  # 2 x 3 mesh: 7 undirected edges
        (torus(9), 36, {4}),  # 3 x 3 torus
        (torus(8, rows=2), 24, {3}),  # 2 x 4: the vertical wrap repeats the same neighbour
        (exponential(8), 40, {5}),  # offsets 1, 2, 4 both ways: 1, 2, 4, 6, 7
        (exponential(8, symmetric=False), 24, {3}),
        (hypercube(8), 24, {3}),
        (hypercube(1), 0, {0}),
        (fully_connected(5), 20, {4}),
    ],
)
def test_static_constructors(graph: Graph, n_edges: int, degree_set: set[int]) -> None:
    assert len(graph.edges) == n_edges
    assert set(degrees(graph)) == degree_set
    assert graph.is_connected()
    assert not graph.time_varying and graph.period == 1
    assert graph.edges_at(5) == graph.edges
    assert all(src != dst for src, dst in graph.edges)


def test_directedness() -> None:
    for graph in (ring(5), star(4), grid(4), torus(4), exponential(6), hypercube(4)):
        assert graph.is_undirected, graph.name
    directed = exponential(8, symmetric=False)
    assert directed.name == "directed-exponential" and not directed.is_undirected
    assert directed.out_neighbors(0) == (1, 2, 4)
    assert directed.in_neighbors(0) == (4, 6, 7)


def test_ring_and_star_neighbors() -> None:
    assert ring(8).in_neighbors(0) == (1, 7)
    assert star(5, center=2).in_neighbors(2) == (0, 1, 3, 4)
    assert star(5, center=2).out_neighbors(4) == (2,)


def test_grid_default_shape_is_most_square() -> None:
    assert grid(12).params["rows"] == 3
    assert grid(7).params["rows"] == 1  # prime: a path
    assert grid(16).in_neighbors(5) == (1, 4, 6, 9)
    assert grid(12, rows=2).in_neighbors(0) == (1, 6)
    assert torus(16).in_neighbors(0) == (1, 3, 4, 12)


def test_one_peer_exponential_schedule() -> None:
    graph = one_peer_exponential(8)
    assert graph.time_varying and graph.period == 3
    for k, offset in enumerate((1, 2, 4, 1)):
        for i in range(8):
            assert graph.out_neighbors(i, k) == ((i + offset) % 8,)
            assert graph.in_neighbors(i, k) == ((i - offset) % 8,)
        assert len(graph.edges_at(k)) == 8
    assert graph.edges == exponential(8, symmetric=False).edges
    assert not graph.is_undirected
    assert one_peer_exponential(6).period == math.ceil(math.log2(6))
    assert one_peer_exponential(1).edges == frozenset()


def test_random_regular_is_regular_connected_and_seeded() -> None:
    for n, degree in ((10, 3), (12, 4), (7, 2), (2, 1)):
        graph = random_regular(n, degree, seed=5)
        assert set(degrees(graph)) == {degree}
        assert graph.is_undirected and graph.is_connected()
    assert random_regular(20, 3, seed=1) == random_regular(20, 3, seed=1)
    assert random_regular(20, 3, seed=1).edges != random_regular(20, 3, seed=2).edges


def test_erdos_renyi_connected_and_seeded() -> None:
    graph = erdos_renyi(30, 0.2, seed=3)
    assert graph.is_undirected and graph.is_connected()
    assert graph == erdos_renyi(30, 0.2, seed=3)
    assert graph.edges != erdos_renyi(30, 0.2, seed=4).edges
    assert len(erdos_renyi(6, 1.0).edges) == 30


def test_from_edges() -> None:
    graph = from_edges(4, [[0, 1], (1, 2), [2, 3], [0, 1]])
    assert len(graph.edges) == 6 and graph.is_undirected
    directed = from_edges(3, [[0, 1], [1, 2], [2, 0]], directed=True)
    assert len(directed.edges) == 3 and directed.is_connected()
    assert not from_edges(4, [[0, 1], [2, 3]]).is_connected()
    assert unreachable_peers(4, from_edges(4, [[0, 1], [2, 3]]).edges) == (2, 3)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ring(0), "ring: n must be >= 1"),
        (lambda: ring(True), "ring: n must be an integer"),
        (lambda: star(4, center=4), "center must be in 0..3"),
        (lambda: grid(8, rows=3), "rows=3 does not divide n=8"),
        (lambda: torus(6, rows=0), "torus: rows must be >= 1"),
        (lambda: exponential(4, symmetric="yes"), "symmetric must be true or false"),
        (lambda: hypercube(6), "n must be a power of two, got 6"),
        (lambda: random_regular(5, 3), "n * degree must be even"),
        (lambda: random_regular(4, 4), "degree must be < n=4"),
        (lambda: random_regular(6, 1), "degree 1 cannot connect 6 peers"),
        (lambda: erdos_renyi(5, 0.0), "p must be a number in (0, 1]"),
        (lambda: erdos_renyi(60, 0.001), "no connected graph"),
        (lambda: from_edges(3, [[0, 5]]), "names peer 5 but there are only 3 peers"),
        (lambda: from_edges(3, [[1, 1]]), "self loop"),
        (lambda: from_edges(3, [[0, 1, 2]]), "must be a pair"),
        (lambda: Graph("x", 2, frozenset({(0, 2)})), "outside 0..1"),
        (lambda: make_graph("rnig", 4), "did you mean 'ring'?"),
        (lambda: make_graph("ring", 4, rows=2), "does not take parameter(s) rows"),
        (lambda: make_graph("explicit", 4), "needs an 'edges' list"),
    ],
)
def test_invalid_arguments(build, message: str) -> None:
    with pytest.raises(ValueError) as info:
        build()
    assert message in str(info.value)


def test_registry_round_trip_and_aliases() -> None:
    assert make_graph("exp", 8) == exponential(8)
    assert make_graph("fully-connected", 4) == fully_connected(4)
    assert make_graph("mesh", 6) == grid(6)
    assert make_graph("Random_Regular", 8, degree=3, seed=2) == random_regular(8, 3, 2)
    params = {
        "random-regular": {"degree": 3, "seed": 1},
        "erdos-renyi": {"p": 0.5, "seed": 1},
        "explicit": {"edges": [[0, 1], [1, 2], [2, 3], [3, 4], [4, 5], [5, 6], [6, 7]]},
    }
    for name in GRAPH_NAMES:
        graph = make_graph(name, 8, **params.get(name, {}))
        assert graph.name == name
        rebuilt = make_graph(graph.name, graph.n, **graph.params)
        assert rebuilt == graph, name


def test_rank_bounds_and_hashable() -> None:
    with pytest.raises(IndexError, match=r"out of range 0\.\.3"):
        ring(4).in_neighbors(4)
    assert hash(ring(4)) == hash(ring(4))
