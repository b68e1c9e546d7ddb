"""Communication graphs between peers: who sends its vector to whom at each iteration.

A :class:`Graph` is pure structure (no weights): a set of directed edges ``(src, dst)`` meaning
"``dst`` receives ``src``'s vector". Undirected graphs simply contain both directions. A
time-varying graph (one-peer exponential) uses a different edge set at each iteration of a
period; :attr:`Graph.edges` is then the union over the period and :meth:`Graph.edges_at` gives
the edges of one iteration.

Every constructor validates its arguments and raises :class:`ValueError` with a message a user
can act on. Random graphs take an explicit ``seed`` and are deterministic. :func:`make_graph`
builds any graph from its registry name, which is what manifests and the CLI use.
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

Edge = tuple[int, int]

# Bounded retries for the random constructors: enough for any sensible argument, small enough
# to fail fast (with a clear error) when the arguments make a connected graph unlikely.
_MAX_RANDOM_ATTEMPTS = 100


@dataclass(frozen=True)
class Graph:
    """A directed communication graph over peers ``0..n-1``.

    Attributes:
        name: registry name (see :data:`GRAPH_NAMES`); ``make_graph(name, n, **params)``
            rebuilds an equal graph.
        n: number of peers.
        edges: directed edges ``(src, dst)``: ``dst`` receives ``src``'s vector. No self loops.
            For a time-varying graph, the union over one period.
        time_varying: whether the edge set changes with the iteration.
        period: number of distinct iterations before the edge sets repeat (1 if static).
        params: the constructor parameters, for display and round trips.
        schedule: for a time-varying graph, the edge set of each iteration of the period;
            empty for a static graph.
    """

    name: str
    n: int
    edges: frozenset[Edge]
    time_varying: bool = False
    period: int = 1
    params: Mapping[str, Any] = field(default_factory=dict, hash=False)
    schedule: tuple[frozenset[Edge], ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"graph {self.name!r}: n must be a positive integer, got {self.n!r}")
        object.__setattr__(self, "edges", frozenset(self.edges))
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))
        _check_edges(self.name, self.n, self.edges)
        if self.time_varying:
            if len(self.schedule) != self.period or self.period < 1:
                raise ValueError(
                    f"graph {self.name!r}: schedule has {len(self.schedule)} edge sets "
                    f"but period is {self.period}"
                )
            schedule = tuple(frozenset(s) for s in self.schedule)
            union: frozenset[Edge] = frozenset().union(*schedule)
            if union != self.edges:
                raise ValueError(f"graph {self.name!r}: edges must be the union of the schedule")
            object.__setattr__(self, "schedule", schedule)
        elif self.period != 1 or self.schedule:
            raise ValueError(f"graph {self.name!r}: a static graph has period 1 and no schedule")
        # Neighbour lists per iteration of the period, built lazily (not a dataclass field).
        object.__setattr__(self, "_adjacency", {})

    def edges_at(self, k: int) -> frozenset[Edge]:
        """Return the edges used at iteration ``k`` (``edges`` for a static graph)."""
        if not self.time_varying:
            return self.edges
        return self.schedule[k % self.period]

    def _lists(self, k: int) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]:
        key = k % self.period
        cache: dict[int, Any] = self._adjacency  # type: ignore[attr-defined]
        if key not in cache:
            ins: list[list[int]] = [[] for _ in range(self.n)]
            outs: list[list[int]] = [[] for _ in range(self.n)]
            for src, dst in self.edges_at(key):
                ins[dst].append(src)
                outs[src].append(dst)
            cache[key] = (
                tuple(tuple(sorted(x)) for x in ins),
                tuple(tuple(sorted(x)) for x in outs),
            )
        return cache[key]

    def _check_rank(self, i: int) -> None:
        if not 0 <= i < self.n:
            raise IndexError(f"peer {i} is out of range 0..{self.n - 1}")

    def in_neighbors(self, i: int, k: int = 0) -> tuple[int, ...]:
        """Return the sorted peers whose vector peer ``i`` receives at iteration ``k``."""
        self._check_rank(i)
        return self._lists(k)[0][i]

    def out_neighbors(self, i: int, k: int = 0) -> tuple[int, ...]:
        """Return the sorted peers that receive peer ``i``'s vector at iteration ``k``."""
        self._check_rank(i)
        return self._lists(k)[1][i]

    @property
    def is_undirected(self) -> bool:
        """True if the edge set is symmetric at every iteration of the period."""
        return all(
            all((dst, src) in edges for src, dst in edges)
            for edges in (self.schedule or (self.edges,))
        )

    def is_connected(self) -> bool:
        """True if the (union over a period of the) graph is strongly connected."""
        return not unreachable_peers(self.n, self.edges)


