"""The manifest schema: one frozen pydantic dataclass per section, with its validation.

Each field is defined once here, with its type, range and default; the JSON Schema that
editors use (``decentlam manifest schema``), the validation of ``decentlam manifest check``
and the settings the peers run with all come from these definitions. Checks that involve
several fields live in the validators of the section that holds them; checks that need the
number of peers (ranks, edges, the topology build) live in :class:`Manifest`'s validator,
which builds the :class:`~topology.topology.Topology` once and keeps it.

Validation reads one way: field types (:mod:`topology.schema`) -> sections -> manifest ->
topology (:mod:`topology.graphs`, :mod:`topology.topology`). Reading files and YAML is
:mod:`topology.manifest`'s job; import the names below from there.

A new setting is one field of its section: ``name: Annotated[StrictInt, Field(ge=..., le=...,
description=...)] = default`` (:data:`~topology.schema.Number` for reals, a ``Literal`` for
choices). Its errors, its JSON Schema entry and its default then follow; regenerate the shipped
schema (``decentlam manifest schema -o topology/manifest.schema.json``) and add its row to the
README's manifest reference (tests check both).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
import typing
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass

from topology.checks import TopologyError
from topology.graphs import (
    GRAPH_ALIASES,
    GRAPH_NAMES,
    GRAPH_PARAMS,
    Graph,
    canonical_graph_name,
    from_edges,
    make_graph,
    unreachable_peers,
)
from topology.schema import (
    ManifestError,
    NonEmptyStr,
    Number,
    StrictBool,
    StrictInt,
    describe,
    fail,
    join_path,
    raise_manifest_errors,
)
from topology.spectral import max_stable_momentum, momentum_consensus_growth
from topology.topology import Topology

logger = logging.getLogger(__name__)

MANIFEST_VERSION: Literal[1] = 1
LOOPBACK_HOST = "127.0.0.1"

Algorithm = Literal["decentlam", "dmsgd", "dsgd", "pmsgd", "awc-dmsgd", "qg-dmsgd", "dgd"]
LrScheduleName = Literal["constant", "warmup", "step", "cosine"]
Dtype = Literal["float32", "float64"]
Weights = Literal["auto", "uniform", "metropolis", "explicit"]
WireDtype = Literal["float32", "bfloat16", "float16"]
WireCodec = Literal["none", "top-byte-huffman"]
SymmetryPolicy = Literal["warn", "error", False]

ALGORITHMS: tuple[str, ...] = typing.get_args(Algorithm)
LR_SCHEDULES: tuple[str, ...] = typing.get_args(LrScheduleName)
DTYPES: tuple[str, ...] = typing.get_args(Dtype)
WEIGHTS: tuple[str, ...] = typing.get_args(Weights)
#: Largest ``exchange.chunk_bytes``: a chunk and its header must fit in one gRPC message, which
#: the transport caps at twice this (``ExchangeConfig.max_message_bytes``).
MAX_CHUNK_BYTES = 32 << 20

_DEVICE = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")
# A builtin task name ("digits", "synthetic-image") or an import path "package.module:factory".
_TASK = re.compile(r"^([a-z0-9][a-z0-9_-]*|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$")
_PORT = Annotated[StrictInt, Field(ge=1, le=65535)]
_COUNT = Annotated[StrictInt, Field(ge=0)]


def _section_config(required: tuple[str, ...] | None = None) -> ConfigDict:
    """Config of every section: unknown keys rejected; ``required`` overrides the schema's."""

    def adjust(schema: dict[str, Any]) -> None:
        if required is not None:
            schema["required"] = list(required)

    return ConfigDict(extra="forbid", json_schema_extra=adjust)


def _empty_if_none(value: Any) -> Any:
    """An absent (``null``) section reads as an empty mapping: all defaults."""
    return {} if value is None else value


