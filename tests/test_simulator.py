"""The simulator against the plain reference, and the fixed points theory predicts."""

from __future__ import annotations

import logging

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
from peer.simulation.problems import DigitsProblem, LinearRegressionProblem, split_non_iid
from peer.simulation.simulator import Simulator

logger = logging.getLogger(__name__)

N, DIM, SAMPLES, STEPS = 8, 5, 12, 50


class NumpyLeastSquares:
    """The reference's data behind the simulator's problem interface."""

    def __init__(self, A: np.ndarray, b: np.ndarray, x0: np.ndarray) -> None:
        self.A, self.b = torch.from_numpy(A), torch.from_numpy(b)
        self.n, self.dim, self.x_star = A.shape[0], A.shape[2], None
        self.x0 = torch.from_numpy(x0)

    def initial_point(self, dtype: torch.dtype) -> torch.Tensor:
        return self.x0.to(dtype)

    def stacked_gradient(
        self, X: torch.Tensor, batch_size: int | None = None, generator: object = None
    ) -> torch.Tensor:
        residual = torch.bmm(self.A, X.unsqueeze(-1)).squeeze(-1) - self.b
        return torch.bmm(self.A.transpose(1, 2), residual.unsqueeze(-1)).squeeze(-1) / SAMPLES

    def loss(self, X: torch.Tensor) -> float:
        return 0.0

    def metrics(self, X: torch.Tensor) -> dict[str, float]:
        return {}


CONFIGS = {
    # name: (matrices, schedule spec, weight decay, H)
    "ring-warmup-wd": ([ring_matrix(N)], "warmup:warmup_steps=10", 0.01, 0),
    "one-peer-exp-global-avg": (one_peer_exponential_matrices(N), None, 0.0, 7),
}


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("method", METHODS)
def test_simulator_matches_reference(method: str, config: str) -> None:
    matrices, schedule_spec, weight_decay, H = CONFIGS[config]
    A, b = linreg_data(N, DIM, SAMPLES, seed=3)
    x0 = np.random.default_rng(4).standard_normal((N, DIM))
    topology = MatrixTopology(matrices)
    lr = 0.05
    schedule = make_schedule(schedule_spec, lr, STEPS)
    sim = Simulator(
        method,
        topology,
        NumpyLeastSquares(A, b, x0),
        schedule=schedule,
        momentum=0.8,
        weight_decay=weight_decay,
        global_average_every=H,
    )
    sim.run(STEPS, record_every=STEPS)
    lr_of_k = warmup_lr(lr, 10) if schedule_spec else (lambda k: lr)
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
    assert relative_difference(sim.params.numpy(), expected) <= 1e-10


def floors(problem: LinearRegressionProblem, lr: float, steps: int) -> dict[str, float]:
    out = {}
    for method in ("dsgd", "dmsgd", "decentlam", "pmsgd"):
        result = Simulator(method, ring_matrix(problem.n), problem, lr=lr).run(steps, steps)
        out[method] = result.final_error
    return out


def test_fixed_points_on_heterogeneous_least_squares() -> None:
    problem = LinearRegressionProblem(n=8, dim=10, samples_per_node=200, heterogeneity=1.0)
    error = floors(problem, lr=0.01, steps=4000)
    assert abs(error["decentlam"] - error["dsgd"]) <= 1e-6 * error["dsgd"]
    assert error["dmsgd"] >= 20 * error["decentlam"]
    assert error["pmsgd"] <= 1e-20
    assert error["decentlam"] > 1e-4  # a genuine floor, not zero


def test_identical_data_has_no_floor() -> None:
    problem = LinearRegressionProblem(n=8, dim=10, samples_per_node=200, identical=True)
    error = floors(problem, lr=0.01, steps=4000)
    assert max(error.values()) <= 1e-18
    assert problem.heterogeneity_b2() <= 1e-20


def test_decentlam_is_as_fast_as_dmsgd_and_dsgd_is_slow() -> None:
    problem = LinearRegressionProblem(n=8, dim=10, samples_per_node=200)
    ring = ring_matrix(8)
    reach = {
        m: Simulator(m, ring, problem, lr=0.005).run(3000, 10).iterations_to_floor()
        for m in ("dsgd", "dmsgd", "decentlam")
    }
    assert reach["decentlam"] <= 3 * reach["dmsgd"]
    assert reach["dsgd"] >= 5 * reach["decentlam"]


def test_minibatch_float32_runs_and_records_curves() -> None:
    problem = LinearRegressionProblem(n=4, dim=3, samples_per_node=20)
    ring = torch.tensor(ring_matrix(4))
    sim = Simulator("decentlam", ring, problem, lr=0.02, batch_size=4, dtype=torch.float32)
    result = sim.run(20, record_every=5)
    assert result.steps == [0, 5, 10, 15, 20]
    assert len(result.error) == len(result.consensus) == len(result.loss) == 5
    assert result.params is not None and result.params.dtype == torch.float32
    assert result.error[-1] < result.error[0]


def test_divergence_is_reported_not_raised() -> None:
    problem = LinearRegressionProblem(n=4, dim=3, samples_per_node=20)
    result = Simulator("dsgd", ring_matrix(4), problem, lr=50.0).run(200)
    assert result.diverged and result.iterations_to_floor() is None


def test_wrong_matrix_shape_is_rejected() -> None:
    problem = LinearRegressionProblem(n=4, dim=3, samples_per_node=5)
    with pytest.raises(ValueError, match="expected \\(4, 4\\)"):
        Simulator("dsgd", ring_matrix(5), problem)


def test_digits_problem_learns_and_splits_non_iid() -> None:
    labels = np.repeat(np.arange(10), 20)
    parts = split_non_iid(labels, 4, "label")
    assert sorted(np.concatenate(parts).tolist()) == list(range(200))
    assert all(len(np.unique(labels[p])) <= 4 for p in parts)
    problem = DigitsProblem(n=4, model="mlp", hidden=16, alpha=0.3)
    sim = Simulator("decentlam", ring_matrix(4), problem, lr=0.2, batch_size=32)
    result = sim.run(150, record_every=50)
    assert result.loss[-1] < result.loss[0]
    assert result.metrics["test_accuracy"] > 0.6
    assert 0 <= result.metrics["node_test_accuracy_min"] <= 1
