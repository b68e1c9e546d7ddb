"""``manifest init`` writes task options, eval and checkpoint intervals from its flags."""

from __future__ import annotations

from pathlib import Path

from launcher.cli import main
from topology.manifest import load_manifest


def test_init_task_options_eval_and_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    code = main([
        "manifest", "init", "-n", "4", "--graph", "ring", "--hosts", "10.0.0.1,10.0.0.2",
        "--task-option", "hidden=256", "--task-option", "alpha=null", "--eval-every", "5",
        "--checkpoint-every", "10", "-o", str(path),
    ])  # fmt: skip
    assert code == 0
    training = load_manifest(path).training
    assert training.task_options == {"hidden": 256, "alpha": None}
    assert (training.eval_every, training.checkpoint_every) == (5, 10)


def test_peer_bind_setting() -> None:
    """``peers[].bind``: where the gRPC server and metrics endpoint listen (optional)."""
    import pytest

    from peer.process import _bind_host
    from topology.manifest import ManifestError, init_manifest, parse_manifest

    data = init_manifest(2, "ring", hosts=["10.0.0.1", "10.0.0.2"]).to_dict()
    plain = parse_manifest(data)
    assert "bind" not in data["peers"][0]  # unset: not written, digests unchanged
    assert _bind_host(plain.peers[0]) == "0.0.0.0"
    data["peers"][0]["bind"] = "10.0.0.1"
    bound = parse_manifest(data)
    assert bound.peers[0].bind == "10.0.0.1" and bound.peers[0].to_dict()["bind"] == "10.0.0.1"
    assert _bind_host(bound.peers[0]) == "10.0.0.1"
    assert _bind_host(init_manifest(1, "ring").peers[0]) == "127.0.0.1"
    data["peers"][0]["bind"] = "10.0.0.1:50051"
    with pytest.raises(ManifestError, match=r"peers\[0\]\.bind: .*no port"):
        parse_manifest(data)


def test_init_exchange_settings_are_validated(tmp_path: Path, capsys) -> None:
    path = tmp_path / "m.yaml"
    code = main([
        "manifest", "init", "-n", "2", "--graph", "ring", "--exchange",
        "wire_codec=top-byte-huffman", "--exchange", "fetch-deadline-seconds=60", "-o", str(path),
    ])  # fmt: skip
    assert code == 0
    exchange = load_manifest(path).exchange
    assert (exchange.wire_codec, exchange.fetch_deadline_seconds) == ("top-byte-huffman", 60.0)
    capsys.readouterr()
    for flag, message in [
        ("wire_codec=zstd", "exchange.wire_codec: 'zstd' is not one of none, top-byte-huffman"),
        ("nonsense=1", "exchange.nonsense: unknown key"),
        ("wire_codec", "--exchange: expected KEY=VALUE"),
    ]:
        assert main(["manifest", "init", "-n", "2", "--graph", "ring", "--exchange", flag]) == 2
        assert message in capsys.readouterr().err