@raise_manifest_errors()
@dataclass(frozen=True, config=_section_config(required=("port",)))
class PeerSpec:
    """One peer: where it listens and what it runs on.

    Attributes:
        rank: position in the topology, ``0..n-1`` (default: its index in ``peers``).
        name: human-readable name (default ``peer<rank>``).
        host: host name or IP address the peer's gRPC server binds and others dial.
        port: gRPC port.
        metrics_port: Prometheus metrics port, or None for no metrics endpoint.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA if available).
        bind: local address the gRPC server and the metrics endpoint listen on; None: the
            host itself when it is a loopback address, else every interface (``0.0.0.0``).
    """

    rank: Annotated[
        StrictInt,
        Field(
            description="Position in the topology, 0..n-1 (default: list index).",
            json_schema_extra={"minimum": 0},
        ),
    ]
    name: Annotated[NonEmptyStr, Field(description="Human-readable name (default peer<rank>).")]
    host: Annotated[
        NonEmptyStr,
        Field(description="Host name or IP the peer binds and others dial (default 127.0.0.1)."),
    ]
    port: Annotated[_PORT, Field(description="gRPC port.")]
    metrics_port: Annotated[
        _PORT | None, Field(description="Prometheus metrics port (null: no endpoint).")
    ] = None
    device: Annotated[
        NonEmptyStr,
        Field(
            description="cpu, cuda, cuda:N or auto (CUDA if available).",
            json_schema_extra={"pattern": _DEVICE.pattern},
        ),
    ] = "auto"
    bind: Annotated[
        NonEmptyStr | None,
        Field(
            description="Local address the gRPC server and metrics endpoint listen on (null: "
            "the host if it is a loopback address, else all interfaces, 0.0.0.0)."
        ),
    ] = None

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            data.setdefault("host", LOOPBACK_HOST)
            if isinstance(data.get("rank"), int):
                data.setdefault("name", f"peer{data['rank']}")
        return data

    @field_validator("host")
    @classmethod
    def _check_host(cls, host: str) -> str:
        host = host.strip()
        if any(c.isspace() for c in host) or "/" in host or host.count(":") == 1:
            hint = "; put the port in 'port'" if host.count(":") == 1 else ""
            fail(f"{host!r} is not a host name or IP{hint}")
        return host

    @field_validator("bind")
    @classmethod
    def _check_bind(cls, bind: str | None) -> str | None:
        if bind is not None and (any(c.isspace() for c in bind) or bind.count(":") == 1):
            fail(f"{bind!r} is not an address (no port: the peer's ports are used)")
        return bind

    @field_validator("device")
    @classmethod
    def _check_device(cls, device: str) -> str:
        if not _DEVICE.match(device):
            fail(f"invalid device {device!r} (expected cpu, cuda, cuda:N or auto)")
        return device

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
            # Only when set: manifests without it (and their digests) stay as they were.
            **({} if self.bind is None else {"bind": self.bind}),
        }


def _check_edges(value: Any) -> Any:
    """Shape of ``topology.edges``: pairs of distinct integer ranks (range checked later)."""
    if value is None or not isinstance(value, list | tuple):
        return value
    for index, edge in enumerate(value):
        if not isinstance(edge, list | tuple) or len(edge) != 2:
            fail(f"expected a pair [src, dst], got {describe(edge)}", index)
        for end in edge:
            if isinstance(end, bool) or not isinstance(end, int):
                fail(f"ranks must be integers, got {describe(end)}", index)
        if edge[0] == edge[1]:
            fail(f"{list(edge)} is a self loop (self weights are implicit)", index)
    return value


def _check_matrix(value: Any) -> Any:
    """Shape of ``topology.matrix``: rows of numbers (size checked against n later)."""
    if value is None or not isinstance(value, list | tuple):
        return value
    for index, row in enumerate(value):
        if not isinstance(row, list | tuple):
            fail(f"expected a list of numbers, got {describe(row)}", index)
        for item in row:
            if isinstance(item, bool) or not isinstance(item, int | float):
                fail(f"expected numbers, got {describe(item)}", index)
    return value


def _graph_name(value: Any) -> Any:
    if not isinstance(value, str) or not value.strip():
        fail(f"expected a non-empty string, got {describe(value)}")
    try:
        return canonical_graph_name(value)
    except ValueError as exc:
        fail(str(exc))


def _symmetry_policy(value: Any) -> Any:
    if value is True:
        return "error"
    if value is False or value in ("warn", "error"):
        return value
    fail(f"expected 'warn', 'error' or false, got {describe(value)}")