def unreachable_peers(n: int, edges: Iterable[Edge]) -> tuple[int, ...]:
    """Return the peers not strongly connected to peer 0 (empty iff strongly connected).

    Args:
        n: number of peers.
        edges: directed edges ``(src, dst)``.

    Returns:
        Sorted peers that peer 0 cannot reach or that cannot reach peer 0.
    """
    forward: list[list[int]] = [[] for _ in range(n)]
    backward: list[list[int]] = [[] for _ in range(n)]
    for src, dst in edges:
        forward[src].append(dst)
        backward[dst].append(src)

    def reach(adjacency: list[list[int]]) -> set[int]:
        seen, stack = {0}, [0]
        while stack:
            for nxt in adjacency[stack.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return seen

    both = reach(forward) & reach(backward)
    return tuple(i for i in range(n) if i not in both)


def _check_edges(name: str, n: int, edges: Iterable[Edge]) -> None:
    for edge in edges:
        src, dst = edge
        if not (0 <= src < n and 0 <= dst < n):
            raise ValueError(f"graph {name!r}: edge {edge} names a peer outside 0..{n - 1}")
        if src == dst:
            raise ValueError(f"graph {name!r}: self loop {edge} (self weights are implicit)")


def _require_int(what: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")
    return int(value)


def _symmetric(edges: Iterable[Edge]) -> frozenset[Edge]:
    edges = set(edges)
    return frozenset(edges | {(dst, src) for src, dst in edges})


def _offsets(n: int) -> list[int]:
    """Powers of two below ``n``: 1, 2, 4, ..."""
    return [2**t for t in range(max(1, math.ceil(math.log2(n))))] if n > 1 else []


def ring(n: int) -> Graph:
    """Undirected ring: peer ``i`` exchanges with ``i - 1`` and ``i + 1`` (mod n)."""
    n = _require_int("ring: n", n, 1)
    edges = {(i, (i + 1) % n) for i in range(n) if (i + 1) % n != i}
    return Graph("ring", n, _symmetric(edges))


def star(n: int, center: int = 0) -> Graph:
    """Undirected star: every peer exchanges with ``center`` only."""
    n = _require_int("star: n", n, 1)
    center = _require_int("star: center", center, 0)
    if center >= n:
        raise ValueError(f"star: center must be in 0..{n - 1}, got {center}")
    edges = {(center, i) for i in range(n) if i != center}
    return Graph("star", n, _symmetric(edges), params={"center": center})


def _grid_shape(kind: str, n: int, rows: int | None) -> tuple[int, int]:
    if rows is None:
        rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
    rows = _require_int(f"{kind}: rows", rows, 1)
    if n % rows:
        raise ValueError(f"{kind}: rows={rows} does not divide n={n} (rows * cols must equal n)")
    return rows, n // rows


def grid(n: int, rows: int | None = None) -> Graph:
    """Undirected 2D mesh of ``rows x cols`` peers (no wrap-around); rank = r * cols + c.

    Args:
        n: number of peers.
        rows: number of rows; must divide ``n``. Defaults to the most square factorisation.
    """
    n = _require_int("grid: n", n, 1)
    rows, cols = _grid_shape("grid", n, rows)
    edges = set()
    for r in range(rows):
        for c in range(cols):
            if c + 1 < cols:
                edges.add((r * cols + c, r * cols + c + 1))
            if r + 1 < rows:
                edges.add((r * cols + c, (r + 1) * cols + c))
    return Graph("grid", n, _symmetric(edges), params={"rows": rows})


def torus(n: int, rows: int | None = None) -> Graph:
    """Undirected 2D torus (mesh with wrap-around): up to 4 neighbours per peer.

    Args:
        n: number of peers.
        rows: number of rows; must divide ``n``. Defaults to the most square factorisation.
    """
    n = _require_int("torus: n", n, 1)
    rows, cols = _grid_shape("torus", n, rows)
    edges = set()
    for r in range(rows):
        for c in range(cols):
            me = r * cols + c
            for other in (r * cols + (c + 1) % cols, ((r + 1) % rows) * cols + c):
                if other != me:
                    edges.add((me, other))
    return Graph("torus", n, _symmetric(edges), params={"rows": rows})


def exponential(n: int, symmetric: bool = True) -> Graph:
    """Static exponential graph: peer ``i`` sends to ``i + 2^t`` (mod n) for every ``2^t < n``.

    Args:
        n: number of peers.
        symmetric: if True (default) also add the reverse edges (an undirected graph, so
            Metropolis-Hastings weights are symmetric); if False, the directed BlueFog-style
            graph named ``directed-exponential``.
    """
    n = _require_int("exponential: n", n, 1)
    if not isinstance(symmetric, bool):
        raise ValueError(f"exponential: symmetric must be true or false, got {symmetric!r}")
    edges = {(i, (i + o) % n) for i in range(n) for o in _offsets(n) if o % n}
    if symmetric:
        return Graph("exponential", n, _symmetric(edges))
    return Graph("directed-exponential", n, frozenset(edges))


def one_peer_exponential(n: int) -> Graph:
    """Time-varying one-peer exponential graph, period ``ceil(log2 n)``.

    At iteration ``k`` peer ``i`` sends to ``i + 2^(k mod period)`` and receives from
    ``i - 2^(k mod period)`` (mod n): one message per peer per iteration. With uniform weights
    each ``W^(k) = (I + P^(2^t)) / 2`` and, for ``n`` a power of two, the product over one period
    is exactly the global average.
    """
    n = _require_int("one-peer-exponential: n", n, 1)
    offsets = _offsets(n)
    if not offsets:  # a single peer: nothing to exchange
        return Graph("one-peer-exponential", n, frozenset())
    schedule = tuple(frozenset((i, (i + o) % n) for i in range(n)) for o in offsets)
    return Graph(
        "one-peer-exponential",
        n,
        frozenset().union(*schedule),
        time_varying=True,
        period=len(schedule),
        schedule=schedule,
    )


def hypercube(n: int) -> Graph:
    """Undirected hypercube: peers ``i`` and ``i XOR 2^t`` are neighbours; ``n`` a power of 2."""
    n = _require_int("hypercube: n", n, 1)
    if n & (n - 1):
        raise ValueError(f"hypercube: n must be a power of two, got {n}")
    edges = {(i, i ^ (1 << t)) for i in range(n) for t in range(n.bit_length() - 1)}
    return Graph("hypercube", n, frozenset(edges))


def fully_connected(n: int) -> Graph:
    """Complete graph: every peer exchanges with every other peer."""
    n = _require_int("full: n", n, 1)
    return Graph("full", n, frozenset((i, j) for i in range(n) for j in range(n) if i != j))


def _random_regular_attempt(n: int, degree: int, rng: np.random.Generator) -> set[Edge] | None:
    # Steger-Wormald pairing: pair free stubs at random, keep the valid pairs, re-pair the rest.
    edges: set[Edge] = set()
    stubs = [i for i in range(n) for _ in range(degree)]
    while stubs:
        leftover: dict[int, int] = {}
        order = rng.permutation(len(stubs))
        shuffled = [stubs[t] for t in order]
        for a, b in zip(shuffled[::2], shuffled[1::2], strict=True):
            a, b = min(a, b), max(a, b)
            if a != b and (a, b) not in edges:
                edges.add((a, b))
            else:
                leftover[a] = leftover.get(a, 0) + 1
                leftover[b] = leftover.get(b, 0) + 1
        nodes = sorted(leftover)
        if not any(u != v and (min(u, v), max(u, v)) not in edges for u in nodes for v in nodes):
            return None if leftover else edges
        stubs = [node for node in nodes for _ in range(leftover[node])]
    return edges


def random_regular(n: int, degree: int, seed: int = 0) -> Graph:
    """Connected random ``degree``-regular undirected graph, deterministic for a given seed.

    Args:
        n: number of peers.
        degree: neighbours per peer; ``1 <= degree < n``, ``n * degree`` even, and at least 2
            when ``n > 2`` (a 1-regular graph on more than two peers is disconnected).
        seed: random seed.
    """
    n = _require_int("random-regular: n", n, 2)
    degree = _require_int("random-regular: degree", degree, 1)
    seed = _require_int("random-regular: seed", seed, 0)
    if degree >= n:
        raise ValueError(f"random-regular: degree must be < n={n}, got {degree}")
    if (n * degree) % 2:
        raise ValueError(f"random-regular: n * degree must be even, got {n} * {degree}")
    if degree == 1 and n > 2:
        raise ValueError(f"random-regular: degree 1 cannot connect {n} peers; use degree >= 2")
    rng = np.random.default_rng(seed)
    for _ in range(_MAX_RANDOM_ATTEMPTS):
        edges = _random_regular_attempt(n, degree, rng)
        if edges is not None and not unreachable_peers(n, _symmetric(edges)):
            params = {"degree": degree, "seed": seed}
            return Graph("random-regular", n, _symmetric(edges), params=params)
    raise ValueError(  # pragma: no cover - needs pathological arguments
        f"random-regular: no connected {degree}-regular graph on {n} peers found "
        f"in {_MAX_RANDOM_ATTEMPTS} attempts (seed {seed})"
    )


def erdos_renyi(n: int, p: float, seed: int = 0) -> Graph:
    """Connected Erdos-Renyi G(n, p) undirected graph, deterministic for a given seed.

    Samples with ``numpy.random.default_rng([seed, attempt])`` for attempt 0, 1, ... until the
    graph is connected.

    Args:
        n: number of peers.
        p: probability of each undirected edge, ``0 < p <= 1``.
        seed: random seed.

    Raises:
        ValueError: if no connected graph was drawn in 100 attempts (``p`` too small).
    """
    n = _require_int("erdos-renyi: n", n, 1)
    seed = _require_int("erdos-renyi: seed", seed, 0)
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p <= 1:
        raise ValueError(f"erdos-renyi: p must be a number in (0, 1], got {p!r}")
    upper = [(i, j) for i in range(n) for j in range(i + 1, n)]
    for attempt in range(_MAX_RANDOM_ATTEMPTS):
        rng = np.random.default_rng([seed, attempt])
        keep = rng.random(len(upper)) < p
        edges = _symmetric(e for e, k in zip(upper, keep, strict=True) if k)
        if not unreachable_peers(n, edges):
            return Graph("erdos-renyi", n, edges, params={"p": float(p), "seed": seed})
    raise ValueError(
        f"erdos-renyi: no connected graph with n={n}, p={p} in {_MAX_RANDOM_ATTEMPTS} "
        f"attempts (seed {seed}); increase p (about log(n)/n is the connectivity threshold)"
    )


def from_edges(n: int, edges: Iterable[Any], directed: bool = False) -> Graph:
    """Graph from an explicit edge list.

    Args:
        n: number of peers.
        edges: pairs ``(src, dst)``; ``dst`` receives ``src``'s vector. Duplicates are ignored.
        directed: if False (default) every edge is used in both directions.
    """
    n = _require_int("explicit: n", n, 1)
    if not isinstance(directed, bool):
        raise ValueError(f"explicit: directed must be true or false, got {directed!r}")
    pairs = set()
    for index, edge in enumerate(edges):
        if isinstance(edge, str | bytes) or not hasattr(edge, "__len__") or len(edge) != 2:
            raise ValueError(f"explicit: edge {index} must be a pair [src, dst], got {edge!r}")
        src = _require_int(f"explicit: edge {index} source", edge[0], 0)
        dst = _require_int(f"explicit: edge {index} destination", edge[1], 0)
        if src >= n or dst >= n:
            raise ValueError(
                f"explicit: edge {index} {[src, dst]} names peer {max(src, dst)} "
                f"but there are only {n} peers (0..{n - 1})"
            )
        if src == dst:
            raise ValueError(f"explicit: edge {index} {[src, dst]} is a self loop")
        pairs.add((src, dst))
    edge_set = frozenset(pairs) if directed else _symmetric(pairs)
    params = {"edges": [list(e) for e in sorted(pairs)], "directed": directed}
    return Graph("explicit", n, edge_set, params=params)


_CONSTRUCTORS: dict[str, Callable[..., Graph]] = {
    "ring": ring,
    "star": star,
    "grid": grid,
    "torus": torus,
    "exponential": exponential,
    "directed-exponential": lambda n: exponential(n, symmetric=False),
    "one-peer-exponential": one_peer_exponential,
    "hypercube": hypercube,
    "full": fully_connected,
    "random-regular": random_regular,
    "erdos-renyi": erdos_renyi,
    "explicit": from_edges,
}

# Parameters each graph accepts besides ``n`` (used for error messages and the CLI).
GRAPH_PARAMS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "ring": (),
        "star": ("center",),
        "grid": ("rows",),
        "torus": ("rows",),
        "exponential": ("symmetric",),
        "directed-exponential": (),
        "one-peer-exponential": (),
        "hypercube": (),
        "full": (),
        "random-regular": ("degree", "seed"),
        "erdos-renyi": ("p", "seed"),
        "explicit": ("edges", "directed"),
    }
)

