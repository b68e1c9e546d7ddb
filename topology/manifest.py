"""Cluster manifests: load, validate, write and generate the YAML file every peer reads.

A manifest (``version: 1``) lists the peers and their addresses and fixes the topology, the
training hyper-parameters, the exchange settings and security. All peers of a run must use
the same manifest; they compare :meth:`Manifest.digest` to make sure.

Validation is strict and happens once, here: unknown keys, wrong types (a boolean is not an
integer), out-of-range values, inconsistent ranks and addresses, and a topology that cannot be
built or mixed (wrong size, not connected, not doubly stochastic) all raise one error type,
:class:`ManifestError`, whose message starts with the field path, e.g.
``peers[2].port: 70000 is out of range 1..65535``. This is the only module of the package that
reads files.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from topology.manifest_specs import (
    ALGORITHMS,
    LOOPBACK_HOST,
    MANIFEST_VERSION,
    MAX_CHUNK_BYTES,
    ExchangeSpec,
    LrScheduleSpec,
    Manifest,
    PeerSpec,
    SecuritySpec,
    TlsSpec,
    TopologySpec,
    TrainingSpec,
    build_topology_from_spec,
)
from topology.schema import ManifestError, check_range, describe, manifest_error

logger = logging.getLogger(__name__)

#: Draft of JSON Schema that :func:`manifest_json_schema` writes.
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
#: The JSON Schema as shipped with the package (``decentlam manifest schema`` writes it; a test
#: keeps it equal to :func:`manifest_json_schema`).
SCHEMA_FILE = Path(__file__).resolve().parent / "manifest.schema.json"

_ADAPTER: TypeAdapter[Manifest] = TypeAdapter(Manifest)

__all__ = [
    "ALGORITHMS",
    "MANIFEST_VERSION",
    "MAX_CHUNK_BYTES",
    "SCHEMA_FILE",
    "ExchangeSpec",
    "LrScheduleSpec",
    "Manifest",
    "ManifestError",
    "PeerSpec",
    "SecuritySpec",
    "TlsSpec",
    "TopologySpec",
    "TrainingSpec",
    "build_topology_from_spec",
    "dump_manifest",
    "init_manifest",
    "load_manifest",
    "manifest_json_schema",
    "parse_manifest",
]


def parse_manifest(
    data: Mapping[str, Any], base_dir: Path | None = None, check_files: bool = True
) -> Manifest:
    """Validate plain data (as loaded from YAML) and return a :class:`Manifest`.

    Args:
        data: the manifest mapping.
        base_dir: directory that relative file paths are resolved against (the manifest's).
        check_files: whether referenced files (token, TLS) must exist.

    Returns:
        The validated manifest; its topology has been built and checked.

    Raises:
        ManifestError: the first problem found, prefixed by its field path.
    """
    if isinstance(data, Mapping) and not isinstance(data, dict):
        data = dict(data)
    try:
        return _ADAPTER.validate_python(
            data, context={"base_dir": base_dir, "check_files": check_files}
        )
    except ValidationError as exc:
        raise manifest_error(exc, Manifest) from None


def manifest_json_schema() -> dict[str, Any]:
    """The JSON Schema of a manifest file, generated from the schema's dataclasses.

    Editors (the VS Code YAML extension, any ``yaml-language-server`` client) use it to
    validate and complete manifests. It checks each field's type, range and choices;
    checks that span fields or need the topology (ranks, addresses, connectivity, weights)
    are only made by :func:`load_manifest` / ``decentlam manifest check``.
    """
    schema = _ADAPTER.json_schema(mode="validation")
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        "title": "decentlam cluster manifest",
        "description": f"decentlam cluster manifest, schema version {MANIFEST_VERSION}.",
        **{k: v for k, v in schema.items() if k not in ("title", "description")},
    }


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of silently keeping the last one."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    result: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in result:
            raise ManifestError(
                f"line {key_node.start_mark.line + 1}: duplicate key {key!r} in the same mapping"
            )
        result[key] = loader.construct_object(value_node, deep=True)
    return result


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,  # type: ignore[arg-type]
)


def load_manifest(path: str | Path, check_files: bool = True) -> Manifest:
    """Read and validate a YAML manifest; relative paths resolve against its directory.

    Args:
        path: the manifest file.
        check_files: whether referenced files (token, TLS) must exist.

    Raises:
        ManifestError: unreadable file, invalid YAML (with its line number), or invalid content.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read manifest: {exc}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except ManifestError as exc:
        raise ManifestError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ManifestError(f"{path}: invalid YAML{where}: {problem}") from None
    if not isinstance(data, Mapping):
        raise ManifestError(f"{path}: the top level must be a mapping, got {describe(data)}")
    manifest = parse_manifest(data, base_dir=path.resolve().parent, check_files=check_files)
    object.__setattr__(manifest, "source", path)  # not a field: no part of equality
    return manifest


class _Flow(list):  # type: ignore[type-arg]
    """A list that :func:`dump_manifest` writes on one line."""


class _FlowMap(dict):  # type: ignore[type-arg]
    """A mapping that :func:`dump_manifest` writes on one line."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(
    _Flow, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True)
)
_Dumper.add_representer(
    _FlowMap, lambda d, v: d.represent_mapping("tag:yaml.org,2002:map", v, flow_style=True)
)


def dump_manifest(manifest: Manifest, schema_ref: str | None = None) -> str:
    """Serialise a manifest to YAML that :func:`load_manifest` reads back to an equal manifest.

    Peers, edges, matrix rows and milestones are written one per line, in flow style.

    Args:
        manifest: the manifest.
        schema_ref: path or URL of the JSON Schema (:func:`manifest_json_schema`); when given,
            the first line is ``# yaml-language-server: $schema=<schema_ref>``, which editors
            (VS Code's YAML extension) use to validate and complete the file.
    """
    data = manifest.to_dict()
    data["peers"] = [_FlowMap(p) for p in data["peers"]]
    topology = data["topology"]
    for key in ("edges", "matrix"):
        if key in topology:
            topology[key] = [_Flow(row) for row in topology[key]]
    schedule = data["training"]["lr_schedule"]
    schedule["milestones"] = _Flow(schedule["milestones"])
    modeline = f"# yaml-language-server: $schema={schema_ref}\n" if schema_ref else ""
    header = modeline + (
        f"# decentlam cluster manifest (schema version {MANIFEST_VERSION}).\n"
        "# Check it with: decentlam manifest check <this file>\n"
    )
    body = yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)
    return header + body


def init_manifest(
    nodes: int,
    graph: str,
    hosts: Sequence[str] | None = None,
    peers_per_host: int | None = None,
    base_port: int = 50051,
    base_metrics_port: int = 9100,
    *,
    graph_params: Mapping[str, Any] | None = None,
    weights: str = "auto",
    device: str = "auto",
    **training_overrides: Any,
) -> Manifest:
    """Generate a valid manifest for ``nodes`` peers.

    Peers are placed rank by rank: ``peers_per_host`` on the first host, then the next one;
    on each host the gRPC ports are ``base_port, base_port + 1, ...`` and the metrics ports
    ``base_metrics_port, ...``. Without ``hosts`` every peer runs on ``127.0.0.1``.

    Args:
        nodes: number of peers.
        graph: graph name (see :data:`topology.graphs.GRAPH_NAMES`).
        hosts: host names or IPs; default ``["127.0.0.1"]`` with all peers on it.
        peers_per_host: peers per host; default ``ceil(nodes / len(hosts))``.
        base_port: first gRPC port on each host.
        base_metrics_port: first metrics port on each host.
        graph_params: graph constructor parameters (``rows``, ``seed``...).
        weights: weight scheme (``auto``, ``uniform``, ``metropolis``).
        device: device for every peer.
        **training_overrides: fields of the ``training`` section (``algorithm``, ``lr``...).

    Returns:
        The validated manifest.

    Raises:
        ManifestError: invalid arguments (reported with the manifest field they map to).
    """
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise ManifestError(f"nodes: expected a positive integer, got {nodes!r}")
    host_list = [h.strip() for h in hosts if h.strip()] if hosts else [LOOPBACK_HOST]
    if not host_list:
        raise ManifestError("hosts: expected at least one host name")
    per_host = peers_per_host or math.ceil(nodes / len(host_list))
    check_range("peers_per_host", per_host, 1, None)
    if per_host * len(host_list) < nodes:
        raise ManifestError(
            f"peers_per_host: {per_host} peers on each of {len(host_list)} host(s) cannot "
            f"hold {nodes} peers"
        )
    peers = [
        {
            "rank": rank,
            "name": f"peer{rank}",
            "host": host_list[rank // per_host],
            "port": base_port + rank % per_host,
            "metrics_port": base_metrics_port + rank % per_host,
            "device": device,
        }
        for rank in range(nodes)
    ]
    topology: dict[str, Any] = {"graph": graph, "weights": weights}
    params = dict(graph_params or {})
    if "edges" in params:  # the explicit graph keeps its edge list in its own field
        topology["edges"] = params.pop("edges")
        if "directed" in params:
            topology["directed"] = params.pop("directed")
    topology["params"] = params
    data = {
        "version": MANIFEST_VERSION,
        "peers": peers,
        "topology": topology,
        "training": dict(training_overrides),
    }
    return parse_manifest(data, check_files=False)
