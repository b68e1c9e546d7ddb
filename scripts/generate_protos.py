"""Generate the Python gRPC stubs of ``protos/`` into ``peer/transport/grpc/proto/`` (the one build
step).

Runs ``grpc_tools.protoc`` on every ``.proto`` file under ``protos/`` and writes ``*_pb2.py``,
``*_pb2_grpc.py`` and ``*_pb2.pyi`` under ``peer/transport/grpc/proto/`` with the same relative
layout
(``protos/decentlam/v1/peer.proto`` -> ``peer/transport/grpc/proto/decentlam/v1/peer_pb2.py``).
protoc emits
absolute imports rooted at the proto root (``from decentlam.v1 import peer_pb2``); they are
rewritten to ``from peer.transport.grpc.proto.decentlam.v1 import peer_pb2`` so the stubs import as
a normal
subpackage without touching ``sys.path``. Missing ``__init__.py`` files are created.

Usage::

    python scripts/generate_protos.py            # regenerate the committed stubs
    python scripts/generate_protos.py --out DIR  # write the tree somewhere else (freshness test)
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
PACKAGE_ROOT = "peer.transport.grpc.proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")
INIT_TEXT = '"""Generated gRPC stubs (see scripts/generate_protos.py); do not edit."""\n'


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """All ``.proto`` sources under ``proto_root``, sorted for a deterministic build."""
    return sorted(proto_root.rglob("*.proto"))


def _rewrite_imports(text: str, packages: set[str]) -> str:
    # `from decentlam.v1 import peer_pb2` -> `from peer.transport.grpc.proto.decentlam.v1 import
    # peer_pb2`
    for package in sorted(packages, key=len, reverse=True):
        pattern = rf"^(\s*)from {re.escape(package)} import "
        text = re.sub(pattern, rf"\1from {PACKAGE_ROOT}.{package} import ", text, flags=re.M)
    return text


def generate(out_dir: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Generate the stubs of every proto under ``proto_root`` into ``out_dir``.

    Args:
        out_dir: directory that plays the role of ``peer/transport/grpc/proto`` (created if
            missing).
        proto_root: directory holding the ``.proto`` sources.

    Returns:
        The generated files (stubs and ``__init__.py``), sorted.

    Raises:
        RuntimeError: protoc reported an error.
    """
    from grpc_tools import protoc  # build-time dependency only (grpcio-tools)

    sources = proto_files(proto_root)
    if not sources:
        raise RuntimeError(f"no .proto files under {proto_root}")
    out_dir.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(source.relative_to(proto_root)) for source in sources),
    ]
    # protoc resolves relative source names against the -I roots; run from proto_root.
    status = protoc.main(args)
    if status != 0:
        raise RuntimeError(f"protoc failed with status {status}: {' '.join(args)}")
    packages = {".".join(s.relative_to(proto_root).parent.parts) for s in sources}
    generated: list[Path] = []
    for path in sorted(out_dir.rglob("*")):
        if path.is_file() and path.name.endswith(GENERATED_SUFFIXES):
            path.write_text(_rewrite_imports(path.read_text(), packages))
            generated.append(path)
    for package in sorted(packages):
        directory = out_dir
        for part in ["", *package.split(".")]:
            directory = directory / part if part else directory
            init = directory / "__init__.py"
            if not init.exists():
                init.write_text(INIT_TEXT)
            generated.append(init)
    return sorted(set(generated))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / "peer" / "transport" / "grpc" / "proto",
        help="output directory standing for peer/transport/grpc/proto (default: this repo's)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in generate(args.out):
        logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
