"""Validation of mixing matrices: the properties every algorithm in the project relies on.

:func:`check_mixing_matrix` verifies, in order: shape and finiteness, nonnegativity, rows and
columns summing to 1 (doubly stochastic), symmetry (by policy), that the support matches the
graph's edges at the iteration, and connectivity. Every failure raises :class:`TopologyError`
with a message naming the offending row, column or entry and its value.

Symmetry policy: DecentLaM's convergence theory (and DSGD's, DmSGD's...) assumes a symmetric,
doubly stochastic ``W``. Some useful matrices are doubly stochastic but not symmetric, notably
the one-peer exponential graph's ``(I + P) / 2``; they still preserve the average and work well
in practice, so by default (``require_symmetric="warn"``) they are accepted with a logged
warning. ``"error"`` rejects them; ``False`` skips the check silently.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from topology.graphs import unreachable_peers

if TYPE_CHECKING:
    from topology.graphs import Graph

logger = logging.getLogger(__name__)

SYMMETRY_POLICIES: tuple[str | bool, ...] = ("warn", "error", False)


class TopologyError(ValueError):
    """A graph or mixing matrix that violates a requirement; the message says which and where."""


def _symmetry_policy(require_symmetric: bool | str) -> str | bool:
    if require_symmetric is True:
        return "error"
    if require_symmetric in SYMMETRY_POLICIES:
        return require_symmetric
    raise ValueError(
        f"require_symmetric must be 'warn', 'error' or False, got {require_symmetric!r}"
    )


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def check_mixing_matrix(
    W: np.ndarray,
    graph: Graph | None = None,
    k: int = 0,
    *,
    require_symmetric: bool | str = "warn",
    tol: float = 1e-9,
) -> None:
    """Check that ``W`` is a valid mixing matrix (for ``graph`` at iteration ``k``).

    Args:
        W: the ``[n, n]`` matrix, ``x_i <- sum_j W[i, j] x_j``.
        graph: if given, ``W`` must have ``graph.n`` rows, positive weight on exactly the edges
            ``edges_at(k)`` (``W[i, j] > 0`` iff ``(j, i)`` is an edge, besides the diagonal) and
            the graph (union over a period) must be strongly connected. Without a graph, the
            support of ``W`` itself must be strongly connected.
        k: iteration, for time-varying graphs.
        require_symmetric: ``"error"`` (or True) raises on a non-symmetric ``W``; ``"warn"``
            (default) logs a warning; False skips the check.
        tol: absolute tolerance for the row/column sums and symmetry.

    Raises:
        TopologyError: the first violated property, with the offending entry and value.
    """
    policy = _symmetry_policy(require_symmetric)
    W = np.asarray(W)
    if W.ndim != 2 or W.shape[0] != W.shape[1] or W.shape[0] == 0:
        raise TopologyError(f"mixing matrix must be square n x n, got shape {W.shape}")
    n = W.shape[0]
    if graph is not None and graph.n != n:
        raise TopologyError(
            f"mixing matrix is {n} x {n} but graph {graph.name!r} has {graph.n} peers"
        )
    if not np.all(np.isfinite(W)):
        i, j = np.argwhere(~np.isfinite(W))[0]
        raise TopologyError(f"W[{i}, {j}] = {W[i, j]} is not finite")
    if np.any(W < 0):
        i, j = np.argwhere(W < 0)[0]
        raise TopologyError(f"W[{i}, {j}] = {_fmt(W[i, j])} is negative (weights must be >= 0)")
    for axis, what in ((1, "row"), (0, "column")):
        sums = W.sum(axis=axis)
        bad = np.flatnonzero(np.abs(sums - 1.0) > tol)
        if bad.size:
            index = int(bad[0])
            raise TopologyError(
                f"{what} {index} sums to {sums[index]:.12g}, expected 1 (tolerance {tol:g}); "
                f"W must be doubly stochastic"
            )
    if policy is not False:
        asym = np.abs(W - W.T)
        if np.any(asym > tol):
            i, j = np.unravel_index(int(np.argmax(asym)), asym.shape)
            message = (
                f"mixing matrix is not symmetric: W[{i}, {j}] = {_fmt(W[i, j])} but "
                f"W[{j}, {i}] = {_fmt(W[j, i])}"
                + (f" (graph {graph.name!r}, iteration {k})" if graph is not None else "")
            )
            if policy == "error":
                raise TopologyError(message)
            logger.warning("%s; DecentLaM's theory assumes a symmetric W", message)
    if graph is not None:
        _check_support(W, graph, k)
        missing = unreachable_peers(n, graph.edges)
        where = f"graph {graph.name!r}" + (" (union over a period)" if graph.time_varying else "")
    else:
        support = {(int(j), int(i)) for i, j in np.argwhere(W > 0) if i != j}
        missing = unreachable_peers(n, support)
        where = "the support of W"
    if missing:
        raise TopologyError(
            f"{where} is not strongly connected: peer(s) {_short(missing)} cannot exchange "
            f"with peer 0 in both directions"
        )


def _check_support(W: np.ndarray, graph: Graph, k: int) -> None:
    # The diagonal may be zero (e.g. W = [[0, 1], [1, 0]]): only off-diagonal support matters.
    edges = graph.edges_at(k)
    for i, j in np.argwhere(W > 0):
        if i != j and (int(j), int(i)) not in edges:
            raise TopologyError(
                f"W[{i}, {j}] = {_fmt(W[i, j])} but {j} -> {i} is not an edge of graph "
                f"{graph.name!r} at iteration {k} (peer {i} does not receive from peer {j})"
            )
    for src, dst in sorted(edges):
        if W[dst, src] <= 0:
            raise TopologyError(
                f"edge {src} -> {dst} of graph {graph.name!r} has zero weight W[{dst}, {src}]; "
                f"every edge needs a positive weight"
            )


def _short(items: tuple[int, ...], limit: int = 10) -> str:
    shown = ", ".join(str(x) for x in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")
