"""How a peer talks to its neighbours.

* :mod:`~peer.transport.base` -- the :class:`~peer.transport.base.Communicator` interface
  (partial and global averaging, nonblocking :class:`~peer.transport.base.Handle`) and the
  weight helpers every transport shares. The only module the training layer imports.
* :mod:`~peer.transport.memory` -- the in-memory twin (peers as threads), for fast tests.
* :mod:`~peer.transport.grpc` -- the real exchange engine over gRPC.
* :mod:`~peer.transport.dist` -- PmSGD's all-reduce over torch.distributed (gloo / NCCL).

Transports may import :mod:`peer.errors` and :mod:`topology`; never the training layer, the
process or the launcher.
"""
