"""Built-in tasks: shards, determinism of batches, resume replay, user factories."""

from __future__ import annotations

import itertools
import sys
import types

import numpy as np
import pytest
import torch

from peer.simulation.problems import split_non_iid
from peer.training.tasks import batches_from, build_task


def test_non_iid_split_is_a_partition_and_skewed() -> None:
    labels = np.repeat(np.arange(10), 50)
    shards = split_non_iid(labels, 8, "dirichlet", alpha=0.1, seed=3)
    joined = np.sort(np.concatenate(shards))
    assert np.array_equal(joined, np.arange(len(labels)))
    assert all(len(s) > 0 for s in shards)
    # strong skew: some peer holds a class share far from the uniform 10%
    share = max(np.bincount(labels[s], minlength=10).max() / len(s) for s in shards)
    assert share > 0.3


def test_non_iid_split_iid_and_errors() -> None:
    labels = np.arange(20) % 2
    shards = split_non_iid(labels, 4, "iid", seed=0)
    assert [len(s) for s in shards] == [5, 5, 5, 5]
    with pytest.raises(ValueError, match="alpha must be > 0"):
        split_non_iid(labels, 4, "dirichlet", alpha=0.0, seed=0)
    with pytest.raises(ValueError, match="cannot split 20 samples over 30 nodes"):
        split_non_iid(labels, 30, "iid", seed=0)


def test_digits_peers_share_init_and_test_set_but_not_shards() -> None:
    a = build_task("digits", 0, 4, {"seed": 1, "batch_size": 16})
    b = build_task("digits", 1, 4, {"seed": 1, "batch_size": 16})
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert torch.equal(a.test_x, b.test_x)
    assert a.train_x.shape[0] + b.train_x.shape[0] > 0
    assert not (a.train_x.shape == b.train_x.shape and torch.equal(a.train_x, b.train_x))
    metrics = a.evaluate(a.model)
    assert set(metrics) == {"loss", "accuracy"}
    assert 0.0 <= metrics["accuracy"] <= 1.0


def test_batches_replay_exactly_from_any_step() -> None:
    task = build_task("digits", 2, 4, {"seed": 5, "batch_size": 8, "model": "cnn"})
    full = list(itertools.islice(task.train_batches(), 6))
    resumed = list(itertools.islice(batches_from(task, 4), 2))
    for (xa, ya), (xb, yb) in zip(full[4:], resumed, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    loss = task.loss(task.model, full[0])
    loss.backward()
    assert loss.ndim == 0


def test_synthetic_image_is_resnet20_sized() -> None:
    task = build_task("synthetic-image", 0, 2, {"batch_size": 4})
    params = sum(p.numel() for p in task.model.parameters())
    assert 250_000 < params < 300_000
    batch = next(task.train_batches())
    assert batch[0].shape == (4, 3, 32, 32)
    assert "loss" in task.evaluate(task.model)


def test_user_factory_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("my_tasks")

    class Tiny:
        def __init__(self) -> None:
            self.model = torch.nn.Linear(2, 1)

        def train_batches(self):  # no start_step: the trainer skips batches instead
            yield from (torch.full((1, 2), float(i)) for i in itertools.count())

        def loss(self, model, batch):
            return model(batch).sum()

        def evaluate(self, model):
            return {}

    module.make = lambda rank, world_size, **opts: Tiny()  # type: ignore[attr-defined]
    module.broken = lambda rank, world_size, **opts: object()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "my_tasks", module)
    task = build_task("my_tasks:make", 0, 1, {})
    assert float(next(batches_from(task, 3))[0, 0]) == 3.0
    with pytest.raises(ValueError, match="missing model, train_batches, loss, evaluate"):
        build_task("my_tasks:broken", 0, 1, {})
    with pytest.raises(ValueError, match="has no callable 'nope'"):
        build_task("my_tasks:nope", 0, 1, {})
    with pytest.raises(ValueError, match="cannot import module"):
        build_task("no_such_module_xyz:f", 0, 1, {})
    with pytest.raises(ValueError, match="unknown task 'imagenet'"):
        build_task("imagenet", 0, 1, {})
    with pytest.raises(ValueError, match="unknown model 'rnn'"):
        build_task("digits", 0, 1, {"model": "rnn"})


@pytest.mark.parametrize("alpha", [0.3, None])
def test_simulator_and_peers_train_on_the_same_digits_shards(alpha: float | None) -> None:
    """The simulator's DigitsProblem and the peers' digits task split the data with one
    function: same arguments, same shards, same held-out set."""
    from peer.simulation.problems import DigitsProblem

    n, seed, test_fraction = 4, 5, 0.2
    problem = DigitsProblem(
        n=n,
        split="iid" if alpha is None else "dirichlet",
        alpha=0.5 if alpha is None else alpha,
        test_fraction=test_fraction,
        seed=seed,
    )
    for rank in range(n):
        task = build_task(
            "digits",
            rank,
            n,
            {"seed": seed, "alpha": alpha, "test_fraction": test_fraction, "dtype": "float64"},
        )
        count = int(problem.counts[rank])
        assert torch.equal(task.train_y, problem.labels[rank, :count])
        assert torch.equal(task.train_x, problem.features[rank, :count])
    assert torch.equal(task.test_y, problem.test_labels)
    assert torch.equal(task.test_x, problem.test_features)
