"""One contract, two transports: the gRPC communicator and the in-memory twin agree."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from peer.errors import ExchangeTimeout, StepEvicted
from peer.transport.base import Communicator
from peer.transport.grpc.communicator import ExchangeConfig
from peer.transport.memory import InMemoryFabric
from tests.conftest import GrpcPeers, ShiftTopology

MakePeers = Callable[..., list[Communicator]]


@pytest.fixture(params=["grpc", "memory"])
def make_peers(request: pytest.FixtureRequest, grpc_peers: GrpcPeers) -> Iterator[MakePeers]:
    """``make(n, topology=None, retained=4, deadline=10.0)`` for the parametrised transport."""

    def make(
        n: int, topology: object = None, retained: int = 4, deadline: float = 10.0
    ) -> list[Communicator]:
        if request.param == "grpc":
            config = ExchangeConfig(retained_versions=retained, fetch_deadline_seconds=deadline)
            return list(grpc_peers(n, topology=topology, config=config))
        fabric = InMemoryFabric(n, topology, retained_versions=retained, deadline_seconds=deadline)
        return [fabric.communicator(r) for r in range(n)]

    yield make


def vectors(n: int, size: int = 1000) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randn(size, generator=generator) for _ in range(n)]


def mixed(
    own: torch.Tensor,
    self_weight: float,
    others: dict[int, torch.Tensor],
    weights: dict[int, float],
) -> torch.Tensor:
    """``w_ii x_i + sum_j w_ij x_j`` written out in float64 (independent of the transports'
    mixing code), returned in the vectors' dtype."""
    total = self_weight * own.double()
    for j, w in weights.items():
        total = total + w * others[j].double()
    return total.to(own.dtype)


def assert_mixed(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_explicit_weights(make_peers: MakePeers) -> None:
    comms = make_peers(3)
    xs = vectors(3)
    weights = {0: {1: 0.25, 2: 0.25}, 1: {0: 0.5}, 2: {0: 0.1, 1: 0.2}}
    handles = [c.neighbor_average_async("p", xs[c.rank], 0, None, weights[c.rank]) for c in comms]
    for comm, handle in zip(comms, handles, strict=True):
        w = weights[comm.rank]
        others = dict(enumerate(xs))
        assert_mixed(handle.wait(5.0), mixed(xs[comm.rank], 1 - sum(w.values()), others, w))
        assert handle.stats.used_steps == dict.fromkeys(w, 0)


def test_topology_view_and_time_varying(make_peers: MakePeers) -> None:
    topology = ShiftTopology(4, shifts=(1, 2, 3))
    comms = make_peers(4, topology)
    xs = vectors(4)
    for step in range(3):
        handles = [c.neighbor_average_async("p", xs[c.rank] + step, step) for c in comms]
        for comm, handle in zip(comms, handles, strict=True):
            src = (comm.rank - topology.shifts[step]) % 4
            expected = mixed(xs[comm.rank] + step, 0.5, {src: xs[src] + step}, {src: 0.5})
            assert_mixed(handle.wait(5.0), expected)
            assert set(handle.stats.used_steps) == {src}


def test_global_average_bit_identical(make_peers: MakePeers) -> None:
    comms = make_peers(3)
    xs = vectors(3, 4097)
    results = [h.wait(5.0) for h in [c.global_average_async("g", xs[c.rank], 3) for c in comms]]
    assert all(torch.equal(results[0], r) for r in results[1:])
    torch.testing.assert_close(results[0], torch.stack(xs).mean(0))


def test_staleness(make_peers: MakePeers) -> None:
    a, b = make_peers(2)
    x = torch.ones(64)
    for step in (1, 2, 3):
        b.neighbor_average_async("p", x * step, step, 1.0, {0: 0.0})
    # T = 2 at step 5: the freshest of steps 3..5 is used at once, its weight damped by
    # 1 / (1 + staleness) and the rest moved to the own vector
    # (peer.transport.base.damp_stale_weights).
    stale = a.neighbor_average_async("p", x, 5, 0.0, {1: 1.0}, max_staleness=2)
    assert torch.equal(stale.wait(5.0), x * (2.0 / 3.0) + (x * 3) * (1.0 / 3.0))
    assert stale.stats.used_steps == {1: 3}
    # T = 0 at step 4 waits until step 4 is published.
    sync = a.neighbor_average_async("p", x, 4, 0.0, {1: 1.0})
    assert not sync.done()
    b.neighbor_average_async("p", x * 4, 4, 1.0, {0: 0.0})
    assert torch.equal(sync.wait(5.0), x * 4)
    assert sync.stats.used_steps == {1: 4}


def test_eviction(make_peers: MakePeers) -> None:
    a, b = make_peers(2, retained=2)
    for step in range(1, 6):
        b.neighbor_average_async("p", torch.zeros(8), step, 1.0, {0: 0.0})
    assert torch.equal(a.neighbor_average("p", torch.zeros(8), 5, 0.0, {1: 1.0}), torch.zeros(8))
    with pytest.raises(StepEvicted) as info:
        a.neighbor_average("p", torch.zeros(8), 1, 0.0, {1: 1.0}, timeout=5.0)
    assert info.value.neighbor == 1 and info.value.step == 1
    assert info.value.oldest_step == 4


def test_deadline_names_neighbor_and_step(make_peers: MakePeers) -> None:
    a, _b = make_peers(2, deadline=0.3)
    handle = a.neighbor_average_async("p", torch.zeros(8), 7, 0.5, {1: 0.5})
    with pytest.raises(ExchangeTimeout) as info:
        handle.wait()
    assert (info.value.neighbor, info.value.step, info.value.name) == (1, 7, "p")
    assert "peer 1" in str(info.value) and "7" in str(info.value)


def test_damp_stale_weights_keeps_rows_stochastic_and_fresh_weights_exact() -> None:
    from peer.transport.base import damp_stale_weights

    assert damp_stale_weights(0.5, {1: 0.25, 2: 0.25}, {1: 7, 2: 7}, 7) == (
        0.5,
        {1: 0.25, 2: 0.25},
    )
    self_weight, weights = damp_stale_weights(0.5, {1: 0.25, 2: 0.25}, {1: 6, 2: 4}, 7)
    assert weights == {1: 0.125, 2: 0.0625}
    assert abs(self_weight + sum(weights.values()) - 1.0) < 1e-15


def test_copy_snapshots_and_handover_does_not(make_peers: MakePeers) -> None:
    a, b = make_peers(2)
    x = torch.ones(1024)
    b.neighbor_average_async("c", x, 0, 1.0, {0: 0.0})  # copied: mutating x is safe
    x.add_(1.0)
    assert torch.equal(
        a.neighbor_average("c", torch.zeros(1024), 0, 0.0, {1: 1.0}), torch.ones(1024)
    )
    handed = torch.full((1024,), 3.0)
    b.neighbor_average_async("h", handed, 0, 1.0, {0: 0.0}, copy=False)  # handed over
    assert torch.equal(a.neighbor_average("h", torch.zeros(1024), 0, 0.0, {1: 1.0}), handed)