GRAPH_NAMES: tuple[str, ...] = tuple(_CONSTRUCTORS)
GRAPH_ALIASES: Mapping[str, str] = MappingProxyType(
    {"exp": "exponential", "fully-connected": "full", "mesh": "grid"}
)


def canonical_graph_name(name: str) -> str:
    """Resolve aliases (``exp``, ``fully-connected``, ``mesh``) to a name in GRAPH_NAMES.

    Raises:
        ValueError: unknown name; the message lists the known names and a close match.
    """
    key = str(name).strip().lower().replace("_", "-")
    key = GRAPH_ALIASES.get(key, key)
    if key in _CONSTRUCTORS:
        return key
    known = (*GRAPH_NAMES, *GRAPH_ALIASES)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(f"unknown graph {name!r} ({hint}known: {', '.join(GRAPH_NAMES)})")


def make_graph(name: str, n: int, **params: Any) -> Graph:
    """Build a graph by registry name.

    Args:
        name: one of :data:`GRAPH_NAMES` or an alias (``exp``, ``fully-connected``, ``mesh``).
        n: number of peers.
        **params: constructor parameters (see :data:`GRAPH_PARAMS`), e.g. ``rows=2``.

    Returns:
        The graph.

    Raises:
        ValueError: unknown graph name, unknown parameter, or invalid value.
    """
    key = canonical_graph_name(name)
    unknown = sorted(set(params) - set(GRAPH_PARAMS[key]))
    if unknown:
        accepted = ", ".join(GRAPH_PARAMS[key]) or "none"
        raise ValueError(
            f"graph {key!r} does not take parameter(s) {', '.join(unknown)} (accepted: {accepted})"
        )
    if key == "explicit" and "edges" not in params:
        raise ValueError("graph 'explicit' needs an 'edges' list of [src, dst] pairs")
    return _CONSTRUCTORS[key](n, **params)
