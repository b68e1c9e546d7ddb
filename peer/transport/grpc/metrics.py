"""Prometheus collectors of a peer.

Every communicator owns an :class:`ExchangeMetrics` bound to its own
:class:`~prometheus_client.CollectorRegistry`, so several peers can live in one process (tests,
simulators) without clashing. Metric work is done per fetch or per request, never per chunk.
Training metrics will be added to this module by the training loop.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Histogram

from peer.transport.base import LATENCY_BUCKETS_SECONDS

logger = logging.getLogger(__name__)

# 1 ms .. 60 s, roughly x2.5 per bucket.

EDGE_LABELS = ("rank", "neighbor")


class ExchangeMetrics:
    """Collectors of one peer's exchange engine, client side and server side.

    Args:
        registry: the registry to register with (one per communicator).
        rank: this peer's rank (the ``rank`` label of every series).
    """

    def __init__(self, registry: CollectorRegistry, rank: int) -> None:
        self.registry = registry
        self.rank = str(rank)
        self.latency_seconds = Histogram(
            "decentlam_exchange_latency_seconds",
            "Time from starting a fetch to the neighbour's vector being fully received.",
            EDGE_LABELS,
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=registry,
        )
        self.received_bytes = Counter(
            "decentlam_exchange_received_bytes",
            "Payload bytes received from a neighbour, as on the wire.",
            EDGE_LABELS,
            registry=registry,
        )
        self.sent_bytes = Counter(
            "decentlam_exchange_sent_bytes",
            "Payload bytes served to a reader (neighbor = the reader), as on the wire.",
            EDGE_LABELS,
            registry=registry,
        )
        self.received_chunks = Counter(
            "decentlam_exchange_received_chunks",
            "Chunk messages received from a neighbour.",
            EDGE_LABELS,
            registry=registry,
        )
        self.sent_chunks = Counter(
            "decentlam_exchange_sent_chunks",
            "Chunk messages served to a reader (neighbor = the reader).",
            EDGE_LABELS,
            registry=registry,
        )
        self.retries = Counter(
            "decentlam_exchange_retries",
            "Fetch attempts retried after UNAVAILABLE.",
            EDGE_LABELS,
            registry=registry,
        )
        self.errors = Counter(
            "decentlam_exchange_errors",
            "Failed fetches by gRPC status code name.",
            (*EDGE_LABELS, "code"),
            registry=registry,
        )
        self.stalls = Counter(
            "decentlam_neighbor_stalls",
            "Times a neighbour with a fetch pending went silent for exchange.stall_seconds.",
            EDGE_LABELS,
            registry=registry,
        )
        self.wait_seconds = Histogram(
            "decentlam_exchange_wait_seconds",
            "Time the training thread spent blocked in handle.wait.",
            ("rank",),
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=registry,
        )
        self.server_request_seconds = Histogram(
            "decentlam_server_request_seconds",
            "Server-side handling time of one RPC (includes waiting for a step to be published).",
            ("rank", "method"),
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=registry,
        )

    def fetched(self, neighbor: int, seconds: float, nbytes: int, chunks: int) -> None:
        """Record one completed fetch from ``neighbor``."""
        labels = (self.rank, str(neighbor))
        self.latency_seconds.labels(*labels).observe(seconds)
        self.received_bytes.labels(*labels).inc(nbytes)
        self.received_chunks.labels(*labels).inc(chunks)

    def served(self, reader: int, nbytes: int, chunks: int) -> None:
        """Record one Fetch stream served to ``reader``."""
        labels = (self.rank, str(reader))
        self.sent_bytes.labels(*labels).inc(nbytes)
        self.sent_chunks.labels(*labels).inc(chunks)

    def retried(self, neighbor: int) -> None:
        """Record one retry of a fetch from ``neighbor``."""
        self.retries.labels(self.rank, str(neighbor)).inc()

    def failed(self, neighbor: int, code: str) -> None:
        """Record one failed fetch from ``neighbor`` with gRPC status name ``code``."""
        self.errors.labels(self.rank, str(neighbor), code).inc()

    def stalled(self, neighbor: int) -> None:
        """Record one stall of ``neighbor`` (silent with a fetch pending)."""
        self.stalls.labels(self.rank, str(neighbor)).inc()

    def waited(self, seconds: float) -> None:
        """Record time spent blocked in ``handle.wait``."""
        self.wait_seconds.labels(self.rank).observe(seconds)

    def handled(self, method: str, seconds: float) -> None:
        """Record the server-side handling time of one ``method`` call."""
        self.server_request_seconds.labels(self.rank, method).observe(seconds)
