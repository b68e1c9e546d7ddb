"""Pure update rules and learning-rate schedules.

:mod:`~peer.algorithms.rules` holds the seven methods (PmSGD, DSGD, DmSGD, DecentLaM,
AWC-DmSGD, QG-DmSGD, DGD) as two-phase rules split around communication,
:mod:`~peer.algorithms.schedules` the learning-rate schedules and
:mod:`~peer.algorithms.stability` the stability analysis of DecentLaM under bounded staleness.
They operate on flat tensors, take time and randomness as arguments and do no I/O. They may
import torch, numpy and :mod:`peer.errors` only: never a transport, the training loop, grpc or
prometheus.
"""