@raise_manifest_errors("topology", root=lambda: Manifest)
@dataclass(frozen=True, config=_section_config())
class TopologySpec:
    """The ``topology`` section: graph, weights and symmetry policy.

    Attributes:
        graph: canonical graph name (see :data:`topology.graphs.GRAPH_NAMES`).
        params: graph constructor parameters (``rows``, ``seed``, ``degree``, ``p``...).
        edges: ``[src, dst]`` pairs for the ``explicit`` graph, else None.
        directed: whether the graph is directed (input for ``explicit``, checked otherwise;
            resolved from the graph by :class:`Manifest` when absent).
        weights: ``auto``, ``uniform``, ``metropolis`` or ``explicit``.
        matrix: the ``n x n`` matrix for ``explicit`` weights, else None.
        time_varying: whether the graph is time-varying (checked against the graph; resolved
            by :class:`Manifest` when absent).
        require_symmetric: ``"warn"``, ``"error"`` or False (see :mod:`topology.checks`).
    """

    graph: Annotated[
        str,
        BeforeValidator(_graph_name),
        Field(
            description="Graph name (aliases accepted).",
            json_schema_extra={"enum": [*GRAPH_NAMES, *GRAPH_ALIASES]},
        ),
    ]
    params: Annotated[
        dict[str, Any],
        BeforeValidator(_empty_if_none),
        Field(description="Graph parameters: rows (grid, torus), degree, p, seed, center..."),
    ] = dataclasses.field(default_factory=dict)
    edges: Annotated[
        tuple[tuple[StrictInt, StrictInt], ...] | None,
        BeforeValidator(_check_edges),
        Field(description="[src, dst] rank pairs of the explicit graph."),
    ] = None
    directed: Annotated[
        StrictBool | None, Field(description="Directed graph (input for explicit, else checked).")
    ] = None
    weights: Annotated[Weights, Field(description="Mixing weight scheme.")] = "auto"
    matrix: Annotated[
        tuple[tuple[Number, ...], ...] | None,
        BeforeValidator(_check_matrix),
        Field(description="The n x n mixing matrix for weights: explicit."),
    ] = None
    time_varying: Annotated[
        StrictBool | None, Field(description="Checked against the graph when given.")
    ] = None
    require_symmetric: Annotated[
        SymmetryPolicy,
        BeforeValidator(_symmetry_policy, json_schema_input_type=Literal["warn", "error"] | bool),
        Field(description="A non-symmetric mixing matrix: warn, error (true) or accept (false)."),
    ] = "warn"

    @model_validator(mode="after")
    def _check_fields(self) -> TopologySpec:
        if self.graph == "explicit":
            if self.params:
                fail("graph 'explicit' takes no params; use 'edges'", "params")
        elif self.edges is not None:
            fail(f"only used with graph 'explicit', not {self.graph!r}", "edges")
        else:
            accepted = GRAPH_PARAMS[self.graph]
            for key in self.params:
                if key not in accepted:
                    fail(
                        f"graph {self.graph!r} does not take this parameter "
                        f"(accepted: {', '.join(accepted) or 'none'})",
                        "params",
                        key,
                    )
        if self.weights != "explicit" and self.matrix is not None:
            fail("only used with weights 'explicit'", "matrix")
        return self

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


