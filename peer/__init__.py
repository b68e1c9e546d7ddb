"""The peer: one DecentLaM worker, in four layers plus the process that wires them.

* :mod:`peer.algorithms` -- the pure update rules and learning-rate schedules (math only).
* :mod:`peer.simulation` -- the in-process simulator and its test problems (the rules' first
  driver, no network).
* :mod:`peer.transport` -- the :class:`~peer.transport.base.Communicator` interface, its
  in-memory twin, the gRPC exchange engine (:mod:`peer.transport.grpc`) and PmSGD's
  torch.distributed all-reduce.
* :mod:`peer.training` -- the torch optimizers (the rules' second driver, over any
  Communicator), the training loop, tasks, checkpoints and training metrics.
* :mod:`peer.process` -- one peer process: manifest in, transport and trainer built, run.

Imports point down this list and never back up (``tests/test_layers.py`` checks it):
algorithms import nothing of the peer but :mod:`peer.errors`; training sees the transport only
through :mod:`peer.transport.base`; only :mod:`peer.transport.grpc` imports grpc and the
generated stubs; nothing under ``peer`` imports ``launcher``.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("decentlam")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
