"""Import boundaries between the layers (see the docstrings of ``peer`` and its subpackages).

Every import statement of every module is read with :mod:`ast` (including imports inside
functions, which the code uses to keep heavy dependencies lazy) and checked against the rules
the package docstrings state. A violation names the module, the line and the rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
STUBS = "peer.transport.grpc.proto"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, imported module)`` of every import in ``path`` (relative ones resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return found


def _modules(*packages: str) -> list[Path]:
    paths: list[Path] = []
    for package in packages:
        root = REPO_ROOT.joinpath(*package.split("."))
        paths.extend(p for p in sorted(root.rglob("*.py")) if STUBS.replace(".", "/") not in str(p))
    return paths


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


# (packages the rule applies to, forbidden import prefixes, allowed exceptions, why)
RULES: list[tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], str]] = [
    (("topology",), ("peer", "launcher", "grpc", "prometheus_client"), (), "topology is pure"),
    (
        ("peer.algorithms",),
        ("peer", "topology", "launcher", "grpc", "prometheus_client"),
        ("peer.algorithms", "peer.errors"),
        "update rules import no transport, training or I/O",
    ),
    (
        ("peer.simulation",),
        ("peer", "launcher", "grpc", "prometheus_client"),
        ("peer.algorithms", "peer.simulation", "peer.errors"),
        "the simulator drives the rules without a transport",
    ),
    (
        ("peer.transport",),
        ("peer.training", "peer.process", "peer.simulation", "peer.algorithms", "launcher"),
        (),
        "transports know nothing of training",
    ),
    (
        ("peer.training",),
        ("peer.transport", "peer.process", "launcher", "grpc"),
        ("peer.transport.base",),
        "training sees the transport only through its interface",
    ),
    (("peer",), ("launcher",), (), "peer never imports launcher"),
]


def _violations() -> list[str]:
    found: list[str] = []
    for packages, forbidden, allowed, why in RULES:
        for path in _modules(*packages):
            for line, name in _imports(path):
                if any(_within(name, a) for a in allowed):
                    continue
                if any(_within(name, f) for f in forbidden):
                    rel = path.relative_to(REPO_ROOT)
                    found.append(f"{rel}:{line} imports {name} ({why})")
    # grpc and the generated stubs: only inside peer.transport.grpc (tests may use them).
    for path in _modules("peer", "topology", "launcher"):
        module = _module_name(path)
        if _within(module, "peer.transport.grpc"):
            continue
        for line, name in _imports(path):
            if _within(name, "grpc") or _within(name, STUBS):
                rel = path.relative_to(REPO_ROOT)
                found.append(f"{rel}:{line} imports {name} (only peer.transport.grpc uses grpc)")
    return found


def test_layers_import_only_downwards() -> None:
    assert _violations() == []


def test_checker_sees_a_violation() -> None:
    # The checker itself must be able to fail: a rules module that imports a transport.
    bad = REPO_ROOT / "peer" / "algorithms" / "_layer_probe_tmp.py"
    bad.write_text(
        "import grpc\n\n\ndef f():\n    from peer.transport.grpc import node\n    return node\n"
    )
    try:
        problems = _violations()
    finally:
        bad.unlink()
    assert any("_layer_probe_tmp.py:5 imports peer.transport.grpc" in p for p in problems)
    assert any("only peer.transport.grpc uses grpc" in p for p in problems)


def test_every_package_says_what_it_may_import() -> None:
    for package in ("peer.algorithms", "peer.simulation", "peer.transport", "peer.training"):
        init = REPO_ROOT.joinpath(*package.split("."), "__init__.py")
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "import" in doc, f"{package} docstring does not state its import rules"
