"""DecentLaM's momentum on time-varying graphs: the growth factor, the simulator, the manifest.

DecentLaM's momentum carries the mixing step; on the one-peer exponential graph that makes the
disagreement between peers grow at momentum 0.9 whatever the learning rate
(``topology.spectral.momentum_consensus_growth``, docs/algorithms.md). These tests check the
growth factor against the recursion itself, the simulator against the factor, and that the
manifest refuses the unstable settings with a message that names the fix.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from peer.simulation.problems import LinearRegressionProblem
from peer.simulation.simulator import Simulator
from topology.manifest import ManifestError, init_manifest
from topology.spectral import max_stable_momentum, momentum_consensus_growth
from topology.topology import make_topology


def _matrices(graph: str, n: int, weights: str = "uniform") -> list[np.ndarray]:
    return make_topology(graph, n, weights).mixing_matrices()


def _measured_growth(matrices: list[np.ndarray], beta: float, periods: int = 300) -> float:
    """Per-iteration growth of ``e^{k+1} = (W^(k) + beta I) e^k - beta e^{k-1}``, by running it.

    The state is renormalised after every period (a power iteration) and the growth averaged
    over the second half of the run, past the transient.
    """
    n = matrices[0].shape[0]
    rng = np.random.default_rng(0)
    current = rng.normal(size=n)
    current -= current.mean()
    previous = current.copy()
    logs = []
    for _ in range(periods):
        for W in matrices:
            current, previous = W @ current + beta * (current - previous), current
        current, previous = current - current.mean(), previous - previous.mean()  # rounding
        scale = float(np.linalg.norm(np.concatenate([current, previous])))
        logs.append(math.log(scale))
        current, previous = current / scale, previous / scale
    tail = logs[periods // 2 :]
    return math.exp(sum(tail) / (len(tail) * len(matrices)))


@pytest.mark.parametrize(
    ("graph", "n", "beta"),
    [("one-peer-exponential", 8, 0.9), ("one-peer-exponential", 8, 0.5),
     ("one-peer-exponential", 16, 0.9), ("directed-exponential", 8, 0.9), ("ring", 8, 0.9)],
)  # fmt: skip
def test_growth_factor_matches_the_recursion(graph: str, n: int, beta: float) -> None:
    matrices = _matrices(graph, n)
    expected = momentum_consensus_growth(matrices, beta)
    assert _measured_growth(matrices, beta) == pytest.approx(expected, rel=5e-3)


@pytest.mark.parametrize("graph", ["ring", "torus", "exponential", "full", "hypercube"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 0.99])
def test_static_symmetric_graphs_are_stable_at_every_momentum(graph: str, beta: float) -> None:
    for weights in ("uniform", "metropolis"):
        assert momentum_consensus_growth(_matrices(graph, 8, weights), beta) < 1.0


def test_one_peer_exponential_numbers_and_largest_stable_momentum() -> None:
    growth = {n: momentum_consensus_growth(_matrices("one-peer-exponential", n), 0.9)
              for n in (4, 8, 16)}  # fmt: skip
    assert growth == pytest.approx({4: 1.0795, 8: 1.1135, 16: 1.1963}, abs=1e-4)
    matrices = _matrices("one-peer-exponential", 8)
    limit = max_stable_momentum(matrices)
    assert limit == pytest.approx(0.705, abs=0.002)
    assert momentum_consensus_growth(matrices, limit) < 1.0
    assert momentum_consensus_growth(matrices, limit + 0.01) > 1.0
    assert max_stable_momentum(_matrices("ring", 8)) == 0.999


def test_input_checks() -> None:
    with pytest.raises(ValueError, match="beta must be in"):
        momentum_consensus_growth(_matrices("ring", 4), 1.0)
    with pytest.raises(ValueError, match="at least one"):
        momentum_consensus_growth([], 0.5)
    assert momentum_consensus_growth([np.ones((1, 1))], 0.9) == 0.0


def _simulated_error(algorithm: str, graph: str, beta: float, steps: int = 400) -> float:
    problem = LinearRegressionProblem(n=8, dim=10, samples_per_node=50, seed=3)
    sim = Simulator(
        algorithm, make_topology(graph, 8, "uniform"), problem, lr=0.01, momentum=beta,
        dtype=torch.float64,
    )  # fmt: skip
    result = sim.run(steps, steps)
    assert result.final_error is not None
    return result.final_error


def test_simulator_diverges_where_the_factor_says_and_converges_below_the_limit() -> None:
    diverged = _simulated_error("decentlam", "one-peer-exponential", 0.9)
    below_limit = _simulated_error("decentlam", "one-peer-exponential", 0.6)
    dmsgd = _simulated_error("dmsgd", "one-peer-exponential", 0.9)
    static = _simulated_error("decentlam", "exponential", 0.9)
    assert not math.isfinite(diverged) or diverged > 1e6, diverged
    assert below_limit < 10.0 and static < 10.0 and dmsgd < 100.0, (below_limit, static, dmsgd)


def _manifest(**training: object):
    return init_manifest(8, str(training.pop("graph")), weights="uniform", **training)


def test_manifest_refuses_unstable_decentlam_and_names_the_fix() -> None:
    with pytest.raises(ManifestError) as info:
        _manifest(graph="one-peer-exponential", algorithm="decentlam", momentum=0.9)
    message = str(info.value)
    assert message.startswith("training.momentum: 0.9 makes DecentLaM diverge")
    assert "'one-peer-exponential' with 8 peers" in message
    assert "1.114x per iteration" in message and "momentum <= 0.70" in message
    assert "algorithm dmsgd" in message
    # Periodic global averaging is part of the period: every 2 steps is still unstable at 0.9.
    with pytest.raises(ManifestError, match=r"1\.030x per iteration.*<= 0\.84"):
        _manifest(graph="one-peer-exponential", momentum=0.9, global_average_every=2)


@pytest.mark.parametrize(
    "training",
    [
        {"graph": "one-peer-exponential", "algorithm": "decentlam", "momentum": 0.6},
        {"graph": "one-peer-exponential", "algorithm": "dmsgd", "momentum": 0.9},
        {"graph": "one-peer-exponential", "algorithm": "decentlam", "momentum": 0.0},
        {"graph": "exponential", "algorithm": "decentlam", "momentum": 0.9},
        {"graph": "ring", "algorithm": "decentlam", "momentum": 0.99},
        {"graph": "one-peer-exponential", "algorithm": "decentlam", "momentum": 0.9,
         "global_average_every": 1},
    ],
)  # fmt: skip
def test_manifest_accepts_stable_settings(training: dict) -> None:
    assert _manifest(**dict(training)).world_size == 8


def test_simulate_warns_about_unstable_decentlam(capsys: pytest.CaptureFixture[str]) -> None:
    from launcher.cli import main

    argv = ["simulate", "--nodes", "8", "--weights", "uniform", "--algorithms", "decentlam",
            "--steps", "5"]  # fmt: skip
    assert main([*argv, "--graph", "one-peer-exponential"]) == 0
    err = capsys.readouterr().err
    assert "DecentLaM with momentum 0.9 diverges on 'one-peer-exponential'" in err
    assert "stable up to momentum 0.70" in err
    assert main([*argv, "--graph", "ring"]) == 0
    assert "diverges" not in capsys.readouterr().err
