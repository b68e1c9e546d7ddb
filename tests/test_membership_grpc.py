"""Live membership over real gRPC peers in one process: a dead peer, a cut and restored link.

Each peer publishes the one-hot vector ``e_i``, so the mixed vector it gets back IS its row of
the live ``W``: the tests read the matrix the peers actually used and check it against the
reference equations (symmetric doubly stochastic once views agree, the topology's own row bit
for bit when there is no fault).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from peer.errors import FellBehind, StepEvicted
from peer.transport.grpc.communicator import ExchangeConfig, GrpcCommunicator
from tests.conftest import GrpcPeers
from tests.test_live_graph import reference_live_matrix
from topology import make_topology

N = 4
CONFIG = ExchangeConfig(
    fetch_deadline_seconds=10.0, failure_detection_seconds=1.0, probe_interval_seconds=0.05
)


def run_steps(
    comms: list[GrpcCommunicator], steps: int, stop_after: dict[int, int] | None = None
) -> dict[int, dict[int, np.ndarray]]:
    """Every peer in its own thread runs ``steps`` exchanges; returns ``rows[step][rank]``."""
    rows: dict[int, dict[int, np.ndarray]] = {k: {} for k in range(steps)}
    errors: list[BaseException] = []

    def peer(comm: GrpcCommunicator) -> None:
        own = torch.zeros(N, dtype=torch.float64)
        own[comm.rank] = 1.0
        try:
            for k in range(steps):
                if stop_after and k >= stop_after.get(comm.rank, steps):
                    comm.close()
                    return
                rows[k][comm.rank] = comm.neighbor_average("v", own, k).numpy()
                comm.set_current_step(k + 1)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=peer, args=(c,)) for c in comms]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return rows


def matrix(rows: dict[int, np.ndarray]) -> np.ndarray:
    W = np.eye(N)
    for rank, row in rows.items():
        W[rank] = row
    return W


@pytest.mark.timeout(60)
def test_dead_peer_is_dropped_and_the_rest_mix_on_the_live_graph(grpc_peers: GrpcPeers) -> None:
    topo = make_topology("ring", N)
    comms = grpc_peers(N, topology=topo, config=CONFIG)
    rows = run_steps(comms, 8, stop_after={3: 2})
    W = topo.mixing_matrix()
    for k in (0, 1):
        assert matrix(rows[k]).tolist() == W.tolist()  # fault-free: bit for bit
    for k in range(2, 8):
        assert sorted(rows[k]) == [0, 1, 2]  # survivors finish every step
        live = matrix(rows[k])
        np.testing.assert_allclose(live.sum(axis=1), 1.0, atol=1e-12)
    for k in range(4, 8):  # every survivor has seen peer 3 down: views agree
        live = matrix(rows[k])
        np.testing.assert_allclose(live, reference_live_matrix(W, {0, 1, 2}), atol=1e-15)
        np.testing.assert_allclose(live, live.T, atol=1e-15)
    assert comms[0].link_states() == {1: True, 3: False}
    assert all(comms[1].link_states().values())


@pytest.mark.timeout(60)
def test_cut_link_is_dropped_then_readmitted(grpc_peers: GrpcPeers) -> None:
    topo = make_topology("ring", N)
    comms = grpc_peers(N, topology=topo, config=CONFIG)
    comms[1]._node.link_cut = lambda src, dst, step: src == 0 and 3 <= step < 6
    rows = run_steps(comms, 30)
    W = topo.mixing_matrix()
    for k in range(30):
        live = matrix(rows[k])
        np.testing.assert_allclose(live.sum(axis=1), 1.0, atol=1e-12)
        assert (live >= 0).all()
    assert matrix(rows[4])[1, 0] == 0 and matrix(rows[4])[0, 1] == 0  # both ends dropped it
    np.testing.assert_allclose(matrix(rows[4]), matrix(rows[4]).T, atol=1e-15)
    for k in range(25, 30):  # re-admitted: the topology's matrix again, bit for bit
        assert matrix(rows[k]).tolist() == W.tolist()
    assert comms[1].membership is not None and comms[1].membership.changes == 2


@pytest.mark.timeout(60)
def test_peer_far_behind_gets_fell_behind(grpc_peers: GrpcPeers) -> None:
    topo = make_topology("ring", 3)
    a, b, c = grpc_peers(3, topology=topo, config=CONFIG)
    for k in range(10):  # b and c ran ahead while a was stopped
        for comm in (b, c):
            comm.publish("v", torch.ones(2), k)
            comm.set_current_step(k + 1)
    with pytest.raises(FellBehind, match="fell behind") as caught:
        a.neighbor_average("v", torch.zeros(2), 1)
    assert caught.value.neighbor in (1, 2)
    # An evicted step is reported by the neighbour's oldest retained step, not the last step
    # membership saw from it (stale: in a user trial it read "peer 0 is at step 99" to a peer at
    # step 101).
    assert "no longer retains it (its oldest retained step is 6)" in str(caught.value)
    assert caught.value.step == 6


@pytest.mark.timeout(60)
def test_skipped_steps_are_refused_at_once_and_mark_the_neighbour_down(
    grpc_peers: GrpcPeers,
) -> None:
    topo = make_topology("ring", 3)
    a, b, _ = grpc_peers(3, topology=topo, config=CONFIG)
    for k in (0, 1, 5):  # b rejoined at step 5 from a neighbour's state: 2..4 never come
        b.publish("v", torch.ones(2), k)
    started = time.monotonic()
    with pytest.raises(StepEvicted, match="skipped"):
        a.fetch(1, "v", 3, like=torch.empty(2), timeout=5)
    assert time.monotonic() - started < 2.0
    a.neighbor_average("v", torch.zeros(2), 3)  # live mode: b is down for a, not fatal
    assert a.link_states()[1] is False
