"""Staleness-aware DecentLaM: the stability condition (pure numpy), the simulator's delay model,
and convergence with a slow peer in-process (docs/async-decentlam.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from peer.algorithms.rules import DecentLaMRule, make_rule, staleness_cost
from peer.algorithms.stability import (
    characteristic_polynomial,
    companion_matrix,
    stability_delay,
    stable_coefficients,
    worst_spectral_radius,
)
from peer.simulation.problems import LinearRegressionProblem
from peer.simulation.simulator import DelayModel, Simulator
from topology import make_topology

SLOW_2X = [2.0] + [1.0] * 7


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny [8, d] products: torch's thread pool only adds contention on a loaded machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def recursion_matrix(alpha: float, beta: float, w0: float, a: float, tau: int) -> np.ndarray:
    """State-space matrix of the delayed scalar recursion, written from the update itself:
    state (x^k, ..., x^{k-tau}, gamma m^{k-1}); mixed = w0 x^k + a x^{k-tau};
    gamma m^k = beta gamma m^{k-1} + alpha (x^k - mixed); x^{k+1} = x^k - gamma m^k."""
    size = tau + 2
    matrix = np.zeros((size, size))
    for column in range(size):
        state = np.zeros(size)
        state[column] = 1.0
        x, x_old, m = state[0], state[tau], state[tau + 1]
        m_new = beta * m + alpha * (x - (w0 * x + a * x_old))
        matrix[:, column] = [x - m_new, *state[:tau], m_new]
    return matrix


@pytest.mark.parametrize("tau", [0, 1, 2, 4])
@pytest.mark.parametrize(("alpha", "beta", "a"), [(1.0, 0.9, -2 / 3), (0.5, 0.55, 0.3)])
def test_characteristic_polynomial_matches_the_recursion(
    tau: int, alpha: float, beta: float, a: float
) -> None:
    w0 = 1 / 3
    poly = characteristic_polynomial(alpha, beta, w0, a, tau)
    from_roots = np.sort_complex(np.roots(poly))
    from_companion = np.sort_complex(np.linalg.eigvals(companion_matrix(poly)))
    np.testing.assert_allclose(from_roots, from_companion, atol=1e-9)
    recursion = np.abs(np.linalg.eigvals(recursion_matrix(alpha, beta, w0, a, tau))).max()
    assert np.abs(from_roots).max() == pytest.approx(recursion, abs=1e-9)


def test_plain_decentlam_is_unstable_with_one_step_of_staleness() -> None:
    # Metropolis ring: w0 = 1/3, worst neighbour mode a = -2/3; beta = 0.9, tau = 1.
    ring_worst = np.abs(np.roots(characteristic_polynomial(1.0, 0.9, 1 / 3, -2 / 3, 1))).max()
    assert ring_worst > 1.2
    assert worst_spectral_radius(1.0, 0.9, 0) < 1.0  # synchronous: stable
    assert worst_spectral_radius(1.0, 0.9, 1) > 1.0


@pytest.mark.parametrize("bound", [1, 2, 3, 4, 8])
def test_stable_coefficients_satisfy_the_condition(bound: int) -> None:
    alpha, beta = stable_coefficients(0.9, bound)
    assert 0.0 < alpha <= 1.0 and 0.0 <= beta <= 0.9
    assert worst_spectral_radius(alpha, beta, stability_delay(bound)) < 1.0
    assert stable_coefficients(0.9, 0) == (1.0, 0.9)


def test_effective_step_shows_what_the_staleness_bound_costs() -> None:
    assert DecentLaMRule(0.9).effective_step == pytest.approx(10.0)
    alpha, beta = stable_coefficients(0.9, 1)
    stale = DecentLaMRule(0.9, max_staleness=1)
    assert stale.effective_step == pytest.approx(alpha / (1.0 - beta))
    assert 0.5 < stale.effective_step < 2.0  # acceleration given up for stability
    message = staleness_cost(0.9, 1)
    assert "max_staleness=1" in message and f"{stale.effective_step:.2f} lr" in message
    assert "10.00 lr synchronously" in message


def test_rule_at_zero_staleness_is_decentlam_bit_for_bit() -> None:
    gen = torch.Generator().manual_seed(0)
    x, g, mixed = (torch.randn(5, 7, generator=gen, dtype=torch.float64) for _ in range(3))
    plain, zero = DecentLaMRule(0.9), make_rule("decentlam", 0.9, max_staleness=0)
    xa, xb = x.clone(), x.clone()
    sa, sb = plain.init_state(x), zero.init_state(x)
    for step in range(3):
        plain.apply(xa, g, sa, 0.1, mixed, step)
        zero.apply(xb, g, sb, 0.1, mixed, step)
    assert torch.equal(xa, xb) and torch.equal(sa["velocity"], sb["velocity"])
    assert not make_rule("decentlam", 0.9, max_staleness=1).damps_stale_weights
    assert make_rule("dmsgd", 0.9, max_staleness=1).damps_stale_weights


def test_delay_model_staleness_follows_the_slow_peer() -> None:
    ring = torch.tensor(np.array(make_topology("ring", 8).mixing_matrix(0)))
    model = DelayModel(SLOW_2X, max_staleness=2)
    lags = [model.advance(k, ring) for k in range(40)]
    steady = lags[-1]
    assert steady[1, 0] == 2 and steady[7, 0] == 2  # the slow peer's neighbours see it late
    assert steady[0, 1] == 0 and steady[0, 7] == 0  # the slow peer sees fresh vectors
    assert max(int(lag.max()) for lag in lags) <= 2
    assert model.finished == pytest.approx(2.0 * 40, abs=2.0)  # the slow peer sets the pace


def test_delay_model_at_zero_staleness_leaves_the_simulation_unchanged() -> None:
    problem = LinearRegressionProblem(n=8, dim=5, samples_per_node=30)
    ring = make_topology("ring", 8)
    plain = Simulator("decentlam", ring, problem, lr=0.02).run(50)
    timed = Simulator("decentlam", ring, problem, lr=0.02, compute_time=SLOW_2X).run(50)
    assert plain.params is not None and timed.params is not None
    assert torch.equal(plain.params, timed.params)
    assert timed.time[-1] == pytest.approx(100.0)


@pytest.mark.parametrize("bound", [1, 2, 4])
def test_async_decentlam_keeps_the_synchronous_floor_with_a_slow_peer(bound: int) -> None:
    problem = LinearRegressionProblem(n=8, dim=10, samples_per_node=200, heterogeneity=1.0)
    ring = make_topology("ring", 8)
    steps = 1200

    def floor(algorithm: str, staleness: int) -> float:
        sim = Simulator(
            algorithm, ring, problem, lr=0.01, momentum=0.9, max_staleness=staleness,
            compute_time=SLOW_2X,
        )  # fmt: skip
        result = sim.run(steps, steps)
        assert not result.diverged and result.final_error is not None
        assert result.max_staleness_seen == staleness
        return result.final_error

    synchronous = floor("decentlam", 0)
    asynchronous = floor("decentlam", bound)
    dmsgd = floor("dmsgd", bound)
    assert asynchronous <= 2 * synchronous
    assert dmsgd >= 10 * asynchronous


class _LeastSquares:
    """The optimizer tests' least squares (``0.5 mean (A_i x - b_i)^2``) as a simulator problem."""

    def __init__(self, A: np.ndarray, b: np.ndarray, x0: np.ndarray) -> None:
        self.A, self.b, self.x0 = torch.from_numpy(A), torch.from_numpy(b), torch.from_numpy(x0)
        self.n, self.dim = A.shape[0], A.shape[2]
        self.x_star = None

    def initial_point(self, dtype: torch.dtype) -> torch.Tensor:
        return self.x0.to(dtype)

    def stacked_gradient(self, X, batch_size=None, generator=None):  # type: ignore[no-untyped-def]
        residual = torch.einsum("nmd,nd->nm", self.A, X) - self.b
        return torch.einsum("nmd,nm->nd", self.A, residual) / self.A.shape[1]

    def loss(self, X: torch.Tensor) -> float:
        return 0.0

    def metrics(self, X: torch.Tensor) -> dict[str, float]:
        return {}


