"""Linear stability of DecentLaM under bounded staleness, and the coefficients that keep it stable.

The staleness-aware DecentLaM (docs/async-decentlam.md) writes the momentum update as::

    gt_i = (x_i - mixed_i) / gamma           # mixed_i: own fresh psi_i, neighbours' stale psi_j
    m_i <- beta' m_i + alpha gt_i
    x_i <- x_i - gamma m_i

which is DecentLaM for ``(alpha, beta') = (1, beta)``. ``alpha`` scales the corrected gradient
(consensus and gradient step together), so the fixed point ``x = W (x - gamma grad f(x))`` -- and
with it the absence of momentum-incurred bias -- does not depend on ``(alpha, beta')``.

The model: every neighbour vector arrives ``tau`` steps late, ``W = w0 I + A`` with ``A`` the
neighbour part, and no curvature (the consensus dynamics, which is where staleness bites). On an
eigenvector of ``A`` with eigenvalue ``a`` (``|a| <= 1 - w0`` since ``A`` is non-negative with row
sums ``1 - w0``) a scalar mode follows::

    x^{k+1} - x^k = beta' (x^k - x^{k-1}) - alpha (1 - w0) x^k + alpha a x^{k-tau}

with characteristic polynomial (multiplied by ``z`` so that one form covers ``tau = 0``)::

    p(z) = z^{tau+2} - (1 + beta' - alpha (1 - w0)) z^{tau+1} + beta' z^tau - alpha a z

The iteration is stable when every root of ``p`` lies strictly inside the unit circle for every
``w0`` and every ``a`` in ``[-(1 - w0), 1 - w0)`` (``a = 1 - w0`` is the consensus mode, whose root
at ``z = 1`` the gradient's curvature moves inside). :func:`stable_coefficients` picks, among the
stable pairs, the one with the largest effective step ``alpha / (1 - beta')`` (the speed of the
averaged model), using ``tau = ceil(T / 2)`` for a staleness bound ``T``: a peer behind mixes its
neighbours' vectors of its own step while they have moved on by up to ``T``, so the delay around
each edge is at most ``T``, split evenly in the uniform-delay model. The in-process delay model of
:mod:`peer.simulation.simulator` checks the choice on a real recursion.

This module imports only numpy and does no I/O.
"""

from __future__ import annotations

import functools
import logging
import math

import numpy as np

logger = logging.getLogger(__name__)

#: Self weights ``w_ii`` the stability condition covers (Metropolis weights give ``w_ii >=
#: 1 / (max degree + 1)``; 0.2 covers rings, tori and exponential graphs of up to 16 peers).
DEFAULT_MIN_SELF_WEIGHT = 0.2
#: The chosen ``alpha`` is this fraction of the largest stable one (distance from the boundary).
SAFETY_FACTOR = 0.9
_SELF_WEIGHT_POINTS = 9
_NEIGHBOUR_POINTS = 41
_MOMENTUM_GRID_STEP = 0.05
_BISECTION_STEPS = 14


def characteristic_polynomial(
    alpha: float, beta: float, self_weight: float, neighbour_eigenvalue: float, delay: int
) -> np.ndarray:
    """Coefficients (highest power first) of ``p(z)`` of the module docstring.

    Args:
        alpha: scale of the corrected gradient.
        beta: momentum ``beta'``.
        self_weight: ``w0 = w_ii``.
        neighbour_eigenvalue: ``a``, an eigenvalue of the neighbour part of ``W``.
        delay: ``tau >= 0``, steps by which neighbour vectors are late.

    Returns:
        The ``tau + 3`` coefficients of ``p``.
    """
    if delay < 0:
        raise ValueError(f"delay must be >= 0, got {delay}")
    coefficients = np.zeros(delay + 3)
    coefficients[0] = 1.0
    coefficients[1] -= 1.0 + beta - alpha * (1.0 - self_weight)
    coefficients[2] += beta
    coefficients[delay + 1] -= alpha * neighbour_eigenvalue
    return coefficients


