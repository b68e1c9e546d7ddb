"""Section-by-section validation of manifest data into the dataclasses of
:mod:`topology.manifest_specs`.

Each ``_parse_*`` function reads one section with :class:`topology.schema.Section` and raises
:class:`~topology.schema.ManifestError` prefixed by the field path. The public entry point is
:func:`topology.manifest.parse_manifest`; :func:`build_topology_from_spec` is shared with
:meth:`Manifest.build_topology`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from topology.checks import TopologyError
from topology.graphs import (
    GRAPH_PARAMS,
    canonical_graph_name,
    from_edges,
    make_graph,
    unreachable_peers,
)
from topology.manifest_specs import (
    LOOPBACK_HOST,
    ExchangeSpec,
    LrScheduleSpec,
    PeerSpec,
    SecuritySpec,
    TlsSpec,
    TopologySpec,
    TrainingSpec,
    address_key,
)
from topology.schema import ManifestError, Section, describe, join_path
from topology.topology import Topology

logger = logging.getLogger(__name__)

ALGORITHMS: tuple[str, ...] = (
    "decentlam",
    "dmsgd",
    "dsgd",
    "pmsgd",
    "awc-dmsgd",
    "qg-dmsgd",
    "dgd",
)
LR_SCHEDULES: tuple[str, ...] = ("constant", "warmup", "step", "cosine")
DTYPES: tuple[str, ...] = ("float32", "float64")
WEIGHTS: tuple[str, ...] = ("auto", "uniform", "metropolis", "explicit")
MAX_CHUNK_BYTES = 64 << 20

_PEER_KEYS = ("rank", "name", "host", "port", "metrics_port", "device")
_TOPOLOGY_KEYS = (
    "graph",
    "params",
    "edges",
    "directed",
    "weights",
    "matrix",
    "time_varying",
    "require_symmetric",
)
_TRAINING_KEYS = tuple(TrainingSpec.__dataclass_fields__)
_SCHEDULE_KEYS = tuple(LrScheduleSpec.__dataclass_fields__)
_EXCHANGE_KEYS = tuple(ExchangeSpec.__dataclass_fields__)
_DEVICE = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")
# A builtin task name ("digits", "synthetic-image") or an import path "package.module:factory".
_TASK = re.compile(r"^([a-z0-9][a-z0-9_-]*|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$")


def parse_peers(raw: Any) -> tuple[PeerSpec, ...]:
    """Validate the ``peers`` list: ranks 0..n-1, unique addresses; returns peers by rank."""
    if not isinstance(raw, list):
        raise ManifestError(f"peers: expected a list of peers, got {describe(raw)}")
    if not raw:
        raise ManifestError("peers: at least one peer is required")
    n = len(raw)
    by_rank: dict[int, int] = {}
    used: dict[tuple[str, int], str] = {}
    peers = []
    for index, item in enumerate(raw):
        s = Section(item, join_path("peers", index), _PEER_KEYS)
        rank = s.integer("rank", index)
        if not 0 <= rank < n:
            raise ManifestError(
                f"{s.at('rank')}: {rank} is out of range 0..{n - 1} "
                f"(ranks must be 0..n-1 for the {n} peers listed)"
            )
        if rank in by_rank:
            raise ManifestError(
                f"{s.at('rank')}: duplicate rank {rank} (also peers[{by_rank[rank]}])"
            )
        by_rank[rank] = index
        host = s.string("host", LOOPBACK_HOST).strip()
        if any(c.isspace() for c in host) or "/" in host or host.count(":") == 1:
            hint = "; put the port in 'port'" if host.count(":") == 1 else ""
            raise ManifestError(f"{s.at('host')}: {host!r} is not a host name or IP{hint}")
        device = s.string("device", "auto")
        if not _DEVICE.match(device):
            raise ManifestError(
                f"{s.at('device')}: invalid device {device!r} (expected cpu, cuda, cuda:N or auto)"
            )
        spec = PeerSpec(
            rank=rank,
            name=s.string("name", f"peer{rank}"),
            host=host,
            port=s.integer("port", minimum=1, maximum=65535),
            metrics_port=s.integer("metrics_port", None, minimum=1, maximum=65535, nullable=True),
            device=device,
        )
        for key in ("port", "metrics_port"):
            port = getattr(spec, key)
            if port is None:
                continue
            address = (address_key(host), port)
            if address in used:
                raise ManifestError(
                    f"{s.at(key)}: address {host}:{port} is already used by {used[address]}"
                )
            used[address] = s.at(key)
        peers.append(spec)
    return tuple(sorted(peers, key=lambda p: p.rank))


def _parse_edges(s: Section, n: int) -> tuple[tuple[int, int], ...]:
    edges = []
    for index, edge in enumerate(s.sequence("edges")):
        path = join_path(s.at("edges"), index)
        if not isinstance(edge, list | tuple) or len(edge) != 2:
            raise ManifestError(f"{path}: expected a pair [src, dst], got {describe(edge)}")
        for end in edge:
            if isinstance(end, bool) or not isinstance(end, int):
                raise ManifestError(f"{path}: ranks must be integers, got {describe(end)}")
            if not 0 <= end < n:
                raise ManifestError(
                    f"{path}: {list(edge)} names rank {end} but the manifest has {n} peers "
                    f"(ranks 0..{n - 1})"
                )
        if edge[0] == edge[1]:
            raise ManifestError(f"{path}: {list(edge)} is a self loop (self weights are implicit)")
        edges.append((edge[0], edge[1]))
    return tuple(edges)


def _parse_matrix(s: Section, n: int) -> tuple[tuple[float, ...], ...]:
    rows = s.sequence("matrix")
    if len(rows) != n:
        raise ManifestError(f"{s.at('matrix')}: expected {n} rows (one per peer), got {len(rows)}")
    matrix = []
    for i, row in enumerate(rows):
        path = join_path(s.at("matrix"), i)
        if not isinstance(row, list | tuple) or len(row) != n:
            raise ManifestError(f"{path}: expected a list of {n} numbers, got {describe(row)}")
        for value in row:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ManifestError(f"{path}: expected numbers, got {describe(value)}")
        matrix.append(tuple(float(v) for v in row))
    return tuple(matrix)


def parse_topology(raw: Any, n: int) -> tuple[TopologySpec, Topology]:
    """Validate the ``topology`` section for ``n`` peers; returns the spec and its topology."""
    s = Section(raw, "topology", _TOPOLOGY_KEYS)
    try:
        graph = canonical_graph_name(s.string("graph"))
    except ValueError as exc:
        raise ManifestError(f"{s.at('graph')}: {exc}") from None
    params = s.mapping("params", {})
    if graph == "explicit":
        edges = _parse_edges(s, n)
        if params:
            raise ManifestError(f"{s.at('params')}: graph 'explicit' takes no params; use 'edges'")
    elif s.has("edges"):
        raise ManifestError(f"{s.at('edges')}: only used with graph 'explicit', not {graph!r}")
    else:
        edges = None
        accepted = GRAPH_PARAMS[graph]
        for key in params:
            if key not in accepted:
                raise ManifestError(
                    f"{join_path(s.at('params'), key)}: graph {graph!r} does not take this "
                    f"parameter (accepted: {', '.join(accepted) or 'none'})"
                )
    weights = s.string("weights", "auto", choices=WEIGHTS)
    matrix = _parse_matrix(s, n) if weights == "explicit" else None
    if weights != "explicit" and s.has("matrix"):
        raise ManifestError(f"{s.at('matrix')}: only used with weights 'explicit'")
    policy = s.raw("require_symmetric", "warn")
    if policy is True:
        policy = "error"
    if policy not in ("warn", "error", False):
        raise ManifestError(
            f"{s.at('require_symmetric')}: expected 'warn', 'error' or false, got "
            f"{describe(policy)}"
        )
    directed = s.boolean("directed", False) if s.has("directed") else None
    if graph == "explicit":
        built = from_edges(n, edges or (), directed=bool(directed))
    else:
        try:
            built = make_graph(graph, n, **params)
        except ValueError as exc:
            raise ManifestError(
                f"{s.at('graph')}: cannot build {graph!r} for {n} peers: {exc}"
            ) from None
    for key, actual in (
        ("time_varying", built.time_varying),
        ("directed", not built.is_undirected),
    ):
        if graph == "explicit" and key == "directed":
            continue
        if s.has(key) and s.boolean(key) != actual:
            raise ManifestError(
                f"{s.at(key)}: {str(s.boolean(key)).lower()} does not match graph {graph!r}, "
                f"which is {'' if actual else 'not '}{key.replace('_', '-')}"
            )
    spec = TopologySpec(
        graph=graph,
        params=params,
        edges=edges,
        directed=not built.is_undirected if directed is None else directed,
        weights=weights,
        matrix=matrix,
        time_varying=built.time_varying,
        require_symmetric=policy,
    )
    # Build now so that every mixing problem is reported at load time, with a field path.
    return spec, build_topology_from_spec(spec, n)


def build_topology_from_spec(spec: TopologySpec, n: int) -> Topology:
    """Build and validate the topology of a ``topology`` section for ``n`` peers.

    Raises:
        ManifestError: the graph is disconnected or the weights fail a check; the message
            starts with the field to fix (``topology.edges``, ``topology.weights``...).
    """
    if spec.graph == "explicit":
        graph = from_edges(n, spec.edges or (), directed=spec.directed)
        graph_path = "topology.edges"
    else:
        graph = make_graph(spec.graph, n, **spec.params)
        graph_path = "topology.graph"
    missing = unreachable_peers(n, graph.edges)
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise ManifestError(
            f"{graph_path}: graph {graph.name!r} is not connected: peer(s) {shown} cannot "
            f"exchange with peer 0 in both directions"
        )
    where = "topology.matrix" if spec.weights == "explicit" else "topology.weights"
    try:
        topology = Topology(graph, spec.weights, matrix=spec.matrix)
        topology.validate(require_symmetric=spec.require_symmetric)
    except TopologyError as exc:
        hint = ""
        if spec.weights == "uniform" and graph.is_undirected and "sums to" in str(exc):
            hint = " (uniform weights are doubly stochastic only on regular graphs; "
            hint += "try weights: metropolis)"
        raise ManifestError(f"{where}: {exc}{hint}") from None
    return topology


def _parse_schedule(raw: Any, path: str, lr: float) -> LrScheduleSpec:
    if isinstance(raw, str):  # shorthand: "lr_schedule: cosine"
        raw = {"name": raw}
    s = Section(raw, path, _SCHEDULE_KEYS)
    name = s.string("name", "constant", choices=LR_SCHEDULES)
    warmup_steps = s.integer("warmup_steps", 0, minimum=0)
    if name == "warmup" and warmup_steps == 0:
        raise ManifestError(f"{s.at('warmup_steps')}: must be > 0 for the warmup schedule")
    milestones = s.sequence("milestones", [])
    previous = 0
    for index, milestone in enumerate(milestones):
        where = join_path(s.at("milestones"), index)
        if isinstance(milestone, bool) or not isinstance(milestone, int):
            raise ManifestError(f"{where}: expected an integer step, got {describe(milestone)}")
        if milestone <= previous:
            raise ManifestError(f"{where}: {milestone} must be > {previous} (strictly increasing)")
        previous = milestone
    if name == "step" and not milestones:
        raise ManifestError(f"{s.at('milestones')}: the step schedule needs at least one step")
    min_lr = s.number("min_lr", 0.0, minimum=0.0)
    if min_lr > lr:
        raise ManifestError(f"{s.at('min_lr')}: {min_lr} is above training.lr ({lr})")
    return LrScheduleSpec(
        name=name,
        warmup_steps=warmup_steps,
        milestones=tuple(milestones),
        gamma=s.number("gamma", 0.1, minimum=0.0, maximum=1.0, exclusive_minimum=True),
        min_lr=min_lr,
    )


def parse_training(raw: Any) -> TrainingSpec:
    """Validate the ``training`` section (all fields optional)."""
    s = Section(raw, "training", _TRAINING_KEYS)
    lr = s.number("lr", 0.1, minimum=0.0, exclusive_minimum=True)
    task = s.string("task", "digits")
    if not _TASK.match(task):
        raise ManifestError(
            f"{s.at('task')}: invalid task {task!r} (expected a builtin name such as 'digits' "
            f"or 'package.module:factory')"
        )
    return TrainingSpec(
        algorithm=s.string("algorithm", "decentlam", choices=ALGORITHMS),
        lr=lr,
        momentum=s.number("momentum", 0.9, minimum=0.0, maximum=1.0, exclusive_maximum=True),
        weight_decay=s.number("weight_decay", 0.0, minimum=0.0),
        batch_size=s.integer("batch_size", 32, minimum=1),
        steps=s.integer("steps", 100, minimum=1),
        lr_schedule=_parse_schedule(s.raw("lr_schedule", None), s.at("lr_schedule"), lr),
        global_average_every=s.integer("global_average_every", 0, minimum=0),
        task=task,
        task_options=s.mapping("task_options", {}),
        seed=s.integer("seed", 0, minimum=0),
        dtype=s.string("dtype", "float32", choices=DTYPES),
        max_staleness=s.integer("max_staleness", 0, minimum=0),
        checkpoint_every=s.integer("checkpoint_every", 0, minimum=0),
        eval_every=s.integer("eval_every", 0, minimum=0),
    )


def parse_exchange(raw: Any, training: TrainingSpec) -> ExchangeSpec:
    """Validate the ``exchange`` section (all fields optional)."""
    s = Section(raw, "exchange", _EXCHANGE_KEYS)
    # One staleness bound for the run: exchange.max_staleness defaults to the training value
    # and may not contradict it.
    staleness = s.integer("max_staleness", training.max_staleness, minimum=0)
    if staleness != training.max_staleness:
        raise ManifestError(
            f"{s.at('max_staleness')}: {staleness} conflicts with training.max_staleness "
            f"({training.max_staleness}); set one of them"
        )
    retained = s.integer("retained_versions", 4, minimum=1)
    if retained <= staleness:
        raise ManifestError(
            f"{s.at('retained_versions')}: {retained} must be > max_staleness ({staleness}), "
            f"or stale neighbours could ask for versions already dropped"
        )
    return ExchangeSpec(
        chunk_bytes=s.integer("chunk_bytes", 1 << 20, minimum=1, maximum=MAX_CHUNK_BYTES),
        fetch_deadline_seconds=s.number(
            "fetch_deadline_seconds", 30.0, minimum=0.0, exclusive_minimum=True
        ),
        connect_deadline_seconds=s.number(
            "connect_deadline_seconds", 60.0, minimum=0.0, exclusive_minimum=True
        ),
        retry_backoff_seconds=s.number("retry_backoff_seconds", 0.05, minimum=0.0),
        max_retries=s.integer("max_retries", 5, minimum=0),
        max_staleness=staleness,
        bandwidth_bytes_per_second=s.integer(
            "bandwidth_bytes_per_second", None, minimum=1, nullable=True
        ),
        retained_versions=retained,
        parallel_streams=s.integer("parallel_streams", 1, minimum=1),
        bucket_bytes=s.integer("bucket_bytes", 4 << 20, minimum=1),
    )


def parse_security(raw: Any, base_dir: Path | None, check_files: bool) -> SecuritySpec:
    """Validate the ``security`` section; file paths resolve against ``base_dir``."""
    s = Section(raw, "security", ("token_file", "tls"))
    tls = None
    if s.raw("tls", None) is not None:
        t = Section(s.raw("tls"), s.at("tls"), ("cert", "key", "ca", "mutual"))
        for key in ("cert", "key", "ca"):
            t.raw(key)  # required
        tls = TlsSpec(
            cert=t.path_field("cert", base_dir, check_files),  # type: ignore[arg-type]
            key=t.path_field("key", base_dir, check_files),  # type: ignore[arg-type]
            ca=t.path_field("ca", base_dir, check_files),  # type: ignore[arg-type]
            mutual=t.boolean("mutual", False),
        )
    return SecuritySpec(token_file=s.path_field("token_file", base_dir, check_files), tls=tls)
