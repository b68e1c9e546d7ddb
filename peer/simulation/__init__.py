"""The in-process simulator: all ``n`` peers as rows of one ``[n, d]`` tensor.

:mod:`~peer.simulation.simulator` drives the rules of :mod:`peer.algorithms` with an exact mixing
matrix from :mod:`topology`; :mod:`~peer.simulation.problems` holds the problems it (and the
real peers' tasks) train on. May import :mod:`peer.algorithms` and :mod:`topology`; never a
transport, grpc or prometheus.
"""
