"""State transfer for rejoining (peer.rejoin): named tensors out and in, and the step-boundary
provider, without a network."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from peer.rejoin import StepBoundaryState, load_state_tensors, process_start_time, state_tensors
from peer.training.optim import DecentralizedOptimizer
from peer.transport.memory import InMemoryFabric
from tests.reference_equations import MatrixTopology


def make(seed: int) -> tuple[torch.nn.Module, DecentralizedOptimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    comm = InMemoryFabric(1, MatrixTopology([np.eye(1)])).communicator(0)
    optimizer = DecentralizedOptimizer(
        model.parameters(), "decentlam", lr=0.1, momentum=0.9, communicator=comm
    )
    return model, optimizer


def train(model: torch.nn.Module, optimizer: DecentralizedOptimizer, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.ones(5, 3)).square().sum().backward()
        optimizer.step()


def test_state_round_trips_parameters_momentum_and_step() -> None:
    source_model, source_opt = make(0)
    train(source_model, source_opt, 3)
    tensors = state_tensors(source_model, source_opt)
    assert any(k.startswith("optimizer/") for k in tensors)
    joiner_model, joiner_opt = make(1)  # different init, no steps
    load_state_tensors(joiner_model, joiner_opt, 3, tensors)
    assert joiner_opt.step_count == 3
    for a, b in zip(
        source_model.state_dict().values(), joiner_model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    # both take the same next step: the momentum came along
    train(source_model, source_opt, 1)
    train(joiner_model, joiner_opt, 1)
    for a, b in zip(source_model.parameters(), joiner_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_state_of_another_model_is_refused() -> None:
    model, optimizer = make(0)
    other = torch.nn.Linear(3, 3)
    with pytest.raises(ValueError, match="does not fit this model"):
        load_state_tensors(other, optimizer, 1, state_tensors(model, optimizer))


def test_provider_answers_at_the_next_step_boundary_or_times_out() -> None:
    model, optimizer = make(0)
    provider = StepBoundaryState(model, optimizer, timeout_seconds=5.0)
    answer: list[tuple[int, dict[str, torch.Tensor]]] = []
    thread = threading.Thread(target=lambda: answer.append(provider()))
    thread.start()
    while not provider._waiting:  # the request is queued until the training thread passes
        thread.join(0.01)
    provider.at_boundary(7)
    thread.join(5)
    assert answer and answer[0][0] == 7
    provider.finish(9)
    assert provider()[0] == 9  # training over: answered directly
    stuck = StepBoundaryState(model, optimizer, timeout_seconds=0.05)
    with pytest.raises(TimeoutError, match="no step boundary"):
        stuck()


def test_process_start_time_is_in_the_past() -> None:
    import time

    assert 0 < time.time() - process_start_time() < 3600
