"""The torch optimizers: n peers in threads over the in-memory fabric, against the reference."""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable

import numpy as np
import pytest
import torch
from reference_equations import (
    METHODS,
    MatrixTopology,
    linreg_data,
    linreg_gradient,
    one_peer_exponential_matrices,
    reference_run,
    ring_matrix,
    warmup_lr,
)

from peer.algorithms.schedules import make_schedule
from peer.training.optim import DecentLaM, DecentralizedOptimizer, make_optimizer
from peer.transport.memory import InMemoryFabric

logger = logging.getLogger(__name__)

N, SAMPLES, STEPS = 8, 12, 50
SHAPES = [(4,), (2, 3), (5,)]  # three parameters, d = 15
DIM = sum(int(np.prod(s)) for s in SHAPES)


class Peer(torch.nn.Module):
    """Least squares on a model whose parameter vector is split into several tensors."""

    def __init__(self, x0: np.ndarray, unused: bool = False) -> None:
        super().__init__()
        flat = torch.from_numpy(np.array(x0, dtype=np.float64))
        pieces = torch.split(flat, [int(np.prod(s)) for s in SHAPES])
        self.pieces = torch.nn.ParameterList(
            torch.nn.Parameter(p.reshape(s).clone()) for p, s in zip(pieces, SHAPES, strict=True)
        )
        # A parameter that never receives a gradient: it must count as a zero gradient.
        self.unused = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64)) if unused else None

    def vector(self) -> torch.Tensor:
        return torch.cat([p.reshape(-1) for p in self.pieces])

    def loss(self, A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return 0.5 * (A @ self.vector() - b).pow(2).mean()


def run_peers(
    method: str,
    topology: MatrixTopology,
    A: np.ndarray,
    b: np.ndarray,
    x0: np.ndarray,
    steps: int,
    after_step: Callable[[int, int, Peer, DecentralizedOptimizer], None] | None = None,
    models: list[Peer] | None = None,
    load: list[dict] | None = None,
    **kwargs: object,
) -> list[Peer]:
    """Run ``steps`` iterations on ``n`` peers, one thread each; returns the models."""
    n = len(x0)
    fabric = InMemoryFabric(n, topology, retained_versions=8, deadline_seconds=20.0)
    models = models or [Peer(x0[i], unused=bool(kwargs.get("overlap"))) for i in range(n)]
    optimizers = [
        make_optimizer(method, m.parameters(), communicator=fabric.communicator(i), **kwargs)
        for i, m in enumerate(models)
    ]
    if load is not None:
        for optimizer, saved in zip(optimizers, load, strict=True):
            optimizer.load_state_dict(saved)
    tensors = [(torch.from_numpy(A[i]), torch.from_numpy(b[i])) for i in range(n)]
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for _ in range(steps):
                optimizers[i].zero_grad()
                models[i].loss(*tensors[i]).backward()
                optimizers[i].step()
                if after_step is not None:
                    after_step(i, optimizers[i].step_count, models[i], optimizers[i])
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    if errors:
        raise errors[0]
    assert not any(t.is_alive() for t in threads), "peers deadlocked"
    return models


def stacked(models: list[Peer]) -> np.ndarray:
    return np.stack([m.vector().detach().numpy() for m in models])


CONFIGS = {
    "ring-warmup-wd": ([ring_matrix(N)], True, 0.01, 0),
    "one-peer-exp-global-avg": (one_peer_exponential_matrices(N), False, 0.0, 7),
}


@pytest.mark.parametrize("overlap", [False, True], ids=["blocking", "overlap"])
@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("method", METHODS)
def test_optimizers_match_reference(method: str, config: str, overlap: bool) -> None:
    matrices, warmup, weight_decay, H = CONFIGS[config]
    A, b = linreg_data(N, DIM, SAMPLES, seed=5)
    x0 = np.random.default_rng(6).standard_normal((N, DIM))
    topology, lr = MatrixTopology(matrices), 0.05
    schedule = make_schedule("warmup:warmup_steps=10" if warmup else None, lr, STEPS)
    models = run_peers(
        method,
        topology,
        A,
        b,
        x0,
        STEPS,
        lr=lr,
        momentum=0.8,
        weight_decay=weight_decay,
        schedule=schedule,
        global_average_every=H,
        overlap=overlap,
        bucket_bytes=8 if overlap else 64,
    )
    lr_of_k = warmup_lr(lr, 10) if warmup else (lambda k: lr)
    expected = reference_run(
        method,
        topology.mixing_matrix,
        linreg_gradient(A, b),
        x0,
        STEPS,
        lr_of_k,
        0.8,
        weight_decay,
        H,
    )
    got = stacked(models)
    assert np.max(np.abs(got - expected)) / np.max(np.abs(expected)) <= 1e-10
    if overlap:  # the unused parameter only ever sees weight-free, zero-gradient mixing
        assert all(torch.count_nonzero(m.unused) == 0 for m in models)


@pytest.mark.parametrize("method", ["decentlam", "qg-dmsgd", "pmsgd"])
def test_state_dict_round_trip_is_bit_exact(method: str) -> None:
    n, total, save_at = 4, 12, 7
    A, b = linreg_data(n, DIM, SAMPLES, seed=7)
    x0 = np.random.default_rng(8).standard_normal((n, DIM))
    topology = MatrixTopology([ring_matrix(n)])
    kwargs = {"lr": 0.05, "schedule": make_schedule("cosine:warmup_steps=3", 0.05, total)}
    saved: dict[int, tuple[bytes, bytes]] = {}

    def checkpoint(i: int, k: int, model: Peer, optimizer: DecentralizedOptimizer) -> None:
        if k == save_at:
            model_bytes, optimizer_bytes = io.BytesIO(), io.BytesIO()
            torch.save(model.state_dict(), model_bytes)
            torch.save(optimizer.state_dict(), optimizer_bytes)
            saved[i] = (model_bytes.getvalue(), optimizer_bytes.getvalue())

    uninterrupted = run_peers(method, topology, A, b, x0, total, checkpoint, **kwargs)
    fresh = [Peer(np.zeros(DIM)) for _ in range(n)]
    states = []
    for i, model in enumerate(fresh):
        model.load_state_dict(torch.load(io.BytesIO(saved[i][0])))
        states.append(torch.load(io.BytesIO(saved[i][1])))
    assert all(state["step"] == save_at for state in states)
    resumed = run_peers(
        method, topology, A, b, x0, total - save_at, models=fresh, load=states, **kwargs
    )
    assert np.array_equal(stacked(resumed), stacked(uninterrupted))


def test_flat_buffers_views_buckets_and_stats() -> None:
    fabric = InMemoryFabric(1, MatrixTopology([np.eye(1)]))
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[1].double()
    optimizer = DecentLaM(
        model.parameters(), lr=0.1, communicator=fabric.communicator(0), bucket_bytes=16
    )
    flats = optimizer.flat_parameters()
    assert [f.dtype for f in flats] == [torch.float32, torch.float64]
    assert [f.numel() for f in flats] == [15, 8]
    weight = model[0].weight
    assert weight.data_ptr() == flats[0].data_ptr()
    names = [bucket.name for bucket in optimizer._buckets]
    # buckets close at parameter boundaries once they hold >= 16 bytes
    assert names == [
        "params0.float32/0",
        "params0.float32/1",
        "params1.float64/2",
        "params1.float64/3",
    ]
    model[1](model[0](torch.randn(5, 4)).double()).sum().backward()
    assert weight.grad is not None
    optimizer.step()
    assert len(optimizer.last_exchange_stats) == 4
    optimizer.zero_grad()
    assert weight.grad is not None and torch.count_nonzero(weight.grad) == 0
    weight.grad = None  # replaced by user code: the next step copes
    model[1](model[0](torch.randn(5, 4)).double()).sum().backward()
    before = flats[0].clone()
    optimizer.step()
    assert not torch.equal(before, flats[0]) and optimizer.step_count == 2


def test_argument_and_state_errors() -> None:
    params = [torch.nn.Parameter(torch.zeros(3))]
    fabric = InMemoryFabric(1, MatrixTopology([np.eye(1)]))
    with pytest.raises(ValueError, match="communicator"):
        DecentralizedOptimizer(params)
    with pytest.raises(ValueError, match="unknown algorithm"):
        make_optimizer("sgd", params, communicator=fabric.communicator(0))
    optimizer = make_optimizer("dmsgd", params, communicator=fabric.communicator(0))
    other = make_optimizer("dsgd", params, communicator=fabric.communicator(0))
    with pytest.raises(ValueError, match="saved by 'dsgd'"):
        optimizer.load_state_dict(other.state_dict())
    with pytest.raises(RuntimeError):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})


