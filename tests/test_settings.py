"""One source of truth for settings: the manifest schema defines each exchange setting once
(type, range, default) and the transport, the optimizer and the peer take them from there."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from launcher.cli import main
from peer.process import PeerSetupError, _exchange_config, resolve_staleness
from peer.training.optim import DEFAULT_BUCKET_BYTES
from peer.transport.grpc.node import MANIFEST_SETTINGS, ExchangeConfig
from topology.manifest import (
    MAX_CHUNK_BYTES,
    ExchangeSpec,
    ManifestError,
    PeerSpec,
    SecuritySpec,
    TopologySpec,
    TrainingSpec,
    dump_manifest,
    init_manifest,
    parse_manifest,
)


def test_transport_defaults_are_the_schema_defaults() -> None:
    spec, config = ExchangeSpec(), ExchangeConfig()
    for name in MANIFEST_SETTINGS:
        assert getattr(config, name) == getattr(spec, name), name
    assert spec.bucket_bytes == DEFAULT_BUCKET_BYTES
    # the disagreements this replaces: connect 60 s vs 10 s, retries 5 vs 10, 4 vs 25 MiB
    assert config.connect_deadline_seconds == spec.connect_deadline_seconds == 60.0
    assert config.max_retries == spec.max_retries == 10
    assert DEFAULT_BUCKET_BYTES == 4 << 20
    assert set(MANIFEST_SETTINGS) <= {f.name for f in dataclasses.fields(ExchangeSpec)}


def test_every_manifest_setting_reaches_the_transport() -> None:
    data = init_manifest(2, "ring").to_dict()
    data["exchange"].update(
        chunk_bytes=MAX_CHUNK_BYTES,  # the largest the schema allows must run
        fetch_deadline_seconds=7.5,
        connect_deadline_seconds=3.0,
        retry_backoff_seconds=0.2,
        max_retries=2,
        retained_versions=6,
        bandwidth_bytes_per_second=1000,
        parallel_streams=3,
        verify_checksums=False,
        blocking_receive=True,
    )
    manifest = parse_manifest(data)
    config = _exchange_config(manifest, token="t")
    assert config.verify_checksums is False and not config.verifies_checksums
    assert config.blocking_receive is True
    for name in MANIFEST_SETTINGS:
        assert getattr(config, name) == getattr(manifest.exchange, name), name
    assert config.token == "t" and config.manifest_digest == manifest.digest()
    assert config.chunk_bytes + 64 <= config.max_message_bytes


@pytest.mark.parametrize(
    ("setting", "tls", "verifies"),
    [(None, False, True), (None, True, False), (False, False, False), (True, True, True)],
)
def test_checksums_follow_the_manifest_and_the_channel(
    setting: bool | None, tls: bool, verifies: bool
) -> None:
    from peer.transport.grpc.security import TlsConfig

    material = TlsConfig(cert_path="c", key_path="k", ca_path="a") if tls else None
    config = ExchangeConfig.from_spec(ExchangeSpec(verify_checksums=setting), tls=material)
    assert config.verifies_checksums is verifies


def test_verify_checksums_must_be_a_bool_or_null() -> None:
    data = init_manifest(2, "ring").to_dict()
    data["exchange"]["verify_checksums"] = "no"
    with pytest.raises(ManifestError, match=r"exchange\.verify_checksums"):
        parse_manifest(data)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"chunk_bytes": 0}, "exchange.chunk_bytes: 0 is out of range 1..33554432"),
        ({"max_retries": -1}, "exchange.max_retries: -1 is out of range (must be >= 0)"),
        ({"fetch_deadline_seconds": 0.0}, "exchange.fetch_deadline_seconds: must be > 0, got 0.0"),
        ({"parallel_streams": 0}, "exchange.parallel_streams: 0 is out of range (must be >= 1)"),
    ],
)
def test_transport_checks_are_the_schema_checks(settings: dict, message: str) -> None:
    with pytest.raises(ManifestError) as info:
        ExchangeConfig(**settings)
    assert str(info.value) == message


def test_too_large_chunks_fail_manifest_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = init_manifest(2, "ring").to_dict()
    data["exchange"]["chunk_bytes"] = 64 << 20  # passed `manifest check`, then crashed the peer
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["manifest", "check", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("exchange.chunk_bytes: 67108864 is out of range 1..33554432")
    assert "\n" not in err and "Traceback" not in err


def _with_staleness(bound: int, retained: int = 4) -> object:
    manifest = init_manifest(2, "ring", max_staleness=bound)
    exchange = dataclasses.replace(manifest.exchange, retained_versions=retained)
    return parse_manifest(
        {
            **yaml.safe_load(dump_manifest(manifest)),
            "exchange": exchange.to_dict(),
        }
    )


def test_max_staleness_flag_overrides_the_manifest_both_ways() -> None:
    manifest = _with_staleness(2)
    assert resolve_staleness(manifest, None) == 2
    assert resolve_staleness(manifest, 0) == 0  # lower: was max(0, 2) = 2
    assert resolve_staleness(manifest, 3) == 3
    with pytest.raises(PeerSetupError, match="retained_versions > 4 in the manifest"):
        resolve_staleness(manifest, 4)
    with pytest.raises(PeerSetupError, match="must be >= 0"):
        resolve_staleness(manifest, -1)


def test_constructing_a_section_directly_raises_manifest_errors() -> None:
    exchange = init_manifest(2, "ring").exchange
    with pytest.raises(ManifestError) as info:
        dataclasses.replace(exchange, chunk_bytes=64 << 20)
    assert str(info.value) == "exchange.chunk_bytes: 67108864 is out of range 1..33554432"
    with pytest.raises(ManifestError, match=r"^port: 0 is out of range 1\.\.65535$"):
        PeerSpec(0, "peer0", "127.0.0.1", 0)


README = Path(__file__).resolve().parent.parent / "README.md"
# Defaults the README states in words because they are derived from other fields.
DERIVED = {"exchange.max_staleness", "topology.directed", "topology.time_varying"}


def _readme_defaults() -> dict[str, str]:
    """``{field path: default cell}`` of the README's manifest reference table."""
    rows = {}
    for line in README.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) >= 3 and cells[0].strip("*").startswith("`"):
            rows[cells[0].strip("*").strip("`")] = cells[2]
    return rows


def test_readme_reference_states_the_schema_defaults() -> None:
    documented = _readme_defaults()
    sections = {
        "peers[]": PeerSpec,
        "topology": TopologySpec,
        "training": TrainingSpec,
        "exchange": ExchangeSpec,
        "security": SecuritySpec,
    }
    for prefix, section in sections.items():
        for f in dataclasses.fields(section):
            path = f"{prefix}.{f.name}"
            assert path in documented, f"README manifest reference lacks {path}"
            if path in DERIVED or f.default is dataclasses.MISSING:
                continue  # required, derived, injected (rank, name, host) or a mapping
            cell = documented[path].replace("`", "")
            stated = None if cell == "—" else yaml.safe_load(cell)  # "—": not set
            assert stated == f.default, f"{path}: README {cell!r}, {f.default!r}"
