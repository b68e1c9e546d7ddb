"""Mixing weights: turn a :class:`~topology.graphs.Graph` into a mixing matrix ``W``.

Convention used everywhere in the project: one partial average is
``x_i <- sum_j W[i, j] x_j``, so row ``i`` holds the weights peer ``i`` applies, and
``W[i, j] > 0`` only if ``(j, i)`` is an edge (``j`` sends to ``i``) or ``j == i``.

Schemes:

* ``uniform`` (:func:`uniform_neighbor_weights`): the BlueFog default, ``1 / (in-degree + 1)``
  for each in-neighbour and for self. Row stochastic always; doubly stochastic on regular
  graphs (ring, torus, exponential, one-peer exponential, hypercube, full).
* ``metropolis`` (:func:`metropolis_hastings_weights`): symmetric and doubly stochastic on any
  undirected graph; undefined for directed graphs.
* ``explicit`` (:func:`explicit_weights`): a user-given matrix, validated.

``auto`` (:func:`resolve_weight_scheme`) picks ``metropolis`` for undirected graphs and
``uniform`` otherwise (directed and time-varying graphs, where Metropolis-Hastings is undefined).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from topology.checks import TopologyError, check_mixing_matrix
from topology.graphs import Graph

logger = logging.getLogger(__name__)

WEIGHT_SCHEMES: tuple[str, ...] = ("auto", "uniform", "metropolis", "explicit")
_ALIASES = {"metropolis-hastings": "metropolis", "mh": "metropolis", "bluefog": "uniform"}


def resolve_weight_scheme(scheme: str, graph: Graph) -> str:
    """Resolve ``auto`` and aliases to ``uniform``, ``metropolis`` or ``explicit``.

    Args:
        scheme: one of :data:`WEIGHT_SCHEMES` (or ``mh`` / ``metropolis-hastings``).
        graph: the graph the weights are for (``auto`` depends on it).

    Returns:
        The concrete scheme name.

    Raises:
        ValueError: unknown scheme.
    """
    key = str(scheme).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in WEIGHT_SCHEMES:
        raise ValueError(f"unknown weight scheme {scheme!r} (known: {', '.join(WEIGHT_SCHEMES)})")
    if key == "auto":
        return "metropolis" if graph.is_undirected else "uniform"
    return key


def uniform_neighbor_weights(graph: Graph, k: int = 0) -> np.ndarray:
    """BlueFog-style weights: ``W[i, j] = 1 / (indeg_i + 1)`` for ``j`` in N_in(i) and ``i``.

    For the one-peer exponential graph this gives ``W = (I + P_shift) / 2``: doubly stochastic
    (not symmetric), and for ``n = 2^m`` the product over a period is exactly ``11^T / n``.

    Args:
        graph: the communication graph.
        k: iteration (matters for time-varying graphs).

    Returns:
        float64 array of shape ``[n, n]``.
    """
    W = np.zeros((graph.n, graph.n))
    for i in range(graph.n):
        neighbors = graph.in_neighbors(i, k)
        weight = 1.0 / (len(neighbors) + 1)
        W[i, i] = weight
        W[i, list(neighbors)] = weight
    return W


def metropolis_hastings_weights(graph: Graph, k: int = 0) -> np.ndarray:
    """Metropolis-Hastings weights: ``w_ij = 1 / (1 + max(d_i, d_j))`` on edges.

    The self weight is ``1 - sum_{j != i} w_ij``. Symmetric and doubly stochastic for any
    undirected graph.

    Args:
        graph: an undirected graph (symmetric edge set at iteration ``k``).
        k: iteration (matters for time-varying graphs).

    Returns:
        float64 array of shape ``[n, n]``.

    Raises:
        TopologyError: the edge set at iteration ``k`` is not symmetric.
    """
    edges = graph.edges_at(k)
    for src, dst in sorted(edges):
        if (dst, src) not in edges:
            raise TopologyError(
                f"Metropolis-Hastings weights need an undirected graph, but graph "
                f"{graph.name!r} has edge {(src, dst)} without {(dst, src)} at iteration {k}; "
                f"use weights 'uniform' instead"
            )
    degree = [len(graph.in_neighbors(i, k)) for i in range(graph.n)]
    W = np.zeros((graph.n, graph.n))
    for src, dst in edges:
        W[dst, src] = 1.0 / (1 + max(degree[src], degree[dst]))
    np.fill_diagonal(W, 1.0 - W.sum(axis=1))
    return W


def explicit_weights(
    matrix: Sequence[Sequence[float]] | np.ndarray,
    graph: Graph | None = None,
    *,
    require_symmetric: bool | str = "warn",
) -> np.ndarray:
    """Validate a user-given mixing matrix and return it as a float64 array.

    Args:
        matrix: an ``n x n`` nested sequence or array, ``W[i, j]`` = weight peer ``i`` gives to
            peer ``j``'s vector.
        graph: if given, the support of ``W`` must match the graph's edges.
        require_symmetric: symmetry policy, see :func:`topology.checks.check_mixing_matrix`.

    Returns:
        A new float64 array of shape ``[n, n]``.

    Raises:
        TopologyError: not a square numeric matrix, or any check fails.
    """
    try:
        W = np.array(matrix, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TopologyError(f"mixing matrix is not a numeric n x n matrix: {exc}") from None
    if graph is not None and graph.time_varying:
        raise TopologyError(
            f"explicit weights need a static graph, but {graph.name!r} is time-varying"
        )
    check_mixing_matrix(W, graph, require_symmetric=require_symmetric)
    return W


def weights_for(scheme: str, graph: Graph, k: int = 0, matrix: Any = None) -> np.ndarray:
    """Mixing matrix of ``graph`` at iteration ``k`` under a concrete or ``auto`` scheme.

    Args:
        scheme: ``auto``, ``uniform``, ``metropolis`` or ``explicit``.
        graph: the graph.
        k: iteration.
        matrix: the matrix for the ``explicit`` scheme (unvalidated here).

    Returns:
        float64 array of shape ``[n, n]``.
    """
    resolved = resolve_weight_scheme(scheme, graph)
    if resolved == "uniform":
        return uniform_neighbor_weights(graph, k)
    if resolved == "metropolis":
        return metropolis_hastings_weights(graph, k)
    if matrix is None:
        raise TopologyError("weights 'explicit' need a matrix")
    return np.array(matrix, dtype=np.float64)
