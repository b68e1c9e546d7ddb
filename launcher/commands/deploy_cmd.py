"""``decentlam deploy``: what an operator runs on each host, from one manifest.

``--target ssh`` writes a start script per host and a ``deploy.sh`` that copies everything over
ssh; ``--target systemd`` one unit per peer; ``--target kubernetes`` a StatefulSet, a headless
Service, a ConfigMap and a Secret. The generators are the pure functions of
:mod:`launcher.targets`; this module validates the manifest, reads its token and TLS files and
writes the files (secrets with mode 0600, scripts executable).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from launcher import targets
from launcher.errors import UsageError

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``deploy`` subcommand."""
    parser = subparsers.add_parser(
        "deploy",
        help="write per-host deployment files (ssh scripts, systemd units, Kubernetes objects)",
        description="Write what an operator runs on each host of a manifest: --target ssh (a "
        "start script per host and deploy.sh), systemd (one unit per peer) or kubernetes "
        "(StatefulSet, headless Service, ConfigMap with the manifest, Secret with the token "
        "and TLS files). The manifest's token and TLS files are copied into DIR.",
    )
    parser.add_argument("--manifest", type=Path, required=True, help="cluster manifest YAML")
    parser.add_argument("--target", required=True, choices=targets.TARGETS)
    parser.add_argument("-o", "--output", type=Path, required=True, help="output directory")
    parser.add_argument("--force", action="store_true", help="write into a non-empty DIR")
    parser.add_argument(
        "--remote-dir",
        default=targets.DEFAULT_REMOTE_DIR,
        help=f"ssh: directory on every host (default {targets.DEFAULT_REMOTE_DIR})",
    )
    parser.add_argument(
        "--executable",
        default=targets.DEFAULT_EXECUTABLE,
        help=f"systemd: absolute path of decentlam on the hosts (default "
        f"{targets.DEFAULT_EXECUTABLE})",
    )
    parser.add_argument("--user", help="systemd: run the peers as this user")
    parser.add_argument("--image", default=targets.DEFAULT_IMAGE, help="kubernetes: peer image")
    parser.add_argument(
        "--name", default=targets.DEFAULT_NAME, help="kubernetes: object and peer DNS name"
    )
    parser.add_argument("--namespace", default="default", help="kubernetes: namespace")
    parser.add_argument("--storage", default="1Gi", help="kubernetes: volume size per peer")
    parser.set_defaults(func=run)


def target_options(args: argparse.Namespace) -> dict[str, Any]:
    """The generator keyword arguments of ``args.target``."""
    if args.target == "ssh":
        return {"remote_dir": args.remote_dir}
    if args.target == "systemd":
        return {"executable": args.executable, "user": args.user}
    return {
        "image": args.image, "name": args.name, "namespace": args.namespace,
        "storage": args.storage,
    }  # fmt: skip


def write_artifacts(out: Path, files: dict[str, targets.Artifact]) -> None:
    """Write ``files`` under ``out`` (secrets 0600, scripts 0755, atomically per file)."""
    for relative, artifact in sorted(files.items()):
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        mode = 0o600 if artifact.secret else 0o755 if artifact.executable else 0o644
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as handle:
            handle.write(artifact.text)
        os.chmod(tmp, mode)
        tmp.replace(path)


def run(args: argparse.Namespace) -> int:
    """Generate and write the target's files; print what to do next."""
    from topology.manifest import load_manifest

    if not args.manifest.exists():
        raise UsageError(f"manifest {args.manifest} does not exist")
    manifest = load_manifest(args.manifest)
    out: Path = args.output
    if out.exists() and any(out.iterdir()) and not args.force:
        raise UsageError(f"{out} is not empty (use --force to write into it)")
    try:
        secrets = targets.read_secrets(manifest)
    except OSError as exc:
        raise UsageError(f"cannot read the manifest's security files: {exc}") from exc
    files = targets.generate(args.target, manifest, secrets, target_options(args))
    write_artifacts(out, files)
    hosts = sorted({p.host for p in manifest.peers})
    print(f"decentlam deploy: {args.target}, {manifest.world_size} peers on {len(hosts)} "
          f"host(s); {len(files)} files in {out}")  # fmt: skip
    for relative in sorted(files):
        print(f"  {out / relative}")
    return 0
