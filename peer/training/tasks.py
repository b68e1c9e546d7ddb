"""Training tasks: what a peer trains, on which shard of which data.

A task is built by a factory ``factory(rank, world_size, **options)`` and exposes:

* ``model``: a ``torch.nn.Module`` (built under the manifest's seed, so every peer starts from
  the same parameters);
* ``train_batches(start_step=0)``: an iterator over this peer's batches. Built-in tasks derive
  batch ``k`` from ``(seed, rank, k)`` alone, so resuming at step ``k`` replays exactly the
  batches an uninterrupted run would have seen. A user task may omit ``start_step``; the
  trainer then skips ``k`` batches;
* ``loss(model, batch) -> Tensor``: the scalar training loss;
* ``evaluate(model) -> dict[str, float]``: evaluation metrics (e.g. ``loss``, ``accuracy``).

Built-in names: ``linreg`` (heterogeneous least squares, full batch or minibatch), ``digits``
(scikit-learn's digits with a non-iid split, MLP or small CNN) and ``synthetic-image`` (a
ResNet-20-sized CNN on random 32x32 images, for throughput). Any other name of the form
``package.module:factory`` is imported.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

logger = logging.getLogger(__name__)

Batch = Any


def _step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    # A fresh generator per (seed, rank, step): batches are a pure function of the step.
    generator = torch.Generator()
    generator.manual_seed((seed * 1_000_003 + rank) * 1_000_003 + step)
    return generator


def _minibatch_indices(size: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    if batch_size >= size:
        return torch.arange(size)
    return torch.randperm(size, generator=generator)[:batch_size]


# --------------------------------------------------------------------------------------------
# digits


class DigitsMLP(nn.Module):
    """A small MLP for 8x8 digits (64 inputs, 10 classes)."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class DigitsCNN(nn.Module):
    """A small CNN for 1x8x8 digits."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.head = nn.Linear(2 * channels * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 1, 8, 8)
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.head(x.flatten(1))


@dataclass
class DigitsTask:
    """scikit-learn's digits (1797 8x8 images), split non-iid over the peers.

    The test set (``test_fraction`` of the data, identical on every peer) evaluates the local
    model; the rest is split over the peers with
    :func:`peer.simulation.problems.split_digits` (the simulator's split).
    """

    model: nn.Module
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    batch_size: int
    seed: int
    rank: int

    def train_batches(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This peer's minibatches; batch ``k`` depends only on ``(seed, rank, k)``."""
        step = start_step
        while True:
            idx = _minibatch_indices(
                len(self.train_y), self.batch_size, _step_generator(self.seed, self.rank, step)
            )
            yield self.train_x[idx], self.train_y[idx]
            step += 1

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy on one batch."""
        inputs, targets = batch
        device = next(model.parameters()).device
        return F.cross_entropy(model(inputs.to(device)), targets.to(device))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Test loss and accuracy of ``model`` on the shared test set."""
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        logits = model(self.test_x.to(device))
        model.train(was_training)
        targets = self.test_y.to(device)
        return {
            "loss": float(F.cross_entropy(logits, targets)),
            "accuracy": float((logits.argmax(1) == targets).float().mean()),
        }


def digits_task(
    rank: int,
    world_size: int,
    *,
    batch_size: int = 32,
    model: str = "mlp",
    hidden: int = 64,
    alpha: float | None = 0.5,
    split: str | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    dtype: str = "float32",
    **unused: Any,
) -> DigitsTask:
    """Build the ``digits`` task for one peer.

    Args:
        rank: this peer.
        world_size: number of peers.
        batch_size: per-peer minibatch size (``0`` or more than the shard = full batch).
        model: ``"mlp"`` or ``"cnn"``.
        hidden: MLP hidden width.
        alpha: Dirichlet concentration of the label skew; ``None`` for an iid split.
        split: ``"dirichlet"``, ``"label"`` (sorted by label, contiguous shards: each peer
            sees one or two classes) or ``"iid"``; default: Dirichlet, or iid when ``alpha``
            is ``None``.
        test_fraction: held-out share of the data.
        seed: data split, model init and batch sampling seed.
        dtype: parameter dtype.

    Returns:
        The peer's :class:`DigitsTask`.
    """
    from peer.simulation.problems import split_digits

    _warn_unused("digits", unused)
    # The simulator's DigitsProblem splits with the same function: same shards for the same
    # arguments.
    if split is None:
        split = "iid" if alpha is None else "dirichlet"
    data = split_digits(world_size, split, alpha or 0.5, test_fraction, seed)
    mine = data.shards[rank]
    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(seed)
    if model == "mlp":
        net: nn.Module = DigitsMLP(hidden)
    elif model == "cnn":
        net = DigitsCNN()
    else:
        raise ValueError(f"digits: unknown model {model!r} (choose 'mlp' or 'cnn')")
    net = net.to(torch_dtype)
    return DigitsTask(
        model=net,
        train_x=torch.as_tensor(data.train_x[mine], dtype=torch_dtype),
        train_y=torch.as_tensor(data.train_y[mine]),
        test_x=torch.as_tensor(data.test_x, dtype=torch_dtype),
        test_y=torch.as_tensor(data.test_y),
        batch_size=batch_size if batch_size > 0 else len(mine),
        seed=seed,
        rank=rank,
    )


# --------------------------------------------------------------------------------------------
# linreg


class LinearModel(nn.Module):
    """``x`` as one parameter vector (the model of least squares)."""

    def __init__(self, x0: torch.Tensor) -> None:
        super().__init__()
        self.x = nn.Parameter(x0.clone())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.x


@dataclass
class LinRegTask:
    """Peer ``rank``'s share of :class:`peer.simulation.problems.LinearRegressionProblem`.

    ``f_i(x) = ||A_i x - b_i||^2 / (2 m)``: the same data, loss and optimum as the simulator's
    problem with the same options, so real peers can be checked against it step by step.
    """

    model: nn.Module
    A: torch.Tensor
    b: torch.Tensor
    x_star: torch.Tensor
    batch_size: int | None
    seed: int
    rank: int

    def train_batches(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Full batch every step, or ``batch_size`` rows drawn with replacement."""
        step = start_step
        while True:
            if self.batch_size is None:
                yield self.A, self.b
            else:
                generator = _step_generator(self.seed, self.rank, step)
                idx = torch.randint(len(self.b), (self.batch_size,), generator=generator)
                yield self.A[idx], self.b[idx]
            step += 1

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``||A x - b||^2 / (2 m)`` on the batch."""
        A, b = batch
        return 0.5 * (model(A) - b).pow(2).mean()

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Full local loss and squared distance to the global optimum ``x*``."""
        x = next(model.parameters()).detach().to(self.x_star.dtype).cpu()
        return {
            "loss": float(self.loss(model, (self.A, self.b))),
            "error": float((x.reshape(-1) - self.x_star).pow(2).sum()),
        }


def linreg_task(
    rank: int,
    world_size: int,
    *,
    batch_size: int | None = 0,
    dim: int = 10,
    samples_per_node: int = 50,
    heterogeneity: float = 1.0,
    feature_shift: float = 0.0,
    noise: float = 0.1,
    identical: bool = False,
    seed: int = 0,
    dtype: str = "float64",
    **unused: Any,
) -> LinRegTask:
    """Build the ``linreg`` task (heterogeneous least squares) for one peer.

    Args:
        rank: this peer.
        world_size: number of peers (the problem has one node per peer).
        batch_size: rows per step; ``0``/``None`` for full-batch gradients.
        dim, samples_per_node, heterogeneity, feature_shift, noise, identical, seed: as in
            :class:`peer.simulation.problems.LinearRegressionProblem`.
        dtype: parameter dtype (``float64`` for exact comparisons).
    """
    from peer.simulation.problems import LinearRegressionProblem

    _warn_unused("linreg", unused)
    problem = LinearRegressionProblem(
        n=world_size,
        dim=dim,
        samples_per_node=samples_per_node,
        heterogeneity=heterogeneity,
        feature_shift=feature_shift,
        noise=noise,
        identical=identical,
        seed=seed,
    )
    torch_dtype = getattr(torch, dtype)
    assert problem.x_star is not None
    return LinRegTask(
        model=LinearModel(problem.initial_point(torch_dtype)),
        A=problem.A[rank].to(torch_dtype),
        b=problem.b[rank].to(torch_dtype),
        x_star=problem.x_star,
        batch_size=batch_size or None,
        seed=seed,
        rank=rank,
    )


# --------------------------------------------------------------------------------------------
# synthetic-image


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convolutions with a shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet-20 for 32x32 images (He et al. 2016, CIFAR variant; about 0.27 M parameters)."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        layers: list[nn.Module] = []
        cin = width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for block in range(3):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(BasicBlock(cin, cout, stride))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


@dataclass
class SyntheticImageTask:
    """Random 32x32 RGB images with random labels: measures throughput, not learning."""

    model: nn.Module
    batch_size: int
    seed: int
    rank: int
    eval_batches: int = 1

    def train_batches(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Random batches; batch ``k`` depends only on ``(seed, rank, k)``."""
        step = start_step
        while True:
            generator = _step_generator(self.seed, self.rank, step)
            images = torch.randn(self.batch_size, 3, 32, 32, generator=generator)
            labels = torch.randint(0, 10, (self.batch_size,), generator=generator)
            yield images, labels
            step += 1

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy on one batch."""
        images, labels = batch
        device = next(model.parameters()).device
        return F.cross_entropy(model(images.to(device)), labels.to(device))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Loss on a fixed random batch (accuracy is chance by construction)."""
        batch = next(self.train_batches(start_step=-1))
        was_training = model.training
        model.eval()
        value = float(self.loss(model, batch))
        model.train(was_training)
        return {"loss": value}


def synthetic_image_task(
    rank: int,
    world_size: int,
    *,
    batch_size: int = 32,
    width: int = 16,
    seed: int = 0,
    **unused: Any,
) -> SyntheticImageTask:
    """Build the ``synthetic-image`` throughput task (ResNet-20-sized CNN)."""
    _warn_unused("synthetic-image", unused)
    torch.manual_seed(seed)
    return SyntheticImageTask(
        model=ResNet20(width=width), batch_size=batch_size, seed=seed, rank=rank
    )


# --------------------------------------------------------------------------------------------
# registry


def _warn_unused(task: str, unused: Mapping[str, Any]) -> None:
    if unused:
        logger.warning("task %s ignores options %s", task, sorted(unused))


@dataclass
class TaskRegistry:
    """Built-in task factories by name."""

    factories: dict[str, Callable[..., Any]] = field(default_factory=dict)

    def register(self, name: str, factory: Callable[..., Any]) -> None:
        """Add a factory under ``name``."""
        self.factories[name] = factory

    def resolve(self, name: str) -> Callable[..., Any]:
        """The factory for a built-in name or a ``package.module:factory`` path.

        Raises:
            ValueError: unknown name, module not importable, or attribute missing.
        """
        if name in self.factories:
            return self.factories[name]
        if ":" not in name:
            known = ", ".join(sorted(self.factories))
            raise ValueError(
                f"unknown task {name!r}: use a built-in ({known}) or 'package.module:factory'"
            )
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"task {name!r}: cannot import module {module_name!r}: {exc}") from exc
        factory = getattr(module, attr, None)
        if not callable(factory):
            raise ValueError(f"task {name!r}: {module_name} has no callable {attr!r}")
        return factory


TASKS = TaskRegistry()
TASKS.register("linreg", linreg_task)
TASKS.register("digits", digits_task)
TASKS.register("synthetic-image", synthetic_image_task)


class SlowedTask:
    """A task whose every step takes ``delay_seconds`` longer on this peer (a straggler).

    The sleep happens in :meth:`loss`, i.e. as part of the step's compute, once per step: the
    deterministic delay fault of the straggler benchmark (benchmarks/stragglers.py).
    """

    def __init__(self, task: Any, delay_seconds: float) -> None:
        self._task = task
        self.delay_seconds = float(delay_seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._task, name)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        time.sleep(self.delay_seconds)
        return self._task.loss(model, batch)


def build_task(name: str, rank: int, world_size: int, options: Mapping[str, Any]) -> Any:
    """Build a task and check it has the attributes the trainer needs.

    Two options are the trainer's, for every task: ``step_delay_seconds`` (default 0) and
    ``slow_ranks`` (default ``[0]``) make the listed peers sleep that long per step
    (:class:`SlowedTask`).

    Args:
        name: built-in name or ``package.module:factory``.
        rank: this peer.
        world_size: number of peers.
        options: keyword options for the factory (from the manifest's ``task_options``).

    Returns:
        The task object.
    """
    factory = TASKS.resolve(name)
    options = dict(options)
    delay_seconds = float(options.pop("step_delay_seconds", 0.0))
    slow_ranks = [int(r) for r in options.pop("slow_ranks", [0])]
    if delay_seconds < 0:
        raise ValueError(f"step_delay_seconds must be >= 0, got {delay_seconds}")
    task = factory(rank, world_size, **options)
    if delay_seconds > 0 and rank in slow_ranks:
        task = SlowedTask(task, delay_seconds)
    missing = [
        attr for attr in ("model", "train_batches", "loss", "evaluate") if not hasattr(task, attr)
    ]
    if missing:
        raise ValueError(f"task {name!r} is missing {', '.join(missing)}")
    if not isinstance(task.model, nn.Module):
        raise ValueError(f"task {name!r}: model must be a torch.nn.Module")
    return task


def batches_from(task: Any, start_step: int) -> Iterator[Batch]:
    """The task's batch iterator positioned at ``start_step`` (exact replay on resume)."""
    parameters = inspect.signature(task.train_batches).parameters
    if "start_step" in parameters:
        return iter(task.train_batches(start_step=start_step))
    iterator = iter(task.train_batches())
    for _ in range(start_step):
        next(iterator)
    return iterator
