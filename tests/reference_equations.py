"""A plain, independent transcription of docs/algorithms.md, used as ground truth by the tests.

Written on purpose without any code from :mod:`peer`: numpy, float64, an explicit Python loop
over nodes and an explicit ``W`` matrix, line by line as the equations read. Also holds the
small test doubles the tests share (a topology backed by explicit matrices).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from types import SimpleNamespace

import numpy as np

logger = logging.getLogger(__name__)

METHODS = ("decentlam", "dmsgd", "dsgd", "pmsgd", "awc-dmsgd", "qg-dmsgd", "dgd")


def ring_matrix(n: int) -> np.ndarray:
    """Ring with weight 1/3 on self and both neighbours."""
    W = np.zeros((n, n))
    for i in range(n):
        for j in (i - 1, i, i + 1):
            W[i, j % n] += 1.0 / 3.0
    return W


def one_peer_exponential_matrices(n: int) -> list[np.ndarray]:
    """``W_k = (I + P_{2^(k mod log2 n)}) / 2``: peer i averages with peer i + 2^t."""
    matrices = []
    for t in range(int(np.log2(n))):
        W = np.eye(n) / 2.0
        for i in range(n):
            W[i, (i + 2**t) % n] += 0.5
        matrices.append(W)
    return matrices


class MatrixTopology:
    """Duck-typed topology (``n``, ``period``, ``mixing_matrix``, ``view``) over explicit W's."""

    def __init__(self, matrices: Sequence[np.ndarray]) -> None:
        self.matrices = [np.asarray(W, dtype=np.float64) for W in matrices]
        self.n = self.matrices[0].shape[0]
        self.period = len(self.matrices)
        self.is_time_varying = self.period > 1

    def mixing_matrix(self, k: int) -> np.ndarray:
        return self.matrices[k % self.period]

    def view(self, rank: int, k: int) -> SimpleNamespace:
        W = self.mixing_matrix(k)
        in_neighbors = {j: float(W[rank, j]) for j in range(self.n) if j != rank and W[rank, j]}
        out_neighbors = {j: float(W[j, rank]) for j in range(self.n) if j != rank and W[j, rank]}
        return SimpleNamespace(
            rank=rank,
            step=k,
            self_weight=float(W[rank, rank]),
            in_neighbors=in_neighbors,
            out_neighbors=out_neighbors,
        )


def reference_run(
    method: str,
    mixing: Callable[[int], np.ndarray],
    gradient: Callable[[int, np.ndarray], np.ndarray],
    x0: np.ndarray,
    steps: int,
    lr: Callable[[int], float],
    beta: float = 0.9,
    weight_decay: float = 0.0,
    global_every: int = 0,
) -> np.ndarray:
    """Run ``method`` for ``steps`` iterations; return the final ``[n, d]`` parameters.

    Args:
        method: one of :data:`METHODS`.
        mixing: ``k -> W`` (``[n, n]``).
        gradient: ``(i, x_i) -> grad f_i(x_i)`` (weight decay is added here).
        x0: starting parameters ``[n, d]``.
        steps: iterations.
        lr: ``k -> gamma_k``.
        beta: momentum (``mu`` for QG-DmSGD).
        weight_decay: ``g_i = grad f_i(x_i) + weight_decay * x_i``.
        global_every: ``H``: iteration ``k`` uses ``w_ij = 1/n`` when ``(k + 1) % H == 0``.
    """
    x = [np.array(row, dtype=np.float64) for row in x0]
    n = len(x)
    m = [np.zeros_like(row) for row in x]
    for k in range(steps):
        gamma = lr(k)
        if global_every and (k + 1) % global_every == 0:
            w = np.full((n, n), 1.0 / n)
        else:
            w = np.asarray(mixing(k), dtype=np.float64)
        g = [gradient(i, x[i]) + weight_decay * x[i] for i in range(n)]
        new_x = [None] * n
        if method == "pmsgd":
            g_avg = sum(g[j] for j in range(n)) / n
            for i in range(n):
                m[i] = beta * m[i] + g_avg
                new_x[i] = x[i] - gamma * m[i]
        elif method == "dsgd":
            for i in range(n):
                new_x[i] = sum(w[i, j] * (x[j] - gamma * g[j]) for j in range(n))
        elif method == "dmsgd":
            for i in range(n):
                m[i] = beta * m[i] + g[i]
            for i in range(n):
                new_x[i] = sum(w[i, j] * (x[j] - gamma * m[j]) for j in range(n))
        elif method == "decentlam":
            psi = [x[j] - gamma * g[j] for j in range(n)]
            correction = (lr(k - 1) if k > 0 else gamma) / gamma  # gamma_{k-1} / gamma_k
            for i in range(n):
                gt = (x[i] - sum(w[i, j] * psi[j] for j in range(n))) / gamma
                m[i] = beta * correction * m[i] + gt
                new_x[i] = x[i] - gamma * m[i]
        elif method == "awc-dmsgd":
            for i in range(n):
                m[i] = beta * m[i] + g[i]
                new_x[i] = sum(w[i, j] * x[j] for j in range(n)) - gamma * m[i]
        elif method == "qg-dmsgd":
            x_half = [x[j] - gamma * (beta * m[j] + g[j]) for j in range(n)]
            for i in range(n):
                new_x[i] = sum(w[i, j] * x_half[j] for j in range(n))
            for i in range(n):
                m[i] = beta * m[i] + (1.0 - beta) * (x[i] - new_x[i]) / gamma
        elif method == "dgd":
            for i in range(n):
                new_x[i] = sum(w[i, j] * x[j] for j in range(n)) - gamma * g[i]
        else:
            raise ValueError(method)
        x = new_x
    return np.stack(x)


def linreg_data(n: int, d: int, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Heterogeneous least-squares data ``A [n, m, d]``, ``b [n, m]`` (numpy, float64)."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, m, d))
    truths = rng.standard_normal(d) + rng.standard_normal((n, d))
    b = np.einsum("nmd,nd->nm", A, truths) + 0.1 * rng.standard_normal((n, m))
    return A, b


def linreg_gradient(A: np.ndarray, b: np.ndarray) -> Callable[[int, np.ndarray], np.ndarray]:
    """``(i, x) -> A_i^T (A_i x - b_i) / m``."""

    def gradient(i: int, x: np.ndarray) -> np.ndarray:
        return A[i].T @ (A[i] @ x - b[i]) / A.shape[1]

    return gradient


def warmup_lr(base: float, warmup: int) -> Callable[[int], float]:
    """``base (k + 1) / warmup`` during the warmup, ``base`` afterwards."""
    return lambda k: base * (k + 1) / warmup if k < warmup else base
