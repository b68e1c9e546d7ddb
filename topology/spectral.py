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


def momentum_consensus_growth(matrices: Sequence[np.ndarray], beta: float) -> float:
    """Per-iteration growth of disagreement under DecentLaM's recursion, at any learning rate.

    DecentLaM's closed form is ``x^{k+1} = W^(k) (x^k - gamma g^k) + beta (x^k - x^{k-1})``: the
    momentum carries the *mixing* step, not only the gradient. Without gradients the
    disagreement ``e = (I - J) x`` follows the linear recursion::

        e^{k+1} = (W^(k) + beta I) e^k - beta e^{k-1}

    This function returns the spectral radius of the product of its ``2(n-1) x 2(n-1)``
    companion matrices over one period (on an orthonormal basis of ``1^perp``), to the power
    ``1 / period``. Above 1 the disagreement grows geometrically and no learning rate saves the
    run (a small ``gamma`` only adds a slight contraction of order ``gamma * curvature``).

    For a static symmetric ``W`` the value is below 1 for every ``beta < 1`` (each eigenvalue
    ``lambda`` of ``W`` gives the roots of ``z^2 - (lambda + beta) z + beta``, inside the unit
    circle for ``-1 - 2 beta < lambda < 1``). A time-varying graph can break this: with the
    one-peer exponential graph a disagreement mode is removed at one iteration (``lambda = 0``)
    and left alone at the next (``lambda = 1``), so the velocity of the first keeps pushing it
    past consensus; non-symmetric matrices (complex ``lambda``) do the same. DmSGD keeps the
    mixing out of its momentum (its modes have the roots ``lambda`` and ``beta``) and is not
    affected.

    Args:
        matrices: the mixing matrices of one period, in iteration order (a global-average
            iteration is the matrix ``11^T / n``).
        beta: the momentum, in ``[0, 1)``.

    Returns:
        The per-iteration growth factor (``< 1``: the disagreement decays).
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    if not matrices:
        raise ValueError("need at least one mixing matrix")
    n = _as_square(matrices[0]).shape[0]
    if n == 1:
        return 0.0
    # Orthonormal basis of the vectors orthogonal to the all-ones vector.
    basis = np.linalg.qr(np.column_stack([np.ones(n), np.eye(n)[:, : n - 1]]))[0][:, 1:]
    m = n - 1
    identity = np.eye(m)
    product = np.eye(2 * m)
    for W in matrices:
        W = _as_square(W)
        if W.shape != (n, n):
            raise ValueError(f"matrix shapes differ: {W.shape} vs {(n, n)}")
        reduced = basis.T @ W @ basis
        step = np.block([[reduced + beta * identity, -beta * identity], [identity, 0 * identity]])
        product = step @ product
    radius = float(np.max(np.abs(np.linalg.eigvals(product))))
    return radius ** (1.0 / len(matrices))


def max_stable_momentum(
    matrices: Sequence[np.ndarray], upper: float = 0.999, tolerance: float = 1e-3
) -> float:
    """The largest momentum in ``[0, upper]`` with :func:`momentum_consensus_growth` below 1.

    Found by bisection (the growth increases with ``beta`` on the graphs in this project; the
    result is checked, and the search falls back to a grid scan if the check fails).

    Args:
        matrices: the mixing matrices of one period, in iteration order.
        upper: the largest momentum considered.
        tolerance: width of the final bisection interval.

    Returns:
        The largest stable momentum found, rounded down to ``tolerance``; 0 if even
        ``beta = 0`` does not contract (a graph that does not mix).
    """

    def stable(beta: float) -> bool:
        return momentum_consensus_growth(matrices, beta) < 1.0 - 1e-9

    if stable(upper):
        return upper
    if not stable(0.0):
        return 0.0
    low, high = 0.0, upper
    while high - low > tolerance:
        middle = (low + high) / 2
        if stable(middle):
            low = middle
        else:
            high = middle
    if not stable(low):  # not monotone here: scan instead
        grid = [b for b in np.arange(0.0, upper, tolerance) if stable(float(b))]
        low = float(grid[-1]) if grid else 0.0
    return float(np.floor(low / tolerance) * tolerance)
