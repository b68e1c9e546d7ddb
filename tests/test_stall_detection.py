"""Stall detection: a link silent for ``exchange.stall_seconds`` while a fetch is pending shows in
``decentlam_neighbor_up`` and ``decentlam_neighbor_stalls_total`` while it lasts.

The decisions (:class:`peer.transport.grpc.progress.LinkProgress`) are tested with a fake clock.
The end-to-end tests run two real gRPC peers in this process, the reader dialling the other
through :class:`PausableProxy`, a TCP relay whose forwarding can be paused: a link cut whose
connections stay open and whose bytes are held, not refused, as on a cut cable. The cut is
shorter than the fetch deadline, so the fetch itself never fails.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch
from prometheus_client import CollectorRegistry

from peer.process import neighbor_up_listener
from peer.training.metrics import TrainingMetrics
from peer.transport.grpc.communicator import ExchangeConfig, GrpcCommunicator
from peer.transport.grpc.progress import LinkProgress, StallCheck, StallEvent, StallState
from tests.conftest import ShiftTopology

STALL_SECONDS = 0.5
FETCH_DEADLINE_SECONDS = 15.0


class FakeClock:
    """A monotonic clock the test advances by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_most_silent_pending_neighbour_is_the_one_blamed() -> None:
    clock = FakeClock()
    progress = LinkProgress(2.0, clock)
    progress.fetch_started(1)
    progress.fetch_started(4)
    clock.now += 1.0
    progress.arrived(1)  # peer 1 is streaming; peer 4 has said nothing since the fetch began
    clock.now += 1.0
    assert progress.most_silent({1, 4}) == 4
    assert progress.most_silent({1, 4, 6}) == 6  # never heard from at all
    progress.arrived(4)
    clock.now += 0.5
    assert progress.most_silent([4, 1]) == 1  # peer 1 spoke earlier than peer 4 did
    assert progress.most_silent(()) is None


def test_silent_pending_fetch_stalls_once_and_resumes_on_arrival() -> None:
    clock = FakeClock()
    progress = LinkProgress(2.0, clock)
    assert progress.check().events == ()  # nothing in flight: nothing to say
    progress.fetch_started(3)
    clock.now += 0.9
    assert progress.check() == StallCheck()  # silent, but not for long
    clock.now += 0.2  # 1.1 s: past half the threshold, ask whether it is alive
    assert progress.check().probe == (3,)
    clock.now += 0.5
    assert progress.check().probe == ()  # one probe at a time
    progress.probe_done(3)  # it did not answer
    clock.now += 0.5  # 2.1 s
    check = progress.check()
    assert check.events == (StallEvent(3, StallState.STALLED, pytest.approx(2.1)),)
    assert check.probe == (3,)  # still probing while stalled: a link back is seen at once
    assert progress.stalled() == {3: pytest.approx(2.1)}
    clock.now += 5.0
    assert progress.check().events == ()  # once per stall
    progress.arrived(3)
    check = progress.check()
    assert check.events == (StallEvent(3, StallState.RESUMED, pytest.approx(7.1)),)
    assert progress.stalled() == {}
    clock.now += 1.5
    assert progress.check().events == ()  # silence counts from the last arrival
    clock.now += 1.0
    assert progress.check().events[0].state is StallState.STALLED  # a second stall


def test_answering_neighbour_is_not_stalled_and_failed_fetch_is_abandoned() -> None:
    clock = FakeClock()
    progress = LinkProgress(2.0, clock)
    progress.fetch_started(1)
    progress.fetch_started(1)  # two buckets in flight to one neighbour
    for _ in range(10):  # not ready, but answers every probe: slow, not cut off
        clock.now += 1.5
        check = progress.check()
        assert check.events == ()
        if check.probe:
            progress.arrived(1)
            progress.probe_done(1)
    clock.now += 2.5
    assert progress.check().events[0].state is StallState.STALLED
    progress.fetch_ended(1)
    assert progress.pending(1) == 1 and progress.check().events == ()
    progress.fetch_ended(1)  # both failed (or were cancelled) with nothing arriving
    clock.now += 0.5
    assert progress.check().events == (StallEvent(1, StallState.ABANDONED, pytest.approx(3.0)),)
    assert progress.check().events == () and progress.stalled() == {}
    with pytest.raises(ValueError):
        LinkProgress(0.0)


def test_listener_leaves_a_neighbour_marked_down_at_zero() -> None:
    registry = CollectorRegistry()
    metrics = TrainingMetrics(registry, 0, process_collector=False)
    down = {2}
    listener = neighbor_up_listener(metrics, lambda r: r not in down)

    def value(neighbor: int) -> float | None:
        labels = {"rank": "0", "neighbor": str(neighbor)}
        return registry.get_sample_value("decentlam_neighbor_up", labels)

    for neighbor in (1, 2):
        listener(neighbor, True)
        assert value(neighbor) == 0.0
        listener(neighbor, False)  # its link speaks again
    assert value(1) == 1.0 and value(2) == 0.0  # 2 waits for the membership to re-admit it


