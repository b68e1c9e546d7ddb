"""Pure update rules and learning-rate schedules.

:mod:`~peer.algorithms.rules` holds the seven methods (PmSGD, DSGD, DmSGD, DecentLaM,
AWC-DmSGD, QG-DmSGD, DGD) as two-phase rules split around communication, and
:mod:`~peer.algorithms.schedules` the learning-rate schedules. Both operate on flat tensors,
take time and randomness as arguments and do no I/O. They may import torch and
:mod:`peer.errors` only: never a transport, the training loop, grpc or prometheus.
"""
