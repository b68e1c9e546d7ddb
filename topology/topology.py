"""The :class:`Topology` object: a graph plus a weight scheme, as peers and simulators use it.

A peer asks its :meth:`Topology.view` at each step: its own weight, the weights of the
neighbours it must fetch from, and the neighbours that will fetch from it. Simulators ask for
the full :meth:`Topology.mixing_matrix`. Both come from the same cached matrices, so the real
peers and the in-process simulator mix with exactly the same numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from topology import spectral
from topology.checks import check_mixing_matrix
from topology.graphs import Graph, make_graph
from topology.mixing import explicit_weights, resolve_weight_scheme, weights_for

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeerView:
    """What one peer needs to know about the topology at one step.

    Attributes:
        rank: the peer.
        step: the iteration ``k`` this view is for.
        self_weight: ``W[rank, rank]``.
        in_neighbors: ``j -> W[rank, j]`` for every ``j != rank`` with a positive weight, sorted
            by ``j``: the peers whose vectors this peer fetches and averages.
        out_neighbors: peers ``i != rank`` with ``W[i, rank] > 0``: who reads my vector.
    """

    rank: int
    step: int
    self_weight: float
    in_neighbors: Mapping[int, float]
    out_neighbors: tuple[int, ...]


class Topology:
    """A communication graph with mixing weights (one matrix per iteration of a period).

    Build it with :func:`make_topology` (validated) rather than directly.

    Attributes:
        graph: the communication graph.
        weights: the resolved scheme, ``"uniform"``, ``"metropolis"`` or ``"explicit"``.
    """

    def __init__(self, graph: Graph, weights: str = "auto", matrix: Any = None) -> None:
        """Create a topology (not validated; call :meth:`validate`).

        Args:
            graph: the communication graph.
            weights: ``auto`` (Metropolis-Hastings for undirected graphs, uniform otherwise),
                ``uniform``, ``metropolis`` or ``explicit``.
            matrix: the ``n x n`` matrix for ``explicit`` weights (static graphs only).
        """
        self.graph = graph
        self.weights = resolve_weight_scheme(weights, graph)
        if self.weights == "explicit":
            if matrix is None:
                raise ValueError("weights 'explicit' need an n x n matrix")
            matrix = explicit_weights(matrix, graph, require_symmetric=False)
        elif matrix is not None:
            raise ValueError(f"a matrix is only used with weights 'explicit', not {weights!r}")
        self._explicit = matrix
        self._matrices: dict[int, np.ndarray] = {}
        self._views: dict[tuple[int, int], PeerView] = {}

    def __repr__(self) -> str:
        return f"Topology(graph={self.graph.name!r}, n={self.n}, weights={self.weights!r})"

    @property
    def n(self) -> int:
        """Number of peers."""
        return self.graph.n

    @property
    def is_time_varying(self) -> bool:
        """Whether the mixing matrix changes with the iteration."""
        return self.graph.time_varying

    @property
    def period(self) -> int:
        """Iterations before the matrices repeat (1 for a static topology)."""
        return self.graph.period

    def mixing_matrix(self, k: int = 0) -> np.ndarray:
        """Mixing matrix ``W^(k)``, ``x_i <- sum_j W[i, j] x_j``.

        Args:
            k: iteration (only ``k mod period`` matters).

        Returns:
            Read-only float64 array ``[n, n]``, cached per ``k mod period`` (copy it to modify).
        """
        key = k % self.period
        if key not in self._matrices:
            W = weights_for(self.weights, self.graph, key, self._explicit)
            W.setflags(write=False)
            self._matrices[key] = W
        return self._matrices[key]

    def mixing_matrices(self) -> list[np.ndarray]:
        """The mixing matrices of one period, in iteration order."""
        return [self.mixing_matrix(k) for k in range(self.period)]

    def view(self, rank: int, k: int = 0) -> PeerView:
        """Peer ``rank``'s view of the mixing step at iteration ``k``.

        Args:
            rank: the peer, ``0 <= rank < n``.
            k: iteration.

        Returns:
            A :class:`PeerView` consistent with :meth:`mixing_matrix` (row ``rank`` for the
            in-neighbours, column ``rank`` for the out-neighbours).
        """
        if not 0 <= rank < self.n:
            raise IndexError(f"rank {rank} is out of range 0..{self.n - 1}")
        key = (rank, k % self.period)
        if key not in self._views:
            W = self.mixing_matrix(k)
            row, col = W[rank], W[:, rank]
            ins = {int(j): float(row[j]) for j in np.flatnonzero(row > 0) if j != rank}
            outs = tuple(int(i) for i in np.flatnonzero(col > 0) if i != rank)
            self._views[key] = PeerView(
                rank=rank,
                step=k % self.period,
                self_weight=float(row[rank]),
                in_neighbors=MappingProxyType(ins),
                out_neighbors=outs,
            )
        view = self._views[key]
        return view if view.step == k else _with_step(view, k)

    def consensus_rate(self) -> float:
        """``rho`` of the static matrix, or of the whole period product if time-varying."""
        if self.is_time_varying:
            return spectral.period_consensus_rate(self.mixing_matrices())
        return spectral.consensus_rate(self.mixing_matrix(0))

    def spectral_gap(self) -> float:
        """``1 - consensus_rate()``."""
        return 1.0 - self.consensus_rate()

    def per_iteration_rate(self) -> float:
        """Per-iteration equivalent rate: ``consensus_rate() ** (1 / period)``."""
        return self.consensus_rate() ** (1.0 / self.period)

    def messages_per_peer(self, k: int = 0) -> dict[str, float]:
        """Vectors sent and received per peer at iteration ``k`` (one per edge of ``W``).

        Returns:
            ``{"max", "min", "mean"}`` of the messages sent (out-degree), ``"max_received"``,
            ``"min_received"``, ``"mean_received"`` (in-degree) and ``"total"`` (all messages).
        """
        W = self.mixing_matrix(k)
        off = (W > 0) & ~np.eye(self.n, dtype=bool)
        sent, received = off.sum(axis=0), off.sum(axis=1)
        return {
            "max": int(sent.max()),
            "min": int(sent.min()),
            "mean": float(sent.mean()),
            "max_received": int(received.max()),
            "min_received": int(received.min()),
            "mean_received": float(received.mean()),
            "total": int(off.sum()),
        }

    def validate(self, require_symmetric: bool | str = "warn") -> None:
        """Run every check of :func:`~topology.checks.check_mixing_matrix` on each matrix.

        Args:
            require_symmetric: ``"warn"`` (default), ``"error"`` or False.

        Raises:
            TopologyError: the first failed check.
        """
        # With "warn", check symmetry here so a time-varying topology logs one line, not one
        # per iteration of its period.
        per_matrix = False if require_symmetric == "warn" else require_symmetric
        for k in range(self.period):
            check_mixing_matrix(self.mixing_matrix(k), self.graph, k, require_symmetric=per_matrix)
        if require_symmetric == "warn":
            asymmetric = [
                k for k, W in enumerate(self.mixing_matrices()) if np.abs(W - W.T).max() > 1e-9
            ]
            if asymmetric:
                logger.warning(
                    "mixing matrix of %r (weights %s) is doubly stochastic but not symmetric "
                    "at iteration(s) %s of %d; DecentLaM's theory assumes a symmetric W",
                    self.graph.name,
                    self.weights,
                    ", ".join(map(str, asymmetric[:8])) + (", ..." if len(asymmetric) > 8 else ""),
                    self.period,
                )


def _with_step(view: PeerView, k: int) -> PeerView:
    return PeerView(view.rank, k, view.self_weight, view.in_neighbors, view.out_neighbors)


def make_topology(
    graph: str | Graph,
    n: int | None = None,
    weights: str | np.ndarray = "auto",
    *,
    require_symmetric: bool | str = "warn",
    **graph_params: Any,
) -> Topology:
    """Build and validate a topology.

    Args:
        graph: a :class:`Graph`, or a registry name (``ring``, ``exponential``, ...; see
            :data:`topology.graphs.GRAPH_NAMES`), in which case ``n`` is required.
        n: number of peers (must equal ``graph.n`` if a Graph is given).
        weights: ``"auto"`` (default: Metropolis-Hastings for undirected graphs, uniform for
            directed and time-varying ones), ``"uniform"``, ``"metropolis"``, or an ``n x n``
            array for explicit weights.
        require_symmetric: symmetry policy for validation (``"warn"``, ``"error"``, False).
        **graph_params: constructor parameters when ``graph`` is a name (e.g. ``rows=2``).

    Returns:
        A validated :class:`Topology`.

    Raises:
        ValueError: bad graph name or parameters. TopologyError (a ValueError): invalid weights.
    """
    if isinstance(graph, Graph):
        if graph_params:
            raise ValueError("graph parameters are only accepted with a graph name")
        if n is not None and n != graph.n:
            raise ValueError(f"n={n} does not match the graph's {graph.n} peers")
    else:
        if n is None:
            raise ValueError("n is required when the graph is given by name")
        graph = make_graph(graph, n, **graph_params)
    if isinstance(weights, str):
        topology = Topology(graph, weights)
    else:
        topology = Topology(graph, "explicit", matrix=weights)
    topology.validate(require_symmetric=require_symmetric)
    return topology
