"""The training loop with real optimizers over the in-memory transport.

Peers run as threads of this process (fast); the same checks over real gRPC peer processes live
in ``test_cluster.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from peer.simulation.problems import LinearRegressionProblem
from peer.simulation.simulator import Simulator
from peer.training.optim import make_optimizer
from peer.training.tasks import build_task
from peer.training.trainer import Trainer, TrainerConfig, thread_runqueue_seconds
from peer.transport.memory import InMemoryCommunicator, InMemoryFabric
from topology import make_topology

N = 4
STEPS = 30
LR = 0.05


class AbandoningCommunicator(InMemoryCommunicator):
    """Publishes its vector for ``step`` and then gets a stop request while it waits, as a
    peer does when SIGTERM arrives mid-exchange: its neighbours can complete that step, it
    abandons it, and the peers checkpoint one step apart."""

    def __init__(self, fabric: InMemoryFabric, rank: int, step: int) -> None:
        super().__init__(fabric, rank)
        self.abandon_step = step
        self.stop: Any = None

    def neighbor_average_async(self, name, tensor, step, *args, **kwargs):  # type: ignore[no-untyped-def]
        handle = super().neighbor_average_async(name, tensor, step, *args, **kwargs)
        if step == self.abandon_step and not name.startswith("consensus"):
            self.stop()
        return handle


def _run_threads(
    algorithm: str,
    graph: str,
    steps: int,
    *,
    overlap: bool = False,
    out: Path | None = None,
    resume: bool = False,
    checkpoint_every: int = 0,
    stop_at: int | None = None,
    abandon: tuple[int, int] | None = None,
) -> dict[int, Any]:
    topo = make_topology(graph, N, weights="uniform")
    fabric = InMemoryFabric(N, topo, deadline_seconds=20)
    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    def peer(rank: int) -> None:
        try:
            task = build_task("linreg", rank, N, {"seed": 3, "batch_size": 0})
            comm = fabric.communicator(rank)
            if abandon is not None and rank == abandon[0]:
                comm = AbandoningCommunicator(fabric, rank, abandon[1])
            opt = make_optimizer(
                algorithm, task.model.parameters(), lr=LR, momentum=0.9, communicator=comm,
                overlap=overlap,
            )  # fmt: skip
            trainer = Trainer(
                task, opt, rank=rank, communicator=comm,
                config=TrainerConfig(
                    steps=steps, eval_every=10, checkpoint_dir=out, resume=resume,
                    checkpoint_every=checkpoint_every,
                ),
            )  # fmt: skip
            if isinstance(comm, AbandoningCommunicator):
                comm.stop = trainer.request_stop
            elif stop_at is not None:
                trainer.on_step = lambda k, loss: trainer.request_stop() if k >= stop_at else None
            result = trainer.run()
            results[rank] = (result, task.model.x.detach().clone())
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=peer, args=(r,)) for r in range(N)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
    return results


def _simulate(algorithm: str, graph: str, steps: int) -> torch.Tensor:
    problem = LinearRegressionProblem(n=N, dim=10, samples_per_node=50, seed=3)
    topo = make_topology(graph, N, weights="uniform")
    sim = Simulator(algorithm, topo, problem, lr=LR, momentum=0.9, dtype=torch.float64)
    sim.run(steps)
    return sim.params


@pytest.mark.parametrize("graph", ["ring", "one-peer-exponential"])
@pytest.mark.parametrize("algorithm", ["decentlam", "dmsgd", "dsgd", "qg-dmsgd"])
def test_threaded_peers_equal_simulator(algorithm: str, graph: str) -> None:
    results = _run_threads(algorithm, graph, STEPS, overlap=algorithm == "decentlam")
    expected = _simulate(algorithm, graph, STEPS)
    got = torch.stack([results[r][1] for r in range(N)])
    rel = (got - expected).norm() / expected.norm()
    assert rel <= 1e-10, f"relative difference {rel:.3e}"
    # The final consensus distance ||x_i - sum_j w_ij x_j||, from the final parameters and the
    # mixing matrix of the last evaluation's step (the trainer measures it over the transport).
    W = torch.from_numpy(make_topology(graph, N, weights="uniform").mixing_matrix(STEPS).copy())
    distances = (got - W.to(got.dtype) @ got).norm(dim=1)
    for rank in range(N):
        result = results[rank][0]
        assert result.steps == STEPS and not result.stopped_early
        assert result.bytes_received > 0
        assert result.consensus_distance == pytest.approx(float(distances[rank]), rel=1e-9)
        assert result.consensus_distance > 0  # a few dozen steps do not reach consensus
        assert set(result.eval) == {"loss", "error"}


def test_stop_then_resume_reproduces_uninterrupted_run(tmp_path: Path) -> None:
    full = _run_threads("decentlam", "ring", 20)
    part = _run_threads("decentlam", "ring", 20, out=tmp_path, stop_at=8)
    assert all(part[r][0].stopped_early and part[r][0].steps == 8 for r in range(N))
    resumed = _run_threads("decentlam", "ring", 20, out=tmp_path, resume=True)
    for rank in range(N):
        assert resumed[rank][0].start_step == 8
        assert torch.equal(resumed[rank][1], full[rank][1])
        saved = torch.load(tmp_path / f"rank-{rank}.pt", weights_only=True)
        assert saved["step"] == 20
        assert set(saved) >= {"model", "optimizer", "step", "rng"}


def test_resume_after_a_stop_that_left_peers_a_step_apart(tmp_path: Path) -> None:
    full = _run_threads("decentlam", "ring", 20, overlap=True)
    # peer 0 abandons step 8 after publishing it; the others complete step 8 and stop at 9
    part = _run_threads(
        "decentlam", "ring", 20, overlap=True, out=tmp_path, stop_at=9, abandon=(0, 8)
    )
    assert part[0][0].steps == 8
    assert all(part[r][0].steps == 9 for r in range(1, N))
    resumed = _run_threads("decentlam", "ring", 20, overlap=True, out=tmp_path, resume=True)
    for rank in range(N):
        assert torch.equal(resumed[rank][1], full[rank][1])


def test_runqueue_time_counts_waiting_for_a_core() -> None:
    """The training thread's run-queue time (``step_training_runqueue_seconds``) is time spent
    runnable without a core: pinned to the CPU a spinning process holds, a thread that burns
    0.2 s of CPU waits for about as long again."""
    if thread_runqueue_seconds() is None or not hasattr(os, "sched_setaffinity"):
        pytest.skip("no /proc/thread-self/schedstat or CPU affinity on this platform")
    old = os.sched_getaffinity(0)
    cpu = min(old)
    spin = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True:\n    pass\n"
    busy = subprocess.Popen([sys.executable, "-c", spin])
    try:
        os.sched_setaffinity(0, {cpu})  # this thread only (Linux: pid 0 is the calling thread)
        time.sleep(0.3)  # the spinner is up and pinned
        before = thread_runqueue_seconds()
        started = time.thread_time()
        while time.thread_time() - started < 0.2:
            pass
        after = thread_runqueue_seconds()
    finally:
        os.sched_setaffinity(0, old)
        busy.kill()
        busy.wait(timeout=10)
    assert before is not None and after is not None
    assert after - before > 0.05
    # a sleeping thread is not runnable: no run-queue time however long it sleeps
    idle = thread_runqueue_seconds()
    time.sleep(0.2)
    end = thread_runqueue_seconds()
    assert idle is not None and end is not None and end - idle < 0.05
