"""PmSGD's all-reduce over ``torch.distributed`` behind the
:class:`~peer.transport.base.Communicator` API.

This is what users would otherwise run (gloo on CPU, NCCL on GPU): the same launcher and the
same optimizer code compare decentralized gRPC exchanges against a real all-reduce. Only
``global_average_async`` is supported; a partial average has no meaning here.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Mapping

import torch
import torch.distributed as dist

from peer.errors import ExchangeError, ExchangeTimeout
from peer.transport.base import Communicator, ExchangeStats, Handle

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.0005


class _AllReduceHandle(Handle):
    def __init__(self, work: dist.Work, buffer: torch.Tensor, world_size: int, step: int) -> None:
        self._work = work
        self._buffer = buffer
        self._world_size = world_size
        self._step = step
        self._result: torch.Tensor | None = None
        self.stats = ExchangeStats()

    def done(self) -> bool:
        return self._result is not None or self._work.is_completed()

    def wait_done(self, timeout: float) -> bool:
        # Work.wait(timeout) fails the collective itself when it times out (gloo raises
        # "Operation timed out!"), so a short, repeatable wait polls instead.
        entered = time.monotonic()
        deadline = entered + timeout
        try:
            while not self.done():
                if time.monotonic() >= deadline:
                    return False
                time.sleep(POLL_SECONDS)
            return True
        finally:
            if timeout > 0:
                self.stats.wait_seconds += time.monotonic() - entered

    def wait(self, timeout: float | None = None) -> torch.Tensor:
        if self._result is None:
            if timeout is not None and not self.wait_done(timeout):
                raise ExchangeTimeout(
                    f"all-reduce of step {self._step} did not finish within {timeout} s",
                    step=self._step,
                )
            entered = time.monotonic()
            try:
                # Completed: surfaces a failed collective's error. Without a timeout: blocks,
                # bounded by the process group's own timeout.
                self._work.wait()
            except RuntimeError as exc:  # gloo/NCCL report a failed collective this way
                raise ExchangeError(
                    f"all-reduce of step {self._step} failed: {exc}", step=self._step
                ) from exc
            finally:
                if timeout is None:
                    self.stats.wait_seconds += time.monotonic() - entered
            self._result = self._buffer.div_(self._world_size)
            self.stats.bytes_received = self._buffer.numel() * self._buffer.element_size()
        return self._result


class TorchDistributedCommunicator(Communicator):
    """Global averaging with ``torch.distributed.all_reduce`` (gloo on CPU, NCCL on CUDA).

    Build it with :meth:`start`; ``close()`` destroys the process group.
    """

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self.topology = None

    @classmethod
    def start(
        cls,
        rank: int,
        world_size: int,
        *,
        init_method: str,
        backend: str | None = None,
        timeout_seconds: float = 60.0,
    ) -> TorchDistributedCommunicator:
        """Join the process group (blocks until every rank has joined or the timeout ends).

        Args:
            rank: this peer.
            world_size: number of peers.
            init_method: rendezvous URL, e.g. ``tcp://10.0.0.1:29500``.
            backend: ``gloo``/``nccl``; default NCCL when CUDA is available, else gloo.
            timeout_seconds: rendezvous and collective timeout.
        """
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_seconds),
        )
        logger.info("joined %s process group at %s as rank %d", backend, init_method, rank)
        return cls(rank, world_size)

    def neighbor_average_async(
        self,
        name: str,
        tensor: torch.Tensor,
        step: int,
        self_weight: float | None = None,
        src_weights: Mapping[int, float] | None = None,
        *,
        max_staleness: int = 0,
        copy: bool = True,
    ) -> Handle:
        raise NotImplementedError(
            "torch.distributed transport only averages globally (pmsgd); use the gRPC "
            "communicator for decentralized methods"
        )

    def global_average_async(
        self, name: str, tensor: torch.Tensor, step: int, *, copy: bool = True
    ) -> Handle:
        buffer = tensor.detach().clone() if copy else tensor.detach()
        work = dist.all_reduce(buffer, op=dist.ReduceOp.SUM, async_op=True)
        return _AllReduceHandle(work, buffer, self.world_size, step)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