@pytest.mark.parametrize("overlap", [False, True], ids=["blocking", "overlap"])
@pytest.mark.parametrize("method", ["decentlam", "dmsgd"])
def test_pipelined_optimizer_equals_the_one_step_stale_simulator(
    method: str, overlap: bool
) -> None:
    from reference_equations import MatrixTopology, linreg_data, ring_matrix
    from test_optim import SAMPLES, N, run_peers, stacked

    topology = MatrixTopology([ring_matrix(N)])
    A, b = linreg_data(N, 15, SAMPLES, seed=5)
    x0 = np.random.default_rng(1).normal(size=(N, 15))
    steps = 30
    models = run_peers(
        method, topology, A, b, x0, steps, lr=0.05, momentum=0.9, max_staleness=1,
        pipeline=True, overlap=overlap,
    )  # fmt: skip
    sim = Simulator(
        method, topology, _LeastSquares(A, b, x0), lr=0.05, momentum=0.9, max_staleness=1,
        pipeline=True,
    )  # fmt: skip
    sim.run(steps)
    expected = sim.params.numpy()
    assert np.abs(stacked(models) - expected).max() <= 1e-10 * np.abs(expected).max()


def test_pipeline_arguments_are_checked() -> None:
    from peer.training.optim import make_optimizer
    from peer.transport.memory import InMemoryFabric

    fabric = InMemoryFabric(2, make_topology("ring", 2))
    params = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="pipeline=True needs max_staleness=1"):
        make_optimizer("decentlam", params, communicator=fabric.communicator(0), pipeline=True)
    with pytest.raises(ValueError, match="pipeline needs max_staleness=1"):
        Simulator(
            "decentlam", make_topology("ring", 2), LinearRegressionProblem(n=2), pipeline=True
        )
