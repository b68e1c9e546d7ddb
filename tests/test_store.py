"""Retained versions: staleness lookup, eviction, event-driven waits, snapshots, state packing."""

from __future__ import annotations

import asyncio

import pytest
import torch

from peer.errors import StepEvicted, WireError
from peer.transport.grpc.framing import DEFAULT_CHECKSUM, checksum
from peer.transport.grpc.store import VersionStore, pack_state, snapshot, unpack_state
from peer.transport.grpc.wire import StateHeader


def version(step: int, name: str = "p", value: float = 0.0):
    return snapshot(torch.full((4,), value), name, step)[1]


async def test_lookup_staleness_and_eviction() -> None:
    store = VersionStore(retained_versions=2)
    for step in (1, 2, 3):
        store.insert(version(step))
    assert store.retained_steps() == {"p": [2, 3]}
    assert store.lookup("p", 3, 3).step == 3
    assert store.lookup("p", 5, 3).step == 3  # freshest within [3, 5]
    assert store.lookup("p", 5, 4) is None  # not yet
    with pytest.raises(StepEvicted) as info:
        store.lookup("p", 1, 1)
    assert info.value.oldest_step == 2
    assert store.lookup("q", 1, 1) is None
    assert store.retained_count() == 2


async def test_wait_wakes_on_publish_and_times_out() -> None:
    store = VersionStore(retained_versions=4)
    waiter = asyncio.ensure_future(store.wait_for("p", 2, 2, timeout=5.0))
    await asyncio.sleep(0.01)
    store.insert(version(1))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    store.insert(version(2))
    assert (await asyncio.wait_for(waiter, 1.0)).step == 2
    with pytest.raises(TimeoutError):
        await store.wait_for("p", 9, 9, timeout=0.05)


async def test_publish_wakes_only_the_waiters_of_its_name() -> None:
    """A waiter for bucket "a" is not woken (no re-lookup) by publishes of bucket "b"."""
    store = VersionStore(retained_versions=4)
    looked_up: list[str] = []
    lookup = store.lookup

    def counting(name: str, step: int, min_step: int):  # type: ignore[no-untyped-def]
        looked_up.append(name)
        return lookup(name, step, min_step)

    store.lookup = counting  # type: ignore[method-assign]
    waiter = asyncio.ensure_future(store.wait_for("a", 0, 0, timeout=5.0))
    await asyncio.sleep(0.01)
    for step in range(20):
        store.insert(version(step, name="b"))
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)
    assert looked_up.count("a") == 1, f"waiter of 'a' re-checked {looked_up.count('a')} times"
    store.insert(version(0, name="a"))
    assert (await asyncio.wait_for(waiter, 1.0)).name == "a"
    assert looked_up.count("a") == 2


async def test_encoding_and_checksum_prepared_once_per_version() -> None:
    v = version(1, value=3.0)
    assert v.encoding() is v.encoding() is v.encoding("float32")
    encoding = await v.encoding()
    assert encoding.checksum() is encoding.checksum()
    assert await encoding.checksum() == checksum(DEFAULT_CHECKSUM, v.payload)


def test_snapshot_is_independent_of_later_mutation() -> None:
    tensor = torch.arange(6, dtype=torch.float32).reshape(2, 3).t()  # non-contiguous
    own, v = snapshot(tensor, "p", 0)
    tensor.add_(100)
    assert torch.equal(own, torch.arange(6, dtype=torch.float32).reshape(2, 3).t())
    assert bytes(v.payload) == own.contiguous().numpy().tobytes()
    assert v.shape == (3, 2) and v.dtype == "float32"


def test_state_pack_unpack_round_trip() -> None:
    state = {"params": torch.randn(5), "step_count": torch.tensor([3]), "empty": torch.zeros(0)}
    is_blob, entries, payload = pack_state(state)
    head = StateHeader(0, 9, is_blob, entries, len(payload), 0, 1, 1 << 20)
    back = unpack_state(head, bytearray(payload))
    assert back.step == 9 and back.tensors is not None
    assert all(torch.equal(back.tensors[k], v) for k, v in state.items())
    is_blob, entries, payload = pack_state(b"opaque")
    assert (
        unpack_state(StateHeader(0, 1, is_blob, entries, 6, 0, 1, 8), bytearray(payload)).blob
        == b"opaque"
    )
    no_tensors = StateHeader(0, 1, False, (), 0, 0, 0, 8)
    assert unpack_state(no_tensors, bytearray()).tensors == {}
    _, entries, payload = pack_state({"x": torch.ones(4)})
    with pytest.raises(WireError):
        unpack_state(StateHeader(0, 1, False, entries, 8, 0, 1, 8), bytearray(payload[:8]))


def test_side_stream_is_created_once_under_concurrent_first_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The training thread and autograd hooks may snapshot at once: one copy stream per device
    (a fake stream class stands in for CUDA; it is slow to build to widen the race)."""
    import threading
    import time

    from peer.transport.grpc import store

    built: list[object] = []

    class FakeStream:
        def __init__(self, device: int) -> None:
            time.sleep(0.01)
            built.append(self)

    monkeypatch.setattr(store.torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(store, "_side_streams", {})
    got: list[object] = []
    start = threading.Barrier(8)

    def first_use() -> None:
        start.wait()
        got.append(store._side_stream(torch.device("cuda", 0)))

    threads = [threading.Thread(target=first_use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert len(built) == 1, f"{len(built)} streams built for one device"
    assert all(stream is built[0] for stream in got) and len(got) == 8