class PausableProxy:
    """TCP relay ``127.0.0.1:port -> 127.0.0.1:target``; :meth:`pause` holds every byte (the
    connections stay open) until :meth:`resume`. Every blocking call is bounded; :meth:`close`
    ends the threads."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5.0)
            for sock in (client, upstream):
                sock.settimeout(0.1)
                self._sockets.append(sock)
            for src, dst in ((client, upstream), (upstream, client)):
                thread = threading.Thread(target=self._pump, args=(src, dst), daemon=True)
                self._threads.append(thread)
                thread.start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self._closed.is_set():
                try:
                    data = src.recv(1 << 16)
                except TimeoutError:
                    continue
                if not data:
                    return
                while not self._flowing.wait(0.1):
                    if self._closed.is_set():
                        return
                dst.sendall(data)
        except OSError:
            return

    def close(self) -> None:
        self._closed.set()
        self._flowing.set()
        self._listener.close()
        for sock in self._sockets:
            sock.close()
        for thread in self._threads:
            thread.join(5.0)


Pair = tuple[GrpcCommunicator, GrpcCommunicator, PausableProxy, CollectorRegistry]


@pytest.fixture
def reader_through_proxy() -> Iterator[Pair]:
    """(source peer 0, reader peer 1 dialling 0 through a proxy, the proxy, 1's registry)."""
    topology = ShiftTopology(2)  # 1 reads 0 and 0 reads 1, weights 1/2
    config = ExchangeConfig(
        fetch_deadline_seconds=FETCH_DEADLINE_SECONDS, stall_seconds=STALL_SECONDS
    )
    registry = CollectorRegistry()
    source = GrpcCommunicator.start(0, {}, topology=topology, config=config, world_size=2)
    proxy = PausableProxy(source.port)
    reader = GrpcCommunicator.start(
        1, {0: proxy.address}, topology=topology, config=config, world_size=2, registry=registry
    )
    try:
        yield source, reader, proxy, registry
    finally:
        reader.close()
        proxy.close()
        source.close()


def wait_until(condition: Callable[[], bool], timeout: float) -> float:
    """Seconds until ``condition()`` held; fails after ``timeout``."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, "condition not met in time"
        time.sleep(0.02)
    return time.monotonic() - started


@pytest.mark.timeout(60)
def test_cut_shorter_than_the_deadline_drops_neighbor_up_while_it_lasts(
    reader_through_proxy: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    source, reader, proxy, registry = reader_through_proxy
    metrics = TrainingMetrics(registry, 1, process_collector=False)
    metrics.set_neighbor_up(0, True)
    reader.set_stall_listener(neighbor_up_listener(metrics))
    reader.wait_for_neighbors(timeout=10.0)  # the connection through the proxy is up

    def up() -> float | None:
        return registry.get_sample_value("decentlam_neighbor_up", {"rank": "1", "neighbor": "0"})

    def stalls() -> float:
        labels = {"rank": "1", "neighbor": "0"}
        return registry.get_sample_value("decentlam_neighbor_stalls_total", labels) or 0.0

    caplog.set_level(logging.INFO, logger="peer.transport.grpc.node")
    own = torch.zeros(1000)
    for step in range(2):  # two cuts: the counter counts each once
        proxy.pause()
        handle = reader.neighbor_average_async("v", own, step)
        source.publish("v", torch.full((1000,), float(step + 1)), step)  # held by the cut
        dropped = wait_until(lambda: up() == 0.0, timeout=FETCH_DEADLINE_SECONDS / 2)
        assert STALL_SECONDS * 0.8 <= dropped < STALL_SECONDS + 2.0
        assert stalls() == step + 1 and not handle.done()
        assert set(reader.stalled_neighbors()) == {0}
        time.sleep(3 * STALL_SECONDS)
        assert stalls() == step + 1 and up() == 0.0  # once per stall, still down
        proxy.resume()
        mixed = handle.wait(FETCH_DEADLINE_SECONDS)
        torch.testing.assert_close(mixed, torch.full((1000,), (step + 1) / 2))
        wait_until(lambda: up() == 1.0, timeout=2.0)
        assert reader.stalled_neighbors() == {}
    stalled = [r for r in caplog.records if "with a fetch pending: stalled" in r.getMessage()]
    resumed = [r for r in caplog.records if "stall over" in r.getMessage()]
    assert len(stalled) == 2 and len(resumed) == 2, [r.getMessage() for r in caplog.records]
    assert all(r.levelno == logging.WARNING for r in stalled + resumed)
    assert f"neighbour 0 ({proxy.address}) silent for" in stalled[0].getMessage()
    errors = [
        sample
        for family in registry.collect()
        for sample in family.samples
        if sample.name == "decentlam_exchange_errors_total"
    ]
    assert errors == []  # the fetches themselves never failed


@pytest.mark.timeout(60)
def test_neighbour_that_answers_but_has_not_published_is_not_stalled(
    reader_through_proxy: Pair,
) -> None:
    source, reader, _, registry = reader_through_proxy
    events: list[tuple[int, bool]] = []
    reader.set_stall_listener(lambda neighbor, stalled: events.append((neighbor, stalled)))
    handle = reader.neighbor_average_async("v", torch.zeros(10), 0)
    time.sleep(4 * STALL_SECONDS)  # a slow neighbour: silent on the fetch, answers Info
    assert not handle.done()
    source.publish("v", torch.ones(10), 0)
    torch.testing.assert_close(handle.wait(FETCH_DEADLINE_SECONDS), torch.full((10,), 0.5))
    assert events == []
    labels = {"rank": "1", "neighbor": "0"}
    assert registry.get_sample_value("decentlam_neighbor_stalls_total", labels) is None