def test_closure_loss_is_returned() -> None:
    fabric = InMemoryFabric(1, MatrixTopology([np.eye(1)]))
    x = torch.nn.Parameter(torch.ones(2))
    optimizer = make_optimizer(
        "pmsgd", [x], lr=0.5, momentum=0.0, communicator=fabric.communicator(0)
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = x.pow(2).sum()
        loss.backward()
        return loss

    assert float(optimizer.step(closure).detach()) == 2.0
    assert torch.equal(x.detach(), torch.zeros(2))


def test_state_from_another_version_is_refused_by_name() -> None:
    """A DecentLaM checkpoint that holds ``momentum`` (before the velocity form) is refused."""
    import torch.nn as nn

    from peer.training.optim import DecentLaM

    model = nn.Linear(3, 2)
    fabric = InMemoryFabric(1, MatrixTopology([np.ones((1, 1))]))
    optimizer = DecentLaM(model.parameters(), lr=0.1, communicator=fabric.communicator(0))
    saved = optimizer.state_dict()
    saved["flat_state"] = [{"momentum": buffers["velocity"]} for buffers in saved["flat_state"]]
    with pytest.raises(ValueError, match=r"\['momentum'\] do not match decentlam's \['velocity'\]"):
        optimizer.load_state_dict(saved)
