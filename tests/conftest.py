"""Shared fixtures: running gRPC peers on 127.0.0.1:0 and a tiny duck-typed topology."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from peer.transport.grpc.communicator import ExchangeConfig, GrpcCommunicator

logger = logging.getLogger(__name__)


@dataclass
class View:
    """What ``topology.Topology.view(rank, k)`` returns, reduced to what the exchange reads."""

    self_weight: float
    in_neighbors: dict[int, float]
    out_neighbors: list[int] = field(default_factory=list)


class ShiftTopology:
    """Peer ``i`` listens to ``i - shift(k)``; ``shifts`` cycles over the period (time-varying).

    Each peer keeps weight 1/2 and gives 1/2 to its single in-neighbour (doubly stochastic).
    """

    def __init__(self, world_size: int, shifts: tuple[int, ...] = (1,)) -> None:
        self.world_size = world_size
        self.shifts = shifts
        self.period = len(shifts)

    def view(self, rank: int, k: int) -> View:
        shift = self.shifts[k % self.period]
        n = self.world_size
        return View(0.5, {(rank - shift) % n: 0.5}, [(rank + shift) % n])


GrpcPeers = Callable[..., list[GrpcCommunicator]]


@pytest.fixture
def grpc_peers() -> Iterator[GrpcPeers]:
    """Factory starting ``n`` connected gRPC peers; all are closed at teardown."""
    started: list[GrpcCommunicator] = []

    def make(
        n: int, *, topology: object = None, config: ExchangeConfig | None = None
    ) -> list[GrpcCommunicator]:
        config = config or ExchangeConfig(fetch_deadline_seconds=10.0)
        comms = []
        for rank in range(n):
            comm = GrpcCommunicator.start(rank, {}, world_size=n, topology=topology, config=config)
            started.append(comm)
            comms.append(comm)
        addresses = {c.rank: c.address for c in comms}
        for comm in comms:
            comm.update_peers(addresses)
        return comms

    try:
        yield make
    finally:
        for comm in started:
            comm.close()
