"""What an operator runs on each host, generated from one manifest (``decentlam deploy``).

Three targets, each a pure function of a :class:`~topology.manifest.Manifest` returning the
files to write (relative path -> :class:`Artifact`); :mod:`launcher.commands.deploy_cmd` writes
them. Nothing here reads or writes files except what the caller passes in.

* ``ssh``: ``hosts/<host>.sh`` per host (copies nothing, starts that host's peers in the
  background with their logs and pid files, ``stop`` ends them) and ``deploy.sh``, which copies
  the manifest, the token and TLS files and the host script to every host over ssh and runs it.
* ``systemd``: ``systemd/<host>/decentlam-<name>.service``, one unit per peer, restarted on
  failure, plus the files the units read under ``/etc/decentlam``.
* ``kubernetes``: ``kubernetes.yaml`` with a ConfigMap (the manifest), a Secret (token, TLS
  files), a headless Service (stable per-peer DNS names, published before readiness) and a
  StatefulSet (``podManagementPolicy: Parallel``, pod ordinal = rank, Prometheus annotations).
  Peer hosts become ``<name>-<rank>.<name>.<namespace>.svc.cluster.local`` and every peer uses
  the same ports, so the deployed manifest differs from the input in hosts and ports.

Every target deploys a copy of the manifest whose ``security`` paths point where the files
are installed (the digest ignores ``security``, so hosts agree).
"""

from __future__ import annotations

import base64
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from launcher.errors import UsageError

TARGETS = ("ssh", "systemd", "kubernetes")
DEFAULT_REMOTE_DIR = "/opt/decentlam"
SYSTEMD_CONFIG_DIR = "/etc/decentlam"
SYSTEMD_STATE_DIR = "/var/lib/decentlam"
DEFAULT_EXECUTABLE = "/usr/local/bin/decentlam"
DEFAULT_IMAGE = "decentlam:latest"
DEFAULT_NAME = "decentlam"
K8S_CONFIG_DIR = "/etc/decentlam"
K8S_SECRET_DIR = "/etc/decentlam/secret"
K8S_STATE_DIR = "/var/lib/decentlam"
K8S_GRPC_PORT = 50051
K8S_METRICS_PORT = 9100
PEER_ARGS = ("--log-level", "INFO", "peer")
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class Artifact:
    """One generated file: its text and whether it is executable (or secret: mode 0600)."""

    text: str
    executable: bool = False
    secret: bool = False


@dataclass(frozen=True)
class Secrets:
    """Contents of the manifest's token and TLS files (``None`` where the manifest has none)."""

    token: str | None = None
    cert: str | None = None
    key: str | None = None
    ca: str | None = None


def read_secrets(manifest: Any) -> Secrets:
    """Read the token and TLS files a manifest names (the only I/O of this module)."""
    security = manifest.security
    tls = security.tls

    def text(path: Path | None) -> str | None:
        return None if path is None else Path(path).read_text()

    return Secrets(
        token=text(security.token_file),
        cert=None if tls is None else text(tls.cert),
        key=None if tls is None else text(tls.key),
        ca=None if tls is None else text(tls.ca),
    )