def companion_matrix(coefficients: np.ndarray) -> np.ndarray:
    """Companion matrix of a monic polynomial (its eigenvalues are the polynomial's roots).

    Args:
        coefficients: ``[..., D + 1]`` coefficients, highest power first, leading one ``1``.

    Returns:
        ``[..., D, D]`` companion matrices (first row ``-coefficients[1:]``, ones below the
        diagonal).
    """
    degree = coefficients.shape[-1] - 1
    matrix = np.zeros((*coefficients.shape[:-1], degree, degree))
    matrix[..., 0, :] = -coefficients[..., 1:]
    matrix[..., np.arange(1, degree), np.arange(degree - 1)] = 1.0
    return matrix


def worst_spectral_radius(
    alpha: float,
    beta: float,
    delay: int,
    min_self_weight: float = DEFAULT_MIN_SELF_WEIGHT,
) -> float:
    """Largest root modulus of ``p`` over self weights in ``[min_self_weight, 1)`` and every
    non-consensus neighbour eigenvalue ``a`` in ``[-(1 - w0), 1 - w0)``.

    Args:
        alpha: scale of the corrected gradient.
        beta: momentum ``beta'``.
        delay: ``tau``.
        min_self_weight: smallest ``w_ii`` covered.

    Returns:
        The worst spectral radius (``< 1``: stable).
    """
    if not 0.0 < min_self_weight < 1.0:
        raise ValueError(f"min_self_weight must be in (0, 1), got {min_self_weight}")
    self_weights = np.linspace(min_self_weight, 0.95, _SELF_WEIGHT_POINTS)
    rows = []
    for w0 in self_weights:
        for a in np.linspace(-(1.0 - w0), 1.0 - w0, _NEIGHBOUR_POINTS)[:-1]:
            rows.append(characteristic_polynomial(alpha, beta, float(w0), float(a), delay))
    roots = np.linalg.eigvals(companion_matrix(np.stack(rows)))
    return float(np.abs(roots).max())


def stability_delay(max_staleness: int) -> int:
    """``tau`` of the uniform-delay model for a staleness bound ``T``: ``ceil(T / 2)``."""
    if max_staleness < 0:
        raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
    return math.ceil(max_staleness / 2)


@functools.lru_cache(maxsize=64)
def stable_coefficients(
    beta: float, max_staleness: int, min_self_weight: float = DEFAULT_MIN_SELF_WEIGHT
) -> tuple[float, float]:
    """``(alpha, beta')`` of the staleness-aware DecentLaM for a staleness bound ``T``.

    ``T = 0`` gives ``(1, beta)``: DecentLaM itself. Otherwise every ``beta'`` in
    ``{0, 0.05, ..., beta}`` is tried, its largest stable ``alpha <= 1`` found by bisection on
    :func:`worst_spectral_radius`, and the pair with the largest ``alpha / (1 - beta')`` kept,
    ``alpha`` then scaled by :data:`SAFETY_FACTOR`.

    Args:
        beta: the configured momentum (an upper bound for ``beta'``).
        max_staleness: ``T``.
        min_self_weight: smallest ``w_ii`` the condition covers.

    Returns:
        ``(alpha, beta')``.

    Raises:
        ValueError: no stable pair (not the case for ``min_self_weight >= 0.05``).
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {beta}")
    if max_staleness == 0:
        return 1.0, beta
    delay = stability_delay(max_staleness)
    best: tuple[float, float, float] | None = None
    momenta = list(np.arange(0.0, beta + 1e-12, _MOMENTUM_GRID_STEP))
    if not momenta or momenta[-1] < beta - 1e-12:
        momenta.append(beta)
    for candidate in momenta:
        b = float(min(candidate, beta))
        if worst_spectral_radius(1.0, b, delay, min_self_weight) < 1.0:
            alpha = 1.0
        else:
            low, high = 0.0, 1.0
            for _ in range(_BISECTION_STEPS):
                middle = 0.5 * (low + high)
                if worst_spectral_radius(middle, b, delay, min_self_weight) < 1.0:
                    low = middle
                else:
                    high = middle
            alpha = low
        if alpha > 0.0 and (best is None or alpha / (1.0 - b) > best[0]):
            best = (alpha / (1.0 - b), alpha, b)
    if best is None:
        raise ValueError(f"no stable DecentLaM coefficients for max_staleness={max_staleness}")
    _, alpha, chosen_beta = best
    logger.debug("staleness bound %d: alpha=%.4f beta=%.2f", max_staleness, alpha, chosen_beta)
    return SAFETY_FACTOR * alpha, chosen_beta
