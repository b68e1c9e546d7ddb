"""The typed, immutable form of a manifest: one frozen dataclass per section.

Instances are produced by :func:`topology.manifest.parse_manifest`, which validates every
field; this module only defines the shapes, their plain-data form (``to_dict``), the lookups
peers need (``peer``, ``find_peer``) and the manifest digest. Import these names from
:mod:`topology.manifest`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from topology.schema import ManifestError
from topology.topology import Topology

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
LOOPBACK_HOST = "127.0.0.1"


@dataclass(frozen=True)
class PeerSpec:
    """One peer: where it listens and what it runs on.

    Attributes:
        rank: position in the topology, ``0..n-1``.
        name: human-readable name (default ``peer<rank>``).
        host: host name or IP address the peer's gRPC server binds and others dial.
        port: gRPC port.
        metrics_port: Prometheus metrics port, or None for no metrics endpoint.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA if available).
    """

    rank: int
    name: str
    host: str
    port: int
    metrics_port: int | None = None
    device: str = "auto"

    @property
    def address(self) -> str:
        """``host:port`` (IPv6 literals in brackets), as gRPC dials it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, as written in the manifest."""
        return {
            "rank": self.rank,
            "name": self.name,
            "host": self.host,
            "port": self.port,
            "metrics_port": self.metrics_port,
            "device": self.device,
        }


@dataclass(frozen=True)
class TopologySpec:
    """The ``topology`` section: graph, weights and symmetry policy.

    Attributes:
        graph: canonical graph name (see :data:`topology.graphs.GRAPH_NAMES`).
        params: graph constructor parameters (``rows``, ``seed``, ``degree``, ``p``...).
        edges: ``[src, dst]`` pairs for the ``explicit`` graph, else None.
        directed: whether the graph is directed (input for ``explicit``, checked otherwise).
        weights: ``auto``, ``uniform``, ``metropolis`` or ``explicit``.
        matrix: the ``n x n`` matrix for ``explicit`` weights, else None.
        time_varying: whether the graph is time-varying (checked against the graph).
        require_symmetric: ``"warn"``, ``"error"`` or False (see :mod:`topology.checks`).
    """

    graph: str
    params: Mapping[str, Any] = field(default_factory=dict)
    edges: tuple[tuple[int, int], ...] | None = None
    directed: bool = False
    weights: str = "auto"
    matrix: tuple[tuple[float, ...], ...] | None = None
    time_varying: bool = False
    require_symmetric: str | bool = "warn"

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, as written in the manifest."""
        data: dict[str, Any] = {"graph": self.graph, "params": dict(self.params)}
        if self.edges is not None:
            data["edges"] = [list(e) for e in self.edges]
        data["directed"] = self.directed
        data["weights"] = self.weights
        if self.matrix is not None:
            data["matrix"] = [list(row) for row in self.matrix]
        data["time_varying"] = self.time_varying
        data["require_symmetric"] = self.require_symmetric
        return data