@raise_manifest_errors("training", "lr_schedule", root=lambda: Manifest)
@dataclass(frozen=True, config=_section_config())
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

    name: Annotated[LrScheduleName, Field(description="Schedule.")] = "constant"
    warmup_steps: Annotated[_COUNT, Field(description="Linear warmup length in steps.")] = 0
    milestones: Annotated[
        tuple[StrictInt, ...], Field(description="Steps at which 'step' multiplies lr by gamma.")
    ] = ()
    gamma: Annotated[Number, Field(gt=0.0, le=1.0, description="Decay factor of 'step'.")] = 0.1
    min_lr: Annotated[Number, Field(ge=0.0, description="Final lr of 'cosine'.")] = 0.0

    @model_validator(mode="after")
    def _check_fields(self) -> LrScheduleSpec:
        if self.name == "warmup" and self.warmup_steps == 0:
            fail("must be > 0 for the warmup schedule", "warmup_steps")
        previous = 0
        for index, milestone in enumerate(self.milestones):
            if milestone <= previous:
                fail(f"{milestone} must be > {previous} (strictly increasing)", "milestones", index)
            previous = milestone
        if self.name == "step" and not self.milestones:
            fail("the step schedule needs at least one step", "milestones")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, as written in the manifest."""
        return {
            "name": self.name,
            "warmup_steps": self.warmup_steps,
            "milestones": list(self.milestones),
            "gamma": self.gamma,
            "min_lr": self.min_lr,
        }


def _schedule_shorthand(value: Any) -> Any:
    """``lr_schedule: cosine`` is short for ``lr_schedule: {name: cosine}``."""
    if value is None:
        return {}
    return {"name": value} if isinstance(value, str) else value


def _task_name(task: str) -> str:
    if not _TASK.match(task):
        fail(
            f"invalid task {task!r} (expected a builtin name such as 'digits' "
            f"or 'package.module:factory')"
        )
    return task


@raise_manifest_errors("training", root=lambda: Manifest)
@dataclass(frozen=True, config=_section_config())
class TrainingSpec:
    """The ``training`` section (see the README's manifest reference for every field)."""

    algorithm: Annotated[Algorithm, Field(description="Decentralized optimizer.")] = "decentlam"
    lr: Annotated[Number, Field(gt=0.0, description="Learning rate.")] = 0.1
    momentum: Annotated[Number, Field(ge=0.0, lt=1.0, description="Momentum factor.")] = 0.9
    weight_decay: Annotated[Number, Field(ge=0.0, description="L2 weight decay.")] = 0.0
    batch_size: Annotated[StrictInt, Field(ge=1, description="Per-peer batch size.")] = 32
    steps: Annotated[StrictInt, Field(ge=1, description="Training steps per peer.")] = 100
    lr_schedule: Annotated[
        LrScheduleSpec,
        BeforeValidator(
            _schedule_shorthand, json_schema_input_type=LrScheduleName | LrScheduleSpec
        ),
        Field(description="Learning-rate schedule (a name or a mapping)."),
    ] = dataclasses.field(default_factory=LrScheduleSpec)
    global_average_every: Annotated[
        _COUNT, Field(description="Exact global average every k steps (0: never).")
    ] = 0
    task: Annotated[
        NonEmptyStr,
        Field(
            description="Builtin task name or 'package.module:factory'.",
            json_schema_extra={"pattern": _TASK.pattern},
        ),
    ] = "digits"
    task_options: Annotated[
        dict[str, Any], BeforeValidator(_empty_if_none), Field(description="Options of the task.")
    ] = dataclasses.field(default_factory=dict)
    seed: Annotated[_COUNT, Field(description="Random seed of the run.")] = 0
    dtype: Annotated[Dtype, Field(description="Parameter dtype.")] = "float32"
    max_staleness: Annotated[
        _COUNT, Field(description="Steps a neighbour's vector may lag (0: synchronous).")
    ] = 0
    checkpoint_every: Annotated[_COUNT, Field(description="Checkpoint every k steps (0: off).")] = 0
    eval_every: Annotated[_COUNT, Field(description="Evaluate every k steps (0: at the end).")] = 0

    @field_validator("task")
    @classmethod
    def _check_task(cls, task: str) -> str:
        return _task_name(task)

    @model_validator(mode="after")
    def _check_fields(self) -> TrainingSpec:
        if self.lr_schedule.min_lr > self.lr:
            min_lr = self.lr_schedule.min_lr
            fail(f"{min_lr} is above training.lr ({self.lr})", "lr_schedule", "min_lr")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, as written in the manifest."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["lr_schedule"] = self.lr_schedule.to_dict()
        data["task_options"] = dict(self.task_options)
        return data


@raise_manifest_errors("exchange", root=lambda: Manifest)
@dataclass(frozen=True, config=_section_config())
class ExchangeSpec:
    """The ``exchange`` section: how peers move vectors (chunking, deadlines, retries).

    The one definition (type, range, default) of each exchange setting: the gRPC transport's
    :class:`~peer.transport.grpc.node.ExchangeConfig` is built from it (``from_spec``) and
    takes its defaults and checks from here; ``bucket_bytes`` is the optimizer's bucket size
    and ``max_staleness`` the training bound.
    """

    chunk_bytes: Annotated[
        StrictInt, Field(ge=1, le=MAX_CHUNK_BYTES, description="Bytes per streamed chunk.")
    ] = 1 << 20
    fetch_deadline_seconds: Annotated[
        Number, Field(gt=0.0, description="Deadline of one fetch of a neighbour's vector.")
    ] = 30.0
    connect_deadline_seconds: Annotated[
        Number,
        Field(
            gt=0.0,
            description="Waiting for neighbours at start-up, and deadline of local set-up steps.",
        ),
    ] = 60.0
    retry_backoff_seconds: Annotated[
        Number, Field(ge=0.0, description="First back-off between retries (doubles).")
    ] = 0.05
    max_retries: Annotated[
        _COUNT, Field(description="Retries of a fetch after UNAVAILABLE (within its deadline).")
    ] = 10
    max_staleness: Annotated[
        _COUNT, Field(description="Same as training.max_staleness (defaults to it).")
    ] = 0
    bandwidth_bytes_per_second: Annotated[
        StrictInt | None,
        Field(ge=1, description="Simulated link bandwidth per peer (null: unlimited)."),
    ] = None
    retained_versions: Annotated[
        StrictInt, Field(ge=1, description="Published versions a peer keeps (> max_staleness).")
    ] = 4
    parallel_streams: Annotated[
        StrictInt, Field(ge=1, description="Concurrent streams per fetch.")
    ] = 1
    bucket_bytes: Annotated[
        StrictInt, Field(ge=1, description="Bytes of parameters per exchanged bucket.")
    ] = 4 << 20
    failure_detection_seconds: Annotated[
        Number,
        Field(
            gt=0.0,
            description="A neighbour silent this long is marked down; the others go on.",
        ),
    ] = 5.0
    stall_seconds: Annotated[
        Number,
        Field(
            gt=0.0,
            description="A neighbour silent this long (no bytes, no Info answer) while a fetch "
            "from it is pending is reported stalled (neighbor_up 0) until it speaks again.",
        ),
    ] = 2.0
    wire_dtype: Annotated[
        WireDtype,
        Field(
            description="Element type float32 vectors travel in (rounded once per published "
            "version, widened by the receiver); the same on every peer."
        ),
    ] = "float32"
    wire_codec: Annotated[
        WireCodec,
        Field(
            description="Lossless codec of floating-point chunks: top-byte-huffman entropy-codes "
            "each element's sign-and-exponent byte (about 0.83 of the float32 bytes, bit-exact, "
            "~2-4 ms of CPU per MB on each side); each reader asks for it, so peers with "
            "different settings interoperate."
        ),
    ] = "none"
    verify_checksums: Annotated[
        StrictBool | None,
        Field(
            description="Checksum every received payload (CRC-32C). null: on plaintext channels "
            "only, since TLS records are already integrity-protected; false also skips it there "
            "(TCP's own checksum remains)."
        ),
    ] = None
    blocking_receive: Annotated[
        StrictBool,
        Field(
            description="Read neighbours' streams in worker threads over synchronous gRPC "
            "channels instead of on the peer's event loop: about half the receiver's CPU per "
            "byte for large vectors (benchmarks/exchange.py), one more thread holding the GIL."
        ),
    ] = False

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, as written in the manifest."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _file(value: Any, info: ValidationInfo) -> Path | None:
    """A file path relative to the manifest's directory; must exist if the context says so."""
    if value is None or isinstance(value, Path):
        return value
    if not isinstance(value, str) or not value.strip():
        fail(f"expected a non-empty string, got {describe(value)}")
    context = info.context or {}
    path = Path(value).expanduser()
    base_dir = context.get("base_dir")
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if context.get("check_files", False) and not path.is_file():
        fail(f"file not found: {path}")
    return path


_File = Annotated[Path, BeforeValidator(_file)]


@raise_manifest_errors("security", "tls", root=lambda: Manifest)
@dataclass(frozen=True, config=_section_config())
class TlsSpec:
    """``security.tls``: PEM files (resolved paths) and whether clients must present a cert."""

    cert: Annotated[_File, Field(description="Certificate chain (PEM) of this host.")]
    key: Annotated[_File, Field(description="Private key (PEM).")]
    ca: Annotated[_File, Field(description="CA bundle (PEM) that signs every peer.")]
    mutual: Annotated[StrictBool, Field(description="Require client certificates.")] = False

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, as written in the manifest."""
        return {
            "cert": str(self.cert),
            "key": str(self.key),
            "ca": str(self.ca),
            "mutual": self.mutual,
        }


@raise_manifest_errors("security", root=lambda: Manifest)
@dataclass(frozen=True, config=_section_config())
class SecuritySpec:
    """The ``security`` section: shared-token file and TLS, both optional."""

    token_file: Annotated[
        _File | None, Field(description="File holding the shared token (relative: manifest dir).")
    ] = None
    tls: Annotated[TlsSpec | None, Field(description="TLS for every exchange.")] = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, as written in the manifest."""
        return {
            "token_file": None if self.token_file is None else str(self.token_file),
            "tls": None if self.tls is None else self.tls.to_dict(),
        }


def _peer_list(value: Any) -> Any:
    """``peers`` is a non-empty list; a peer without ``rank`` takes its index."""
    if not isinstance(value, list | tuple):
        fail(f"expected a list of peers, got {describe(value)}")
    if not value:
        fail("at least one peer is required")
    items = []
    for index, item in enumerate(value):
        if item is None:
            item = {}
        if isinstance(item, dict) and "rank" not in item:
            item = {**item, "rank": index}
        items.append(item)
    return items


def _check_peers(peers: tuple[PeerSpec, ...]) -> tuple[PeerSpec, ...]:
    """Ranks are exactly 0..n-1 and no two ports share an address; returns peers by rank."""
    n = len(peers)
    by_rank: dict[int, int] = {}
    used: dict[tuple[str, int], str] = {}
    for index, spec in enumerate(peers):
        if not 0 <= spec.rank < n:
            fail(
                f"{spec.rank} is out of range 0..{n - 1} "
                f"(ranks must be 0..n-1 for the {n} peers listed)",
                index,
                "rank",
            )
        if spec.rank in by_rank:
            fail(f"duplicate rank {spec.rank} (also peers[{by_rank[spec.rank]}])", index, "rank")
        by_rank[spec.rank] = index
        for key in ("port", "metrics_port"):
            port = getattr(spec, key)
            if port is None:
                continue
            address = (address_key(spec.host), port)
            where = join_path(join_path("peers", index), key)
            if address in used:
                fail(f"address {spec.host}:{port} is already used by {used[address]}", index, key)
            used[address] = where
    return tuple(sorted(peers, key=lambda p: p.rank))


_MANIFEST_REQUIRED = ("version", "peers", "topology")


@raise_manifest_errors()
@dataclass(frozen=True, kw_only=True, config=_section_config(required=_MANIFEST_REQUIRED))
class Manifest:
    """A validated cluster manifest (``version: 1``).

    Attributes:
        peers: the peers, sorted by rank (ranks are exactly ``0..n-1``).
        topology, training, exchange, security: the sections.
        version: schema version (1).
        source: the file it was loaded from, if any (not part of equality or the digest).
    """

    version: Annotated[Literal[1], Field(description="Manifest schema version.")] = MANIFEST_VERSION
    peers: Annotated[
        tuple[PeerSpec, ...],
        BeforeValidator(_peer_list),
        Field(description="The peers; ranks 0..n-1.", json_schema_extra={"minItems": 1}),
    ]
    topology: Annotated[
        TopologySpec,
        BeforeValidator(_empty_if_none, json_schema_input_type=TopologySpec),
        Field(description="Graph and mixing weights."),
    ]
    training: Annotated[
        TrainingSpec,
        BeforeValidator(_empty_if_none, json_schema_input_type=TrainingSpec | None),
        Field(description="Training hyper-parameters."),
    ] = dataclasses.field(default_factory=TrainingSpec)
    exchange: Annotated[
        ExchangeSpec,
        BeforeValidator(_empty_if_none, json_schema_input_type=ExchangeSpec | None),
        Field(description="How peers exchange vectors."),
    ] = dataclasses.field(default_factory=ExchangeSpec)
    security: Annotated[
        SecuritySpec,
        BeforeValidator(_empty_if_none, json_schema_input_type=SecuritySpec | None),
        Field(description="Shared token and TLS."),
    ] = dataclasses.field(default_factory=SecuritySpec)
    source: ClassVar[Path | None] = None

    @model_validator(mode="before")
    @classmethod
    def _check_version(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        version = data.get("version")
        if version is None:
            fail(f"required field is missing (use version: {MANIFEST_VERSION})", "version")
        if version != MANIFEST_VERSION or isinstance(version, bool):
            fail(
                f"unsupported manifest version {version!r} "
                f"(this program reads version {MANIFEST_VERSION})",
                "version",
            )
        # One staleness bound for the run: exchange.max_staleness defaults to the training one.
        training, exchange = data.get("training"), data.get("exchange")
        if isinstance(training, dict) and "max_staleness" in training:
            if exchange is None:
                exchange = {}
            if isinstance(exchange, dict) and "max_staleness" not in exchange:
                exchange = {**exchange, "max_staleness": training["max_staleness"]}
                data = {**data, "exchange": exchange}
        return data

    @field_validator("peers")
    @classmethod
    def _check_peers(cls, peers: tuple[PeerSpec, ...]) -> tuple[PeerSpec, ...]:
        return _check_peers(peers)

    @model_validator(mode="after")
    def _check_sections(self) -> Manifest:
        topology, built = _resolve_topology(self.topology, self.world_size)
        object.__setattr__(self, "topology", topology)
        self.__dict__["_topology"] = built  # prime build_topology()'s cache
        staleness = self.exchange.max_staleness
        if staleness != self.training.max_staleness:
            fail(
                f"{staleness} conflicts with training.max_staleness "
                f"({self.training.max_staleness}); set one of them",
                "exchange",
                "max_staleness",
            )
        if self.training.algorithm == "decentlam" and staleness == 0:
            training = self.training
            diverges = decentlam_divergence(built, training.momentum, training.global_average_every)
            if diverges:
                growth, limit = diverges
                fail(
                    f"{training.momentum:g} makes DecentLaM diverge on graph "
                    f"{self.topology.graph!r} with {built.n} peers: its momentum carries the "
                    f"mixing step, and on this time-varying or non-symmetric W the disagreement "
                    f"between peers grows {growth:.3f}x per iteration at any learning rate "
                    f"(docs/algorithms.md, 'DecentLaM on time-varying graphs'); use momentum <= "
                    f"{limit:.2f}, a static symmetric graph (ring, torus, exponential: stable at "
                    f"any momentum), or algorithm dmsgd",
                    "training",
                    "momentum",
                )
        if self.exchange.retained_versions <= staleness:
            fail(
                f"{self.exchange.retained_versions} must be > max_staleness ({staleness}), "
                f"or stale neighbours could ask for versions already dropped",
                "exchange",
                "retained_versions",
            )
        return self

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


def _resolve_topology(spec: TopologySpec, n: int) -> tuple[TopologySpec, Topology]:
    """Check the ``topology`` section against ``n`` peers and build its topology.

    Returns:
        The spec with ``directed`` and ``time_varying`` resolved from the graph, and the
        validated topology. Problems are reported with :func:`fail` at ``topology.<field>``.
    """
    graph: Graph
    if spec.graph == "explicit":
        for index, edge in enumerate(spec.edges or ()):
            for end in edge:
                if not 0 <= end < n:
                    fail(
                        f"{list(edge)} names rank {end} but the manifest has {n} peers "
                        f"(ranks 0..{n - 1})",
                        "topology",
                        "edges",
                        index,
                    )
        graph = from_edges(n, spec.edges or (), directed=bool(spec.directed))
    else:
        try:
            graph = make_graph(spec.graph, n, **spec.params)
        except (TypeError, ValueError) as exc:
            fail(f"cannot build {spec.graph!r} for {n} peers: {exc}", "topology", "graph")
    if spec.matrix is not None:
        if len(spec.matrix) != n:
            fail(f"expected {n} rows (one per peer), got {len(spec.matrix)}", "topology", "matrix")
        for index, row in enumerate(spec.matrix):
            if len(row) != n:
                fail(
                    f"expected a list of {n} numbers, got {describe(list(row))}",
                    "topology",
                    "matrix",
                    index,
                )
    checked = [("time_varying", spec.time_varying, graph.time_varying)]
    if spec.graph != "explicit":
        checked.append(("directed", spec.directed, not graph.is_undirected))
    for key, given, actual in checked:
        if given is not None and given != actual:
            fail(
                f"{str(given).lower()} does not match graph {spec.graph!r}, "
                f"which is {'' if actual else 'not '}{key.replace('_', '-')}",
                "topology",
                key,
            )
    resolved = dataclasses.replace(
        spec,
        directed=not graph.is_undirected if spec.directed is None else spec.directed,
        time_varying=graph.time_varying,
    )
    return resolved, _build(resolved, graph, n)


def build_topology_from_spec(spec: TopologySpec, n: int) -> Topology:
    """Build and validate the topology of a ``topology`` section for ``n`` peers.

    Raises:
        ManifestError: the graph cannot be built, is disconnected or the weights fail a
            check; the message starts with the field to fix (``topology.edges``...).
    """
    try:
        if spec.graph == "explicit":
            graph = from_edges(n, spec.edges or (), directed=bool(spec.directed))
        else:
            graph = make_graph(spec.graph, n, **spec.params)
    except (TypeError, ValueError) as exc:
        raise ManifestError(
            f"topology.graph: cannot build {spec.graph!r} for {n} peers: {exc}"
        ) from None
    return _build(spec, graph, n)


def _build(spec: TopologySpec, graph: Graph, n: int) -> Topology:
    graph_field = "edges" if spec.graph == "explicit" else "graph"
    missing = unreachable_peers(n, graph.edges)
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise ManifestError(
            f"topology.{graph_field}: graph {graph.name!r} is not connected: peer(s) {shown} "
            f"cannot exchange with peer 0 in both directions"
        )
    where = "matrix" if spec.weights == "explicit" else "weights"
    try:
        topology = Topology(graph, spec.weights, matrix=spec.matrix)
        topology.validate(require_symmetric=spec.require_symmetric)
    except TopologyError as exc:
        hint = ""
        if spec.weights == "uniform" and graph.is_undirected and "sums to" in str(exc):
            hint = " (uniform weights are doubly stochastic only on regular graphs; "
            hint += "try weights: metropolis)"
        raise ManifestError(f"topology.{where}: {exc}{hint}") from None
    return topology


# Above these sizes the stability check is skipped (its eigenvalue problem grows as (2n)^3 and
# the product over lcm(period, H) iterations with the period).
_STABILITY_MAX_PEERS = 512
_STABILITY_MAX_ITERATIONS = 512


def decentlam_divergence(
    topology: Topology, momentum: float, global_average_every: int = 0
) -> tuple[float, float] | None:
    """``(growth per iteration, largest stable momentum)`` when synchronous DecentLaM diverges.

    DecentLaM's momentum carries the mixing step; on a time-varying or non-symmetric ``W`` that
    can make the disagreement between peers grow at every learning rate
    (:func:`topology.spectral.momentum_consensus_growth`, docs/algorithms.md, "DecentLaM on
    time-varying graphs"). The check covers one period of the graph, with the exact averages of
    ``global_average_every`` included. Used by the manifest and by ``decentlam simulate``.

    Returns:
        None when the recursion is stable or the check is out of range (momentum 0, two peers
        or fewer, more than 512).
    """
    beta = float(momentum)
    n = topology.n
    if beta == 0.0 or n <= 2 or n > _STABILITY_MAX_PEERS:
        return None
    every = int(global_average_every)
    length = topology.period
    if every:
        length = length * every // math.gcd(length, every)
    if length > _STABILITY_MAX_ITERATIONS:
        length, every = topology.period, 0  # without the global averages: errs on refusing
    average = np.full((n, n), 1.0 / n)
    matrices = [
        average if every and (k + 1) % every == 0 else topology.mixing_matrix(k)
        for k in range(length)
    ]
    growth = momentum_consensus_growth(matrices, beta)
    if growth < 1.0 - 1e-9:
        return None
    return growth, max_stable_momentum(matrices)


def address_key(host: str) -> str:
    """Normalised host for address comparisons (case-insensitive, localhost = 127.0.0.1)."""
    host = host.strip().lower()
    return LOOPBACK_HOST if host == "localhost" else host
