"""Malformed manifests: each one fails with one ManifestError naming the field and value."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from topology.manifest import ManifestError, init_manifest, load_manifest, parse_manifest

BASE = init_manifest(4, "ring").to_dict()


def edit(change: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    change(data)
    return data


def setitem(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for part in parents:
            data = data[int(part)] if part.isdigit() else data[part]
        data[int(last) if last.isdigit() else last] = value

    return change


def delitem(path: str) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for part in parents:
            data = data[int(part)] if part.isdigit() else data[part]
        del data[int(last) if last.isdigit() else last]

    return change


def topology(**fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda data: data.__setitem__("topology", fields)


def peers(n: int) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        data["peers"] = [{"rank": r, "port": 6000 + r} for r in range(n)]

    return change


def both(*changes: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        for c in changes:
            c(data)

    return change


MALFORMED = [
    (delitem("version"), "version: required field is missing"),
    (setitem("version", 2), "version: unsupported manifest version 2"),
    (setitem("version", True), "version: unsupported manifest version True"),
    (setitem("tolopogy", {}), "tolopogy: unknown key (did you mean 'topology'?)"),
    (setitem("training.lrr", 0.1), "training.lrr: unknown key (did you mean 'lr'?)"),
    (setitem("peers.1.prot", 1), "peers[1].prot: unknown key (did you mean 'port'?)"),
    (setitem("peers", []), "peers: at least one peer is required"),
    (setitem("peers", {"a": 1}), "peers: expected a list of peers"),
    (setitem("peers.2", "x"), "peers[2]: expected a mapping, got string 'x'"),
    (delitem("peers.0.port"), "peers[0].port: required field is missing"),
    (setitem("peers.2.port", 70000), "peers[2].port: 70000 is out of range 1..65535"),
    (setitem("peers.2.port", 0), "peers[2].port: 0 is out of range 1..65535"),
    (setitem("peers.2.port", "50051"), "peers[2].port: expected an integer, got string '50051'"),
    (setitem("peers.1.port", True), "peers[1].port: expected an integer, got boolean True"),
    (setitem("peers.3.rank", 1), "peers[3].rank: duplicate rank 1 (also peers[1])"),
    (setitem("peers.3.rank", 7), "peers[3].rank: 7 is out of range 0..3"),
    (setitem("peers.3.rank", -1), "peers[3].rank: -1 is out of range 0..3"),
    (
        setitem("peers.2.port", 50051),
        "peers[2].port: address 127.0.0.1:50051 is already used by peers[0].port",
    ),
    (
        setitem("peers.1.metrics_port", 50051),
        "peers[1].metrics_port: address 127.0.0.1:50051 is already used by peers[0].port",
    ),
    (
        both(setitem("peers.1.host", "localhost"), setitem("peers.1.port", 50051)),
        "peers[1].port: address localhost:50051 is already used by peers[0].port",
    ),
    (
        setitem("peers.0.host", "127.0.0.1:50051"),
        "peers[0].host: '127.0.0.1:50051' is not a host name or IP; put the port in 'port'",
    ),
    (setitem("peers.0.device", "gpu0"), "peers[0].device: invalid device 'gpu0'"),
    (setitem("peers.0.device", "cuda:x"), "peers[0].device: invalid device 'cuda:x'"),
    (delitem("topology"), "topology: required field is missing"),
    (
        setitem("topology.graph", "rnig"),
        "topology.graph: unknown graph 'rnig' (did you mean 'ring'? known: ring, star",
    ),
    (
        both(peers(6), topology(graph="hypercube")),
        "topology.graph: cannot build 'hypercube' "
        "for 6 peers: hypercube: n must be a power of two, got 6",
    ),
    (
        topology(graph="grid", params={"rows": 3}),
        "topology.graph: cannot build 'grid' for 4 peers: grid: rows=3 does not divide n=4",
    ),
    (
        topology(graph="ring", params={"rows": 2}),
        "topology.params.rows: graph 'ring' does not take this parameter",
    ),
    (
        topology(graph="explicit", edges=[[0, 1], [1, 9]]),
        "topology.edges[1]: [1, 9] names rank 9 but the manifest has 4 peers (ranks 0..3)",
    ),
    (
        topology(graph="explicit", edges=[[0, 1], [2, 2]]),
        "topology.edges[1]: [2, 2] is a self loop",
    ),
    (topology(graph="explicit", edges=[[0, 1, 2]]), "topology.edges[0]: expected a pair"),
    (
        topology(graph="explicit", edges=[[0, 1], [2, 3]]),
        "topology.edges: graph 'explicit' is not connected: peer(s) 2, 3",
    ),
    (topology(graph="ring", edges=[[0, 1]]), "topology.edges: only used with graph 'explicit'"),
    (
        topology(graph="ring", time_varying=True),
        "topology.time_varying: true does not match graph 'ring', which is not time-varying",
    ),
    (
        topology(graph="directed-exponential", directed=False),
        "topology.directed: false does not match graph 'directed-exponential', which is directed",
    ),
    (
        topology(graph="star", weights="uniform"),
        "topology.weights: column 0 sums to 1.75, expected 1",
    ),
    (topology(graph="star", weights="uniform"), "try weights: metropolis"),
    (
        topology(graph="directed-exponential", weights="metropolis"),
        "topology.weights: Metropolis-Hastings weights need an undirected graph",
    ),
    (
        topology(graph="ring", weights="metro"),
        "topology.weights: 'metro' is not one of auto, "
        "uniform, metropolis, explicit (did you mean 'metropolis'?)",
    ),
    (
        topology(
            graph="ring",
            weights="explicit",
            matrix=[[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5], [0, 0, 0.6, 0.5]],
        ),
        "topology.matrix: row 3 sums to 1.1, expected 1",
    ),
    (
        topology(graph="full", weights="explicit", matrix=[[0.25] * 4] * 3),
        "topology.matrix: expected 4 rows (one per peer), got 3",
    ),
    (
        topology(graph="ring", weights="explicit", matrix=[[0.5, 0.5, 0, 0]] * 4),
        "topology.matrix: column 0 sums to 2",
    ),
    (topology(graph="ring", matrix=[[1]]), "topology.matrix: only used with weights 'explicit'"),
    (
        topology(graph="one-peer-exponential", require_symmetric="error"),
        "topology.weights: mixing matrix is not symmetric: W[0, 1] = 0 but W[1, 0] = 0.5",
    ),
    (
        topology(graph="ring", require_symmetric="always"),
        "topology.require_symmetric: expected 'warn', 'error' or false",
    ),
    (
        setitem("training.algorithm", "adam"),
        "training.algorithm: 'adam' is not one of decentlam, dmsgd",
    ),
    (setitem("training.lr", 0), "training.lr: must be > 0, got 0"),
    (setitem("training.lr", -0.1), "training.lr: must be > 0, got -0.1"),
    (setitem("training.lr", "fast"), "training.lr: expected a number, got string 'fast'"),
    (setitem("training.momentum", 1.0), "training.momentum: 1.0 is out of range [0, 1)"),
    (setitem("training.momentum", -0.5), "training.momentum: -0.5 is out of range [0, 1)"),
    (setitem("training.weight_decay", -1e-4), "training.weight_decay: must be >= 0"),
    (setitem("training.batch_size", 0), "training.batch_size: 0 is out of range (must be >= 1)"),
    (setitem("training.steps", 10.5), "training.steps: expected an integer, got number 10.5"),
    (setitem("training.dtype", "float16"), "training.dtype: 'float16' is not one of float32"),
    (setitem("training.task", "my task"), "training.task: invalid task 'my task'"),
    (
        setitem("training.lr_schedule", {"name": "step"}),
        "training.lr_schedule.milestones: the step schedule needs at least one step",
    ),
    (
        setitem("training.lr_schedule", {"name": "step", "milestones": [5, 5]}),
        "training.lr_schedule.milestones[1]: 5 must be > 5",
    ),
    (
        setitem("training.lr_schedule", {"name": "warmup"}),
        "training.lr_schedule.warmup_steps: must be > 0 for the warmup schedule",
    ),
    (setitem("training.lr_schedule", "linear"), "training.lr_schedule.name: 'linear' is not one"),
    (setitem("training.task_options", [1]), "training.task_options: expected a mapping"),
    (
        setitem("exchange.max_staleness", 2),
        "exchange.max_staleness: 2 conflicts with training.max_staleness (0)",
    ),
    (
        both(setitem("training.max_staleness", 4), delitem("exchange.max_staleness")),
        "exchange.retained_versions: 4 must be > max_staleness (4)",
    ),
    (setitem("exchange.chunk_bytes", 0), "exchange.chunk_bytes: 0 is out of range 1..33554432"),
    (
        setitem("exchange.fetch_deadline_seconds", 0),
        "exchange.fetch_deadline_seconds: must be > 0, got 0",
    ),
    (
        setitem("exchange.bandwidth_bytes_per_second", 0),
        "exchange.bandwidth_bytes_per_second: 0 is out of range (must be >= 1)",
    ),
    (
        setitem("security.token_file", "/nonexistent/token"),
        "security.token_file: file not found: /nonexistent/token",
    ),
    (
        setitem("security.tls", {"cert": "/nonexistent/c.pem", "key": "k", "ca": "c"}),
        "security.tls.cert: file not found: /nonexistent/c.pem",
    ),
    (setitem("security.tls", {"cert": "c.pem"}), "security.tls.key: required field is missing"),
    (
        setitem("security.tls", {"cert": "a", "key": "b", "ca": "c", "mutual": "yes"}),
        "security.tls.mutual: expected true or false",
    ),
]


@pytest.mark.parametrize(("change", "message"), MALFORMED)
def test_malformed_manifest(change: Callable[[dict[str, Any]], Any], message: str) -> None:
    data = edit(change)
    check_files = "file not found" in message
    with pytest.raises(ManifestError) as info:
        parse_manifest(data, check_files=check_files)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_top_level_must_be_mapping() -> None:
    with pytest.raises(ManifestError, match="manifest: expected a mapping, got a list"):
        parse_manifest([1, 2])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("version: 1\npeers: [\n  {rank: 0\n", "invalid YAML at line 4"),
        ("version: 1\npeers:\n  - {port: 1}\n   bad: indent\n", "invalid YAML at line"),
        ("- 1\n- 2\n", "the top level must be a mapping, got a list"),
        ("", "the top level must be a mapping, got null"),
        ("version: 1\nversion: 1\n", "line 2: duplicate key 'version'"),
        (
            "version: 1\npeers: [{port: 1}]\ntopology: {graph: ring}\ntraining: {lr: 0}\n",
            "training.lr: must be > 0, got 0",
        ),
    ],
)
def test_bad_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(text)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert message in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="manifest file not found"):
        load_manifest(tmp_path / "nope.yaml")