def _deployed_manifest(
    manifest: Any, secret_dir: str, peers: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The manifest as plain data with its security paths under ``secret_dir``."""
    data = manifest.to_dict()
    if peers is not None:
        data["peers"] = peers
    security = data.get("security") or {}
    if security.get("token_file") is not None:
        security["token_file"] = f"{secret_dir}/token"
    tls = security.get("tls")
    if tls:
        tls.update(
            cert=f"{secret_dir}/tls.crt", key=f"{secret_dir}/tls.key", ca=f"{secret_dir}/ca.crt"
        )
    if security:
        data["security"] = security
    return data


def _secret_files(secrets: Secrets) -> dict[str, str]:
    pairs = {"token": secrets.token, "tls.crt": secrets.cert, "tls.key": secrets.key}
    pairs["ca.crt"] = secrets.ca
    return {name: text for name, text in pairs.items() if text is not None}


def _host_file_name(host: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", host)


def _by_host(manifest: Any) -> dict[str, list[Any]]:
    hosts: dict[str, list[Any]] = {}
    for peer in manifest.peers:
        hosts.setdefault(peer.host, []).append(peer)
    return hosts


def _dump(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def _ports_note(peers: list[Any]) -> str:
    ports = []
    for peer in peers:
        ports.append(f"{peer.port}/tcp (gRPC, peer {peer.rank})")
        if peer.metrics_port is not None:
            ports.append(f"{peer.metrics_port}/tcp (metrics, peer {peer.rank})")
    return ", ".join(ports)


def ssh_target(
    manifest: Any, secrets: Secrets, *, remote_dir: str = DEFAULT_REMOTE_DIR
) -> dict[str, Artifact]:
    """Per-host start scripts and a ``deploy.sh`` that copies and starts them over ssh.

    Args:
        manifest: the validated manifest.
        secrets: contents of its token / TLS files.
        remote_dir: where files go on every host.

    Returns:
        ``manifest.yaml``, ``secret/*``, ``hosts/<host>.sh`` and ``deploy.sh``.
    """
    secret_dir = f"{remote_dir}/secret"
    files: dict[str, Artifact] = {
        "manifest.yaml": Artifact(_dump(_deployed_manifest(manifest, secret_dir)))
    }
    for name, text in _secret_files(secrets).items():
        files[f"secret/{name}"] = Artifact(text, secret=True)
    q = shlex.quote
    copies = []
    for host, peers in _by_host(manifest).items():
        script = _host_file_name(host) + ".sh"
        lines = [
            "#!/usr/bin/env bash",
            f"# Peers {', '.join(str(p.rank) for p in peers)} of the manifest, on host {host}.",
            f"# Open these ports to the other hosts: {_ports_note(peers)}.",
            "# Usage: bash this-file [start|stop|status]. Start order across hosts does not",
            "# matter: each peer waits for its neighbours (exchange.connect_deadline_seconds).",
            "set -euo pipefail",
            f"DIR={q(remote_dir)}",
            "DECENTLAM=${DECENTLAM:-decentlam}",
            'mkdir -p "$DIR/out" "$DIR/logs"',
            'case "${1:-start}" in',
            "start)",
        ]
        for index, peer in enumerate(peers):
            lines += [
                f"    # peer {peer.rank} ({peer.name}) on port {peer.port}",
                f'    nohup "$DECENTLAM" --log-level INFO peer --manifest "$DIR/manifest.yaml" '
                f'--rank {peer.rank} --out "$DIR/out" >>"$DIR/logs/rank-{peer.rank}.log" 2>&1 &',
                f'    echo $! >"$DIR/out/rank-{peer.rank}.pid"',
                f'    echo "started peer {peer.rank} (local index {index}), log '
                f'$DIR/logs/rank-{peer.rank}.log"',
            ]
        lines += [";;", "stop)"]
        for peer in peers:
            pid = f'"$DIR/out/rank-{peer.rank}.pid"'
            lines.append(f'    [ -f {pid} ] && kill -TERM "$(cat {pid})" 2>/dev/null || true')
        lines += [";;", "status)"]
        for peer in peers:
            pid = f'"$DIR/out/rank-{peer.rank}.pid"'
            lines.append(
                f'    if [ -f {pid} ] && kill -0 "$(cat {pid})" 2>/dev/null; then '
                f'echo "peer {peer.rank}: running"; else echo "peer {peer.rank}: stopped"; fi'
            )
        lines += [";;", '*) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;', "esac", ""]
        files[f"hosts/{script}"] = Artifact("\n".join(lines), executable=True)
        copies.append((host, script))
    deploy_lines = [
        "#!/usr/bin/env bash",
        "# Copy the manifest, secrets and each host's script to every host and start its peers.",
        "# Needs ssh access as $SSH_USER (default: you) and decentlam installed on every host.",
        "# Usage: bash deploy.sh [start|stop|status]",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        f"DIR={q(remote_dir)}",
        "ACTION=${1:-start}",
        "USER_AT=${SSH_USER:+$SSH_USER@}",
    ]
    for host, script in copies:
        target = f'"$USER_AT"{q(host)}'
        deploy_lines += [
            f"# host {host}",
            'if [ "$ACTION" = start ]; then',
            f'    ssh {target} "mkdir -p $DIR/secret && chmod 700 $DIR/secret"',
            f'    scp -q manifest.yaml hosts/{script} {target}:"$DIR/"',
            '    if [ -d secret ] && [ -n "$(ls secret)" ]; then',
            f'        scp -q secret/* {target}:"$DIR/secret/"',
            "    fi",
            "fi",
            f'ssh {target} "bash $DIR/{script} $ACTION"',
        ]
    deploy_lines.append("")
    files["deploy.sh"] = Artifact("\n".join(deploy_lines), executable=True)
    return files


def systemd_target(
    manifest: Any,
    secrets: Secrets,
    *,
    executable: str = DEFAULT_EXECUTABLE,
    user: str | None = None,
) -> dict[str, Artifact]:
    """One systemd unit per peer, grouped by host.

    Args:
        manifest: the validated manifest.
        secrets: contents of its token / TLS files.
        executable: absolute path of ``decentlam`` on the hosts.
        user: run the peers as this user (default: systemd's, root).

    Returns:
        ``systemd/<host>/decentlam-<name>.service`` per peer, ``manifest.yaml`` and
        ``secret/*`` (to install under ``/etc/decentlam``), ``README.txt``.
    """
    if not executable.startswith("/"):
        raise UsageError(f"--executable must be an absolute path, got {executable!r}")
    secret_dir = f"{SYSTEMD_CONFIG_DIR}/secret"
    files: dict[str, Artifact] = {
        "manifest.yaml": Artifact(_dump(_deployed_manifest(manifest, secret_dir)))
    }
    for name, text in _secret_files(secrets).items():
        files[f"secret/{name}"] = Artifact(text, secret=True)
    readme = [
        "Install on each host:",
        f"  mkdir -p {SYSTEMD_CONFIG_DIR}/secret && cp manifest.yaml {SYSTEMD_CONFIG_DIR}/",
        f"  cp secret/* {SYSTEMD_CONFIG_DIR}/secret/ && chmod 600 {SYSTEMD_CONFIG_DIR}/secret/*",
        "  cp systemd/<this host>/*.service /etc/systemd/system/ && systemctl daemon-reload",
        "  systemctl enable --now decentlam-<name>   (one per unit; any order, any host first)",
        "",
    ]
    for host, peers in _by_host(manifest).items():
        readme.append(f"host {host}: open {_ports_note(peers)}")
        for peer in peers:
            unit = [
                "[Unit]",
                f"Description=decentlam peer {peer.rank} ({peer.name}) on {host}:{peer.port}",
                "Wants=network-online.target",
                "After=network-online.target",
                "",
                "[Service]",
                "Type=exec",
                f"ExecStart={executable} --log-level INFO peer --manifest "
                f"{SYSTEMD_CONFIG_DIR}/manifest.yaml --rank {peer.rank} --out "
                f"{SYSTEMD_STATE_DIR}/{peer.name}",
                f"StateDirectory=decentlam/{peer.name}",
                # exit 1 = gave up (peer-<r>.json says why): restart and resume.
                "Restart=on-failure",
                "RestartSec=10",
                "KillSignal=SIGTERM",
                "TimeoutStopSec=120",
            ]
            if user is not None:
                unit.append(f"User={user}")
            unit += ["", "[Install]", "WantedBy=multi-user.target", ""]
            path = f"systemd/{_host_file_name(host)}/decentlam-{peer.name}.service"
            files[path] = Artifact("\n".join(unit))
    files["README.txt"] = Artifact("\n".join([*readme, ""]))
    return files


def kubernetes_target(
    manifest: Any,
    secrets: Secrets,
    *,
    image: str = DEFAULT_IMAGE,
    name: str = DEFAULT_NAME,
    namespace: str = "default",
    storage: str = "1Gi",
) -> dict[str, Artifact]:
    """A ConfigMap, a Secret, a headless Service and a StatefulSet running every peer.

    Args:
        manifest: the validated manifest.
        secrets: contents of its token / TLS files.
        image: the peer image (``Dockerfile``).
        name: name of the StatefulSet, Service, ConfigMap and Secret (a DNS label).
        namespace: the Kubernetes namespace (peer DNS names include it).
        storage: size of each peer's volume (checkpoints, ``peer-<r>.json``).

    Returns:
        ``{"kubernetes.yaml": ...}`` (four documents) and ``manifest.yaml`` (the one deployed).
    """
    for what, value in (("--name", name), ("--namespace", namespace)):
        if not _DNS_LABEL.match(value):
            raise UsageError(f"{what}: {value!r} is not a DNS label (lowercase, digits, '-')")
    devices = {p.device for p in manifest.peers}
    peers = []
    for spec in manifest.peers:
        peer = spec.to_dict()
        peer.update(
            host=f"{name}-{spec.rank}.{name}.{namespace}.svc.cluster.local",
            port=K8S_GRPC_PORT,
            metrics_port=K8S_METRICS_PORT,
        )
        peers.append(peer)
    deployed = _dump(_deployed_manifest(manifest, K8S_SECRET_DIR, peers))
    labels = {"app.kubernetes.io/name": "decentlam", "app.kubernetes.io/instance": name}
    meta = {"name": name, "namespace": namespace, "labels": labels}
    configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
                 "data": {"manifest.yaml": deployed}}  # fmt: skip
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta,
        "type": "Opaque",
        "data": {
            key: base64.b64encode(text.encode()).decode()
            for key, text in _secret_files(secrets).items()
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "clusterIP": "None",
            # Peers must find each other before they are ready (they wait for neighbours).
            "publishNotReadyAddresses": True,
            "selector": labels,
            "ports": [
                {"name": "grpc", "port": K8S_GRPC_PORT, "targetPort": "grpc"},
                {"name": "metrics", "port": K8S_METRICS_PORT, "targetPort": "metrics"},
            ],
        },
    }
    container: dict[str, Any] = {
        "name": "peer",
        "image": image,
        "args": [
            *PEER_ARGS,
            "--manifest",
            f"{K8S_CONFIG_DIR}/manifest.yaml",
            "--out",
            K8S_STATE_DIR,
        ],
        "env": [
            {
                "name": "DECENTLAM_RANK",
                "valueFrom": {
                    "fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}
                },
            }
        ],
        "ports": [
            {"name": "grpc", "containerPort": K8S_GRPC_PORT},
            {"name": "metrics", "containerPort": K8S_METRICS_PORT},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/metrics", "port": "metrics"},
            "periodSeconds": 5,
        },
        "volumeMounts": [
            {"name": "manifest", "mountPath": K8S_CONFIG_DIR, "readOnly": True},
            {"name": "secret", "mountPath": K8S_SECRET_DIR, "readOnly": True},
            {"name": "state", "mountPath": K8S_STATE_DIR},
        ],
    }
    if all(d.startswith("cuda") for d in devices):  # "auto" peers run where they land
        container["resources"] = {"limits": {"nvidia.com/gpu": 1}}
    statefulset = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": meta,
        "spec": {
            "serviceName": name,
            "replicas": manifest.world_size,
            # Start order does not matter (peers wait for their neighbours): start all at once.
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(K8S_METRICS_PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    "terminationGracePeriodSeconds": 120,
                    "containers": [container],
                    "volumes": [
                        {"name": "manifest", "configMap": {"name": name}},
                        {"name": "secret", "secret": {"secretName": name, "defaultMode": 0o400}},
                    ],
                },
            },
            "volumeClaimTemplates": [
                {
                    "metadata": {"name": "state"},
                    "spec": {
                        "accessModes": ["ReadWriteOnce"],
                        "resources": {"requests": {"storage": storage}},
                    },
                }
            ],
        },
    }
    documents = [configmap, secret, service, statefulset]
    header = (
        f"# decentlam on Kubernetes: {manifest.world_size} peers "
        f"(generated by decentlam deploy --target kubernetes)\n"
    )
    text = header + "---\n".join(_dump(d) for d in documents)
    return {
        "kubernetes.yaml": Artifact(text, secret=bool(secret["data"])),
        "manifest.yaml": Artifact(deployed),
    }


def generate(
    target: str, manifest: Any, secrets: Secrets, options: Mapping[str, Any]
) -> dict[str, Artifact]:
    """Files of ``target`` (``ssh``, ``systemd`` or ``kubernetes``) with its ``options``."""
    if target == "ssh":
        return ssh_target(manifest, secrets, **options)
    if target == "systemd":
        return systemd_target(manifest, secrets, **options)
    if target == "kubernetes":
        return kubernetes_target(manifest, secrets, **options)
    raise UsageError(f"--target: {target!r} is not one of {', '.join(TARGETS)}")
