"""Manifest API: loading, round trips, init_manifest, lookups, digest, files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from topology.manifest import (
    Manifest,
    ManifestError,
    PeerSpec,
    dump_manifest,
    init_manifest,
    load_manifest,
    parse_manifest,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_local_4_example() -> None:
    manifest = load_manifest(EXAMPLES / "local-4.yaml")
    assert manifest.world_size == 4
    assert {p.host for p in manifest.peers} == {"127.0.0.1"}
    assert manifest.topology.graph == "exponential"
    assert manifest.training.algorithm == "decentlam" and manifest.training.task == "digits"
    assert manifest.training.lr_schedule.name == "warmup"
    assert manifest.source == EXAMPLES / "local-4.yaml"
    topo = manifest.build_topology()
    assert topo is manifest.build_topology()
    assert topo.weights == "metropolis" and topo.n == 4


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_every_example_loads_and_round_trips(name: str) -> None:
    manifest = load_manifest(EXAMPLES / name, check_files=False)
    again = parse_manifest(yaml.safe_load(dump_manifest(manifest)), check_files=False)
    assert again == manifest
    assert again.digest() == manifest.digest()


def test_defaults() -> None:
    manifest = parse_manifest(
        {"version": 1, "peers": [{"port": 5000}, {"port": 5001}], "topology": {"graph": "ring"}}
    )
    assert manifest.peers[1] == PeerSpec(1, "peer1", "127.0.0.1", 5001, None, "auto")
    assert manifest.training.lr == 0.1 and manifest.training.steps == 100
    assert manifest.exchange.chunk_bytes == 1 << 20
    assert manifest.exchange.fetch_deadline_seconds == 30.0
    assert manifest.exchange.bandwidth_bytes_per_second is None
    assert manifest.security.token_file is None and manifest.security.tls is None
    assert manifest.topology.require_symmetric == "warn"


@pytest.mark.parametrize(
    ("graph", "params"),
    [
        ("ring", {}),
        ("torus", {"rows": 2}),
        ("one-peer-exponential", {}),
        ("random-regular", {"degree": 3, "seed": 4}),
        ("exp", {}),
        ("explicit", {"edges": [[0, 1], [1, 2], [2, 3], [3, 4], [4, 5], [5, 6], [6, 7], [7, 0]]}),
    ],
)
def test_init_load_round_trip_same_topology(tmp_path: Path, graph: str, params: dict) -> None:
    manifest = init_manifest(8, graph, graph_params=params, steps=50, algorithm="dmsgd")
    path = tmp_path / "m.yaml"
    path.write_text(dump_manifest(manifest))
    loaded = load_manifest(path)
    assert loaded == manifest and loaded.digest() == manifest.digest()
    a, b = manifest.build_topology(), loaded.build_topology()
    assert a.graph == b.graph
    for k in range(a.period):
        np.testing.assert_array_equal(a.mixing_matrix(k), b.mixing_matrix(k))
    assert loaded.training.steps == 50 and loaded.training.algorithm == "dmsgd"


def test_init_multi_host_layout() -> None:
    manifest = init_manifest(6, "ring", hosts=["a", "b"], base_port=7000, base_metrics_port=8000)
    assert [(p.host, p.port, p.metrics_port) for p in manifest.peers] == [
        ("a", 7000, 8000),
        ("a", 7001, 8001),
        ("a", 7002, 8002),
        ("b", 7000, 8000),
        ("b", 7001, 8001),
        ("b", 7002, 8002),
    ]
    assert [
        p.host for p in init_manifest(4, "ring", hosts=["a", "b", "c"], peers_per_host=2).peers
    ] == ["a", "a", "b", "b"]
    with pytest.raises(ManifestError, match="cannot hold 5 peers"):
        init_manifest(5, "ring", hosts=["a", "b"], peers_per_host=2)
    with pytest.raises(ManifestError, match=r"training\.lrr: unknown key"):
        init_manifest(4, "ring", lrr=0.1)
    with pytest.raises(ManifestError, match="nodes: expected a positive integer"):
        init_manifest(0, "ring")


def test_peer_lookups() -> None:
    manifest = init_manifest(4, "ring")
    assert manifest.peer(2).port == 50053
    assert manifest.find_peer("localhost", 50054).rank == 3
    assert manifest.find_peer("127.0.0.1", 50051).address == "127.0.0.1:50051"
    with pytest.raises(ManifestError, match="no peer with rank 4"):
        manifest.peer(4)
    with pytest.raises(ManifestError, match=r"no peer listens on 10\.0\.0\.1:1"):
        manifest.find_peer("10.0.0.1", 1)


def test_digest_tracks_content_not_security_paths(tmp_path: Path) -> None:
    base = init_manifest(4, "ring")
    assert base.digest() == init_manifest(4, "ring").digest()
    assert base.digest() != init_manifest(4, "ring", lr=0.2).digest()
    assert len(base.digest()) == 64
    token = tmp_path / "token"
    token.write_text("secret")
    data = base.to_dict()
    data["security"] = {"token_file": str(token)}
    assert parse_manifest(data).digest() == base.digest()


def test_relative_files_resolve_against_manifest_dir(tmp_path: Path) -> None:
    for name in ("token.txt", "cert.pem", "key.pem", "ca.pem"):
        (tmp_path / name).write_text("x")
    data = init_manifest(2, "ring").to_dict()
    data["security"] = {
        "token_file": "../token.txt",
        "tls": {"cert": "../cert.pem", "key": "../key.pem", "ca": "../ca.pem", "mutual": True},
    }
    path = tmp_path / "sub" / "m.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(data))
    manifest = load_manifest(path)
    assert manifest.security.token_file.resolve() == (tmp_path / "token.txt").resolve()
    assert manifest.security.tls.mutual
    assert manifest.security.tls.ca.read_text() == "x"
    (tmp_path / "key.pem").unlink()
    with pytest.raises(ManifestError, match=r"security\.tls\.key: file not found"):
        load_manifest(path)
    assert load_manifest(path, check_files=False).security.tls is not None


def test_schedule_and_staleness() -> None:
    data = init_manifest(2, "ring").to_dict()
    data["training"].update(
        lr_schedule={"name": "step", "milestones": [10, 20], "gamma": 0.5}, max_staleness=2
    )
    del data["exchange"]["max_staleness"]
    manifest = parse_manifest(data)
    assert manifest.training.lr_schedule.milestones == (10, 20)
    assert manifest.exchange.max_staleness == 2
    data["training"]["lr_schedule"] = "cosine"
    assert parse_manifest(data).training.lr_schedule.name == "cosine"


def test_manifest_is_frozen() -> None:
    manifest = init_manifest(2, "ring")
    with pytest.raises(AttributeError):
        manifest.peers = ()  # type: ignore[misc]
    assert isinstance(manifest, Manifest)
