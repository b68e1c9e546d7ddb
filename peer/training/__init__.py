"""The training side of a peer.

:mod:`~peer.training.optim` (torch optimizers: the rules of :mod:`peer.algorithms` over flat
bucketed buffers, exchanges overlapped with backward), :mod:`~peer.training.trainer` (the
loop), :mod:`~peer.training.tasks` (models and data shards), :mod:`~peer.training.checkpoint`
(atomic checkpoints) and :mod:`~peer.training.metrics` (per-peer Prometheus collectors).

May import :mod:`peer.algorithms`, :mod:`peer.simulation` and the transport interface
:mod:`peer.transport.base`; never a concrete transport, grpc or the launcher.
"""
