"""The committed stubs under peer/transport/grpc/proto are exactly what scripts/generate_protos.py
produces."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def load_generator():
    spec = importlib.util.spec_from_file_location(
        "generate_protos", REPO_ROOT / "scripts" / "generate_protos.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    generated = load_generator().generate(tmp_path)
    committed = REPO_ROOT / "peer" / "transport" / "grpc" / "proto"
    names = {p.relative_to(tmp_path) for p in generated}
    assert any(n.name == "peer_pb2.py" for n in names)
    stale = [
        str(n) for n in sorted(names) if (committed / n).read_bytes() != (tmp_path / n).read_bytes()
    ]
    assert not stale, f"stale generated files (run scripts/generate_protos.py): {stale}"


def test_stubs_import_as_a_package() -> None:
    from peer.transport.grpc.proto.decentlam.v1 import peer_pb2, peer_pb2_grpc

    assert peer_pb2.DESCRIPTOR.package == "decentlam.v1"
    assert hasattr(peer_pb2_grpc, "PeerStub")
