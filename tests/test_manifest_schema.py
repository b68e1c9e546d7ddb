"""``decentlam manifest schema``: the JSON Schema editors use, checked with ``jsonschema``."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from launcher.cli import main
from topology.manifest import SCHEMA_FILE, init_manifest, load_manifest

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = [*sorted((ROOT / "examples").glob("*.yaml")), ROOT / "deploy" / "compose-manifest.yaml"]


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    """The schema as ``decentlam manifest schema`` prints it."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["manifest", "schema"]) == 0
    printed = json.loads(out.getvalue())
    jsonschema.Draft202012Validator.check_schema(printed)
    return printed


def test_printed_schema_is_the_shipped_file(schema: dict[str, Any]) -> None:
    # Regenerate with: decentlam manifest schema -o topology/manifest.schema.json
    assert json.loads(SCHEMA_FILE.read_text(encoding="utf-8")) == schema


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_shipped_manifest_validates(schema: dict[str, Any], path: Path) -> None:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    jsonschema.validate(data, schema, cls=jsonschema.Draft202012Validator)
    load_manifest(path, check_files=False)  # and the full check agrees


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_name_the_shipped_schema(path: Path) -> None:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    prefix = "# yaml-language-server: $schema="
    assert first.startswith(prefix)
    assert (path.parent / first[len(prefix) :]).resolve() == SCHEMA_FILE


def test_generated_manifest_validates(schema: dict[str, Any]) -> None:
    data = init_manifest(8, "grid", graph_params={"rows": 2}, lr_schedule="cosine").to_dict()
    jsonschema.validate(data, schema, cls=jsonschema.Draft202012Validator)


def _set(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(data)
    *parents, last = path.split(".")
    node: Any = data
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    node[int(last) if last.isdigit() else last] = value
    return data


def _delete(data: dict[str, Any], path: str) -> dict[str, Any]:
    data = copy.deepcopy(data)
    *parents, last = path.split(".")
    node: Any = data
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    del node[last]
    return data


BASE = init_manifest(4, "ring").to_dict()
MALFORMED = {
    "port out of range": _set(BASE, "peers.2.port", 70000),
    "port is a string": _set(BASE, "peers.2.port", "50051"),
    "port is a boolean": _set(BASE, "peers.1.port", True),
    "unknown top key": _set(BASE, "tolopogy", {}),
    "unknown training key": _set(BASE, "training.lrr", 0.1),
    "unknown peer key": _set(BASE, "peers.1.prot", 1),
    "no peers": _set(BASE, "peers", []),
    "no port": _delete(BASE, "peers.0.port"),
    "no topology": _delete(BASE, "topology"),
    "no version": _delete(BASE, "version"),
    "version 2": _set(BASE, "version", 2),
    "unknown graph": _set(BASE, "topology.graph", "rnig"),
    "unknown weights": _set(BASE, "topology.weights", "metro"),
    "unknown algorithm": _set(BASE, "training.algorithm", "adam"),
    "lr zero": _set(BASE, "training.lr", 0),
    "lr string": _set(BASE, "training.lr", "fast"),
    "momentum one": _set(BASE, "training.momentum", 1.0),
    "steps fractional": _set(BASE, "training.steps", 10.5),
    "bad device": _set(BASE, "peers.0.device", "gpu0"),
    "empty name": _set(BASE, "peers.0.name", ""),
    "bad schedule": _set(BASE, "training.lr_schedule", "linear"),
    "chunk too large": _set(BASE, "exchange.chunk_bytes", 1 << 40),
    "deadline zero": _set(BASE, "exchange.fetch_deadline_seconds", 0),
    "tls without key": _set(BASE, "security.tls", {"cert": "c.pem", "ca": "ca.pem"}),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_schema_rejects_malformed(schema: dict[str, Any], name: str) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(MALFORMED[name], schema, cls=jsonschema.Draft202012Validator)


def test_init_names_the_schema_for_editors(tmp_path: Path) -> None:
    output = tmp_path / "sub" / "m.yaml"
    output.parent.mkdir()
    assert main(["manifest", "init", "-n", "2", "--graph", "ring", "-o", str(output)]) == 0
    first = output.read_text(encoding="utf-8").splitlines()[0]
    prefix = "# yaml-language-server: $schema="
    assert first.startswith(prefix)
    ref = Path(first[len(prefix) :])
    assert (ref if ref.is_absolute() else output.parent / ref).resolve() == SCHEMA_FILE
    assert load_manifest(output).world_size == 2

    url = "https://example.org/manifest.schema.json"
    args = ["manifest", "init", "-n", "2", "--graph", "ring", "-o", str(output), "--force"]
    assert main([*args, "--schema", url]) == 0
    assert output.read_text(encoding="utf-8").startswith(f"{prefix}{url}\n")
    assert main([*args, "--schema", "none"]) == 0
    assert "yaml-language-server" not in output.read_text(encoding="utf-8")