@dataclass(frozen=True)
class LrScheduleSpec:
    """``training.lr_schedule``: how the learning rate changes with the step.

    Attributes:
        name: ``constant``, ``warmup`` (linear from 0 over ``warmup_steps``, then constant),
            ``step`` (multiply by ``gamma`` at each milestone) or ``cosine`` (cosine decay to
            ``min_lr`` over the run, after an optional linear warmup).
        warmup_steps: linear warmup length (any schedule may use it).
        milestones: steps at which ``step`` multiplies the lr by ``gamma``.
        gamma: decay factor for ``step``.
        min_lr: final lr for ``cosine``.
    """

    name: str = "constant"
    warmup_steps: int = 0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    min_lr: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, as written in the manifest."""
        return {
            "name": self.name,
            "warmup_steps": self.warmup_steps,
            "milestones": list(self.milestones),
            "gamma": self.gamma,
            "min_lr": self.min_lr,
        }


@dataclass(frozen=True)
class TrainingSpec:
    """The ``training`` section (see the README's manifest reference for every field)."""

    algorithm: str = "decentlam"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 32
    steps: int = 100
    lr_schedule: LrScheduleSpec = field(default_factory=LrScheduleSpec)
    global_average_every: int = 0
    task: str = "digits"
    task_options: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    dtype: str = "float32"
    max_staleness: int = 0
    checkpoint_every: int = 0
    eval_every: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, as written in the manifest."""
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["lr_schedule"] = self.lr_schedule.to_dict()
        data["task_options"] = dict(self.task_options)
        return data


@dataclass(frozen=True)
class ExchangeSpec:
    """The ``exchange`` section: how peers move vectors (chunking, deadlines, retries)."""

    chunk_bytes: int = 1 << 20
    fetch_deadline_seconds: float = 30.0
    connect_deadline_seconds: float = 60.0
    retry_backoff_seconds: float = 0.05
    max_retries: int = 5
    max_staleness: int = 0
    bandwidth_bytes_per_second: int | None = None
    retained_versions: int = 4
    parallel_streams: int = 1
    bucket_bytes: int = 4 << 20

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, as written in the manifest."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class TlsSpec:
    """``security.tls``: PEM files (resolved paths) and whether clients must present a cert."""

    cert: Path
    key: Path
    ca: Path
    mutual: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, as written in the manifest."""
        return {
            "cert": str(self.cert),
            "key": str(self.key),
            "ca": str(self.ca),
            "mutual": self.mutual,
        }


@dataclass(frozen=True)
class SecuritySpec:
    """The ``security`` section: shared-token file and TLS, both optional."""

    token_file: Path | None = None
    tls: TlsSpec | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, as written in the manifest."""
        return {
            "token_file": None if self.token_file is None else str(self.token_file),
            "tls": None if self.tls is None else self.tls.to_dict(),
        }


@dataclass(frozen=True)
class Manifest:
    """A validated cluster manifest (``version: 1``).

    Attributes:
        peers: the peers, sorted by rank (ranks are exactly ``0..n-1``).
        topology, training, exchange, security: the sections.
        version: schema version (1).
        source: the file it was loaded from, if any (not part of equality or the digest).
    """

    peers: tuple[PeerSpec, ...]
    topology: TopologySpec
    training: TrainingSpec = field(default_factory=TrainingSpec)
    exchange: ExchangeSpec = field(default_factory=ExchangeSpec)
    security: SecuritySpec = field(default_factory=SecuritySpec)
    version: int = MANIFEST_VERSION
    source: Path | None = field(default=None, compare=False, repr=False)

    @property
    def world_size(self) -> int:
        """Number of peers."""
        return len(self.peers)

    def peer(self, rank: int) -> PeerSpec:
        """The peer with ``rank``; raises ManifestError if there is none."""
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise ManifestError(
                f"peers: no peer with rank {rank!r} (ranks are 0..{self.world_size - 1})"
            )
        return self.peers[rank]

    def find_peer(self, host: str, port: int) -> PeerSpec:
        """The peer listening on ``host:port`` (``localhost`` matches ``127.0.0.1``).

        Raises:
            ManifestError: no peer has that address.
        """
        wanted = (address_key(host), int(port))
        for spec in self.peers:
            if (address_key(spec.host), spec.port) == wanted:
                return spec
        known = ", ".join(p.address for p in self.peers[:8])
        more = ", ..." if self.world_size > 8 else ""
        raise ManifestError(f"peers: no peer listens on {host}:{port} (peers: {known}{more})")

    def build_topology(self) -> Topology:
        """The validated :class:`~topology.topology.Topology` (built once, then cached)."""
        return self._topology

    @cached_property
    def _topology(self) -> Topology:
        from topology.manifest_parse import build_topology_from_spec

        return build_topology_from_spec(self.topology, self.world_size)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (YAML/JSON-ready) that :func:`parse_manifest` turns back into ``self``."""
        return {
            "version": self.version,
            "peers": [p.to_dict() for p in self.peers],
            "topology": self.topology.to_dict(),
            "training": self.training.to_dict(),
            "exchange": self.exchange.to_dict(),
            "security": self.security.to_dict(),
        }

    def digest(self) -> str:
        """sha256 (hex) of the canonical JSON of everything peers must agree on.

        The ``security`` section is left out: file locations are host-local and may
        legitimately differ between machines running the same cluster.
        """
        data = self.to_dict()
        del data["security"]
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def address_key(host: str) -> str:
    """Normalised host for address comparisons (case-insensitive, localhost = 127.0.0.1)."""
    host = host.strip().lower()
    return LOOPBACK_HOST if host == "localhost" else host
