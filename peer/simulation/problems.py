"""Built-in problems for the in-process simulator: every node's objective, vectorised over nodes.

A problem holds ``n`` local datasets and evaluates all ``n`` local gradients at once on a stack
of parameters ``X`` of shape ``[n, d]`` (row ``i`` is node ``i``'s model), with batched matrix
products -- never a Python loop over nodes. The interface the simulator relies on:

* ``n``, ``dim``; ``x_star``: the minimiser of ``sum_i f_i`` when known in closed form, else
  ``None``;
* ``initial_point(dtype) -> [d]``: the common starting model;
* ``stacked_gradient(X, batch_size=None, generator=None) -> [n, d]``: row ``i`` is
  ``grad f_i(x_i)`` (full batch) or a minibatch estimate (``batch_size`` samples per node, drawn
  with replacement from the node's own shard);
* ``loss(X) -> float``: the global objective ``(1/n) sum_i f_i`` at the averaged model;
* ``metrics(X) -> dict``: extra evaluation (test accuracy for the digits problems).

Problems: heterogeneous linear regression (closed-form ``x*``), and logistic regression / a
small MLP on scikit-learn's digits with a non-iid split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

PROBLEMS: tuple[str, ...] = ("linreg", "digits-logreg", "digits-mlp")


class LinearRegressionProblem:
    """``f_i(x) = ||A_i x - b_i||^2 / (2 m)`` with node-dependent data.

    Heterogeneity comes from per-node ground truths ``x_i^true = x_0 + heterogeneity * z_i``
    (so ``grad f_i(x*) != 0``) and, optionally, per-node shifted features
    ``A_i = randn + feature_shift * s_i``. With ``heterogeneity = feature_shift = 0`` and
    ``identical=True`` every node holds the same data.

    Args:
        n: number of nodes.
        dim: dimension ``d``.
        samples_per_node: rows ``m`` of each ``A_i``.
        heterogeneity: spread of the per-node ground truths.
        feature_shift: spread of the per-node feature means.
        noise: standard deviation of the label noise.
        identical: give every node node 0's data (the iid limit: all floors vanish).
        seed: data seed.
    """

    def __init__(
        self,
        n: int = 8,
        dim: int = 10,
        samples_per_node: int = 50,
        heterogeneity: float = 1.0,
        feature_shift: float = 0.0,
        noise: float = 0.1,
        identical: bool = False,
        seed: int = 0,
    ) -> None:
        if n < 1 or dim < 1 or samples_per_node < 1:
            raise ValueError("n, dim and samples_per_node must be >= 1")
        gen = torch.Generator().manual_seed(seed)
        f64 = torch.float64
        A = torch.randn(n, samples_per_node, dim, generator=gen, dtype=f64)
        A = A + feature_shift * torch.randn(n, 1, dim, generator=gen, dtype=f64)
        x0 = torch.randn(dim, generator=gen, dtype=f64)
        truths = x0 + heterogeneity * torch.randn(n, dim, generator=gen, dtype=f64)
        b = torch.einsum("nmd,nd->nm", A, truths)
        b = b + noise * torch.randn(n, samples_per_node, generator=gen, dtype=f64)
        if identical:
            A = A[:1].expand(n, -1, -1).clone()
            b = b[:1].expand(n, -1).clone()
        self.n, self.dim, self.samples_per_node = n, dim, samples_per_node
        self.A, self.b = A, b
        # Normal equations of sum_i f_i, solved in float64.
        hessian = torch.einsum("nmd,nme->de", A, A)
        rhs = torch.einsum("nmd,nm->d", A, b)
        self.x_star: torch.Tensor | None = torch.linalg.solve(hessian, rhs)
        self._cache: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def _data(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if dtype not in self._cache:
            self._cache[dtype] = (self.A.to(dtype), self.b.to(dtype))
        return self._cache[dtype]

    def initial_point(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The common starting point (zeros)."""
        return torch.zeros(self.dim, dtype=dtype)

    def stacked_gradient(
        self,
        X: torch.Tensor,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Row ``i``: ``grad f_i(x_i)``, or its minibatch estimate from ``batch_size`` rows.

        Args:
            X: parameters ``[n, d]``.
            batch_size: samples per node (with replacement); ``None`` for the full batch.
            generator: randomness for the minibatch.

        Returns:
            Gradients ``[n, d]``.
        """
        A, b = self._data(X.dtype)
        if batch_size is not None:
            idx = torch.randint(self.samples_per_node, (self.n, batch_size), generator=generator)
            A = torch.gather(A, 1, idx.unsqueeze(-1).expand(-1, -1, self.dim))
            b = torch.gather(b, 1, idx)
        residual = torch.bmm(A, X.unsqueeze(-1)).squeeze(-1) - b
        return torch.bmm(A.transpose(1, 2), residual.unsqueeze(-1)).squeeze(-1) / A.shape[1]

    def local_losses(self, X: torch.Tensor) -> torch.Tensor:
        """``[f_i(x_i)]_i`` (full batch)."""
        A, b = self._data(X.dtype)
        residual = torch.bmm(A, X.unsqueeze(-1)).squeeze(-1) - b
        return 0.5 * residual.pow(2).mean(dim=1)

    def loss(self, X: torch.Tensor) -> float:
        """``(1/n) sum_i f_i(xbar)`` at the averaged model ``xbar``."""
        xbar = X.mean(dim=0, keepdim=True).expand(self.n, -1)
        return float(self.local_losses(xbar).mean())

    def heterogeneity_b2(self) -> float:
        """``b^2 = (1/n) sum_i ||grad f_i(x*)||^2`` (0 for identical data)."""
        assert self.x_star is not None
        grads = self.stacked_gradient(self.x_star.expand(self.n, -1).clone())
        return float(grads.pow(2).sum(dim=1).mean())

    def metrics(self, X: torch.Tensor) -> dict[str, float]:
        """Loss at the averaged model and ``||xbar - x*||^2``."""
        assert self.x_star is not None
        xbar = X.mean(dim=0).to(torch.float64)
        return {"loss": self.loss(X), "mean_error": float((xbar - self.x_star).pow(2).sum())}


def split_non_iid(
    labels: np.ndarray, n: int, split: str = "dirichlet", alpha: float = 0.5, seed: int = 0
) -> list[np.ndarray]:
    """Split sample indices across ``n`` nodes (the one split of the simulator and the peers).

    Args:
        labels: class label of every sample.
        n: number of nodes.
        split: ``"dirichlet"`` (per class, proportions ~ Dir(alpha)), ``"label"`` (sorted by
            label, contiguous chunks: each node sees few classes) or ``"iid"``.
        alpha: Dirichlet concentration (small = more skewed).
        seed: randomness (identical on every peer, so the shards are disjoint).

    Returns:
        ``n`` non-empty, sorted index arrays; every sample is in exactly one of them.

    Raises:
        ValueError: unknown split, ``alpha <= 0``, or fewer samples than nodes.
    """
    if n > len(labels):
        raise ValueError(f"cannot split {len(labels)} samples over {n} nodes")
    rng = np.random.default_rng(seed)
    if split == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), n)]
    if split == "label":
        order = np.lexsort((rng.random(len(labels)), labels))
        return [np.sort(part) for part in np.array_split(order, n)]
    if split != "dirichlet":
        raise ValueError(f"unknown split {split!r}; choose dirichlet, label or iid")
    if alpha <= 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
    parts: list[list[int]] = [[] for _ in range(n)]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        cuts = (np.cumsum(rng.dirichlet(np.full(n, alpha)))[:-1] * len(members)).astype(int)
        for node, chunk in enumerate(np.split(members, cuts)):
            parts[node].extend(chunk.tolist())
    # Guarantee every node a sample: move one from the largest part to each empty one.
    for node in range(n):
        if not parts[node]:
            donor = max(range(n), key=lambda r: len(parts[r]))
            parts[node].append(parts[donor].pop())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


@dataclass(frozen=True)
class DigitsSplit:
    """scikit-learn's digits, held-out set and per-node training shards.

    Attributes:
        train_x: training features (float64, scaled to ``[0, 1]``), ``[m, 64]``.
        train_y: training labels, ``[m]``.
        test_x: held-out features (identical for every node).
        test_y: held-out labels.
        shards: per node, indices into the training arrays.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    shards: list[np.ndarray]


def split_digits(
    n: int, split: str = "dirichlet", alpha: float = 0.5, test_fraction: float = 0.25, seed: int = 0
) -> DigitsSplit:
    """Load the digits and split them: a stratified held-out set, then :func:`split_non_iid`.

    The simulator's :class:`DigitsProblem` and the peers' ``digits`` task both call this, so
    the same arguments give the same shards in both.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    features = digits.data.astype(np.float64) / 16.0
    x_tr, x_te, y_tr, y_te = train_test_split(
        features,
        digits.target.astype(np.int64),
        test_size=test_fraction,
        random_state=seed,
        stratify=digits.target,
    )
    return DigitsSplit(x_tr, y_tr, x_te, y_te, split_non_iid(y_tr, n, split, alpha, seed))


class DigitsProblem:
    """Classification of scikit-learn's 8x8 digits, split non-iid across ``n`` nodes.

    Models: ``"logreg"`` (softmax regression, ``d = 650``) or ``"mlp"`` (64-hidden-10, tanh).
    Each node's shard is stored padded to the largest shard with a mask, so every node's loss
    and gradient come out of one batched forward/backward over the stacked parameters.

    Args:
        n: number of nodes.
        model: ``"logreg"`` or ``"mlp"``.
        hidden: hidden width of the MLP.
        split: ``"dirichlet"``, ``"label"`` or ``"iid"`` (see :func:`split_non_iid`).
        alpha: Dirichlet concentration.
        test_fraction: held-out fraction (stratified).
        seed: split and initialisation seed.
    """

    def __init__(
        self,
        n: int = 8,
        model: str = "logreg",
        hidden: int = 32,
        split: str = "dirichlet",
        alpha: float = 0.5,
        test_fraction: float = 0.25,
        seed: int = 0,
    ) -> None:
        if model not in ("logreg", "mlp"):
            raise ValueError(f"unknown model {model!r}; choose logreg or mlp")
        data = split_digits(n, split, alpha, test_fraction, seed)
        x_tr, y_tr, x_te, y_te, shards = (
            data.train_x, data.train_y, data.test_x, data.test_y, data.shards
        )  # fmt: skip
        longest = max(len(s) for s in shards)
        self.n, self.model, self.hidden, self.classes = n, model, hidden, 10
        self.features = torch.zeros(n, longest, 64, dtype=torch.float64)
        self.labels = torch.zeros(n, longest, dtype=torch.long)
        self.mask = torch.zeros(n, longest, dtype=torch.float64)
        for i, shard in enumerate(shards):
            self.features[i, : len(shard)] = torch.from_numpy(x_tr[shard])
            self.labels[i, : len(shard)] = torch.from_numpy(y_tr[shard])
            self.mask[i, : len(shard)] = 1.0
        self.counts = torch.tensor([len(s) for s in shards], dtype=torch.long)
        self.test_features = torch.from_numpy(x_te)
        self.test_labels = torch.from_numpy(y_te).long()
        self.seed = seed
        if model == "logreg":
            self.shapes = [(64, 10), (10,)]
        else:
            self.shapes = [(64, hidden), (hidden,), (hidden, 10), (10,)]
        self.dim = sum(int(np.prod(s)) for s in self.shapes)
        self.x_star: torch.Tensor | None = None

    def initial_point(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Zeros for logreg; ``nn.Linear``-style uniform init (seeded) for the MLP."""
        if self.model == "logreg":
            return torch.zeros(self.dim, dtype=dtype)
        gen = torch.Generator().manual_seed(self.seed + 1)
        pieces = []
        for weight_shape, bias_shape in zip(self.shapes[::2], self.shapes[1::2], strict=True):
            bound = 1.0 / weight_shape[0] ** 0.5  # fan_in, as torch.nn.Linear does
            for shape in (weight_shape, bias_shape):
                uniform = torch.rand(shape, generator=gen, dtype=torch.float64)
                pieces.append(((uniform * 2 - 1) * bound).reshape(-1))
        return torch.cat(pieces).to(dtype)

    def _unpack(self, X: torch.Tensor) -> list[torch.Tensor]:
        out, offset = [], 0
        for shape in self.shapes:
            size = int(np.prod(shape))
            piece = X[:, offset : offset + size].reshape(X.shape[0], *shape)
            out.append(piece if len(shape) == 2 else piece.unsqueeze(1))
            offset += size
        return out

    def logits(self, X: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Stacked forward pass: ``X [k, d]``, ``features [k, B, 64]`` -> logits ``[k, B, 10]``."""
        weights = self._unpack(X)
        if self.model == "logreg":
            return torch.baddbmm(weights[1], features, weights[0])
        hidden = torch.tanh(torch.baddbmm(weights[1], features, weights[0]))
        return torch.baddbmm(weights[3], hidden, weights[2])

    def _node_losses(
        self, X: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        logits = self.logits(X, features.to(X.dtype))
        per_sample = torch.nn.functional.cross_entropy(
            logits.reshape(-1, self.classes), labels.reshape(-1), reduction="none"
        ).reshape(labels.shape)
        return (per_sample * weights.to(X.dtype)).sum(dim=1)

    def stacked_gradient(
        self,
        X: torch.Tensor,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Row ``i``: gradient of node ``i``'s mean cross-entropy at ``x_i`` (see module doc)."""
        if batch_size is None:
            features, labels = self.features, self.labels
            weights = self.mask / self.counts.unsqueeze(1).to(torch.float64)
        else:
            draws = torch.rand(self.n, batch_size, generator=generator, dtype=torch.float64)
            idx = (draws * self.counts.unsqueeze(1)).long()
            features = torch.gather(self.features, 1, idx.unsqueeze(-1).expand(-1, -1, 64))
            labels = torch.gather(self.labels, 1, idx)
            weights = torch.full((self.n, batch_size), 1.0 / batch_size, dtype=torch.float64)
        with torch.enable_grad():
            params = X.detach().requires_grad_(True)
            total = self._node_losses(params, features, labels, weights).sum()
            (grad,) = torch.autograd.grad(total, params)
        return grad

    def loss(self, X: torch.Tensor) -> float:
        """Global training loss (mean over nodes of node means) of the averaged model."""
        xbar = X.mean(dim=0, keepdim=True).expand(self.n, -1)
        weights = self.mask / self.counts.unsqueeze(1).to(torch.float64)
        with torch.no_grad():
            return float(self._node_losses(xbar, self.features, self.labels, weights).mean())

    def accuracy(self, X: torch.Tensor) -> torch.Tensor:
        """Test accuracy of each row of ``X`` (``[k]``)."""
        features = self.test_features.to(X.dtype).expand(X.shape[0], -1, -1)
        with torch.no_grad():
            predictions = self.logits(X, features).argmax(dim=-1)
        return (predictions == self.test_labels).to(torch.float64).mean(dim=1)

    def metrics(self, X: torch.Tensor) -> dict[str, float]:
        """Training loss and test accuracy of the averaged model, and mean per-node accuracy."""
        per_node = self.accuracy(X)
        return {
            "loss": self.loss(X),
            "test_accuracy": float(self.accuracy(X.mean(dim=0, keepdim=True))[0]),
            "node_test_accuracy_mean": float(per_node.mean()),
            "node_test_accuracy_min": float(per_node.min()),
        }


def make_problem(name: str, n: int, seed: int = 0, **params: Any) -> Any:
    """Build a built-in problem by name.

    Args:
        name: one of :data:`PROBLEMS`.
        n: number of nodes.
        seed: data seed.
        **params: constructor parameters of the problem class.

    Returns:
        A :class:`LinearRegressionProblem` or :class:`DigitsProblem`.
    """
    if name == "linreg":
        return LinearRegressionProblem(n=n, seed=seed, **params)
    if name in ("digits-logreg", "digits-mlp"):
        return DigitsProblem(n=n, model=name.split("-")[1], seed=seed, **params)
    raise ValueError(f"unknown problem {name!r}; choose one of: {', '.join(PROBLEMS)}")
