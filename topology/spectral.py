"""Spectral quantities of mixing matrices: how fast partial averaging reaches consensus.

For a doubly stochastic ``W``, the disagreement ``x - xbar`` shrinks per partial average by at
most ``rho = ||W - 11^T/n||_2`` (the largest singular value of ``W - J``; for a symmetric ``W``
this is the second-largest eigenvalue in absolute value). ``1 - rho`` is the spectral gap that
appears in every decentralized convergence bound (``docs/algorithms.md``).

Time-varying topologies are judged over a full period: ``||W^(T-1) ... W^(0) - J||_2``; the
per-iteration equivalent is that value to the power ``1 / T``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)

# Rates within this of 0 or 1 are rounding noise (an exact average such as the fully connected
# graph, or a matrix that does not mix at all); they are snapped to exactly 0 or 1 so that
# displays and comparisons are clean.
NOISE_FLOOR = 1e-12


def _averaging(n: int) -> np.ndarray:
    return np.full((n, n), 1.0 / n)


def _as_square(W: np.ndarray) -> np.ndarray:
    W = np.asarray(W, dtype=np.float64)
    if W.ndim != 2 or W.shape[0] != W.shape[1] or W.shape[0] == 0:
        raise ValueError(f"expected a square n x n matrix, got shape {W.shape}")
    return W


def _norm_to_average(M: np.ndarray) -> float:
    rho = float(np.linalg.norm(M - _averaging(M.shape[0]), 2))
    if rho < NOISE_FLOOR:
        return 0.0
    return 1.0 if abs(rho - 1.0) < NOISE_FLOOR else rho


def consensus_rate(W: np.ndarray) -> float:
    """Consensus rate ``rho = ||W - 11^T/n||_2`` of one mixing matrix.

    Args:
        W: ``[n, n]`` mixing matrix (doubly stochastic for the value to be meaningful).

    Returns:
        ``rho`` (0 for exact averaging, close to 1 for slowly mixing graphs such as large rings).
    """
    return _norm_to_average(_as_square(W))


def spectral_gap(W: np.ndarray) -> float:
    """Spectral gap ``1 - rho`` of one mixing matrix (see :func:`consensus_rate`)."""
    return 1.0 - consensus_rate(W)


def period_product(matrices: Sequence[np.ndarray]) -> np.ndarray:
    """Return ``W^(T-1) @ ... @ W^(0)``: the effect of applying the matrices in order."""
    if not matrices:
        raise ValueError("need at least one mixing matrix")
    product = _as_square(matrices[0]).copy()
    for W in matrices[1:]:
        W = _as_square(W)
        if W.shape != product.shape:
            raise ValueError(f"matrix shapes differ: {W.shape} vs {product.shape}")
        product = W @ product
    return product


def period_consensus_rate(matrices: Sequence[np.ndarray]) -> float:
    """Consensus rate of a time-varying period: ``||W^(T-1) ... W^(0) - 11^T/n||_2``.

    The per-iteration-equivalent rate is ``period_consensus_rate(ms) ** (1 / len(ms))``
    (see :func:`per_iteration_rate`). For the one-peer exponential graph with ``n = 2^m`` and
    uniform weights the product is exactly the average, so the rate is 0.

    Args:
        matrices: the mixing matrices of one period, in iteration order.

    Returns:
        The rate of the whole period.
    """
    return _norm_to_average(period_product(matrices))


def per_iteration_rate(matrices: Sequence[np.ndarray]) -> float:
    """Per-iteration equivalent of a period's rate: ``period_consensus_rate ** (1 / T)``."""
    return period_consensus_rate(matrices) ** (1.0 / len(matrices))


def iterations_to_consensus(rho: float, tolerance: float = 1e-3) -> float:
    """Iterations of partial averaging to shrink disagreement by ``tolerance`` (``rho^t <= tol``).

    Args:
        rho: per-iteration consensus rate in ``[0, 1]``.
        tolerance: target reduction factor in ``(0, 1)``.

    Returns:
        ``log(tol) / log(rho)`` (1 if ``rho == 0``; ``inf`` if ``rho >= 1``).
    """
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be in (0, 1), got {tolerance}")
    if rho <= 0:
        return 1.0
    if rho >= 1:
        return float("inf")
    return float(np.log(tolerance) / np.log(rho))
