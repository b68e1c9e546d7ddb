"""``decentlam deploy``: Kubernetes objects checked by a real schema validator
(kubernetes-validate, schemas shipped offline), systemd units by ``systemd-analyze verify``,
ssh scripts by running them with a stand-in ``decentlam``."""

from __future__ import annotations

import base64
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from launcher import targets
from launcher.cli import main
from topology.manifest import dump_manifest, init_manifest, load_manifest, parse_manifest

K8S_VERSION = "1.30"


@pytest.fixture
def manifest_path(tmp_path: Path) -> Path:
    """Six peers on three hosts, with a token and TLS files."""
    manifest = init_manifest(
        6, "ring", hosts=["10.0.0.1", "10.0.0.2", "node-c"], peers_per_host=2, steps=10
    )
    data = manifest.to_dict()
    for name, text in (("token.txt", "s3cret\n"), ("c.crt", "CERT"), ("c.key", "KEY"),
                       ("ca.crt", "CA")):  # fmt: skip
        (tmp_path / name).write_text(text)
    data["security"] = {
        "token_file": "token.txt",
        "tls": {"cert": "c.crt", "key": "c.key", "ca": "ca.crt", "mutual": True},
    }
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def deploy(manifest: Path, target: str, out: Path, *extra: str) -> None:
    assert main(["deploy", "--manifest", str(manifest), "--target", target, "-o", str(out),
                 *extra]) == 0  # fmt: skip


def test_kubernetes_objects_pass_the_schema_validator(manifest_path: Path, tmp_path: Path) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    out = tmp_path / "k8s"
    deploy(manifest_path, "kubernetes", out, "--name", "dl", "--namespace", "train")
    documents = list(yaml.safe_load_all((out / "kubernetes.yaml").read_text()))
    for document in documents:
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)
    kinds = {d["kind"]: d for d in documents}
    assert sorted(kinds) == ["ConfigMap", "Secret", "Service", "StatefulSet"]
    sts = kinds["StatefulSet"]["spec"]
    assert sts["replicas"] == 6 and sts["serviceName"] == "dl"
    assert sts["podManagementPolicy"] == "Parallel"
    annotations = sts["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(targets.K8S_METRICS_PORT)
    service = kinds["Service"]["spec"]
    assert service["clusterIP"] == "None" and service["publishNotReadyAddresses"]
    assert base64.b64decode(kinds["Secret"]["data"]["token"]) == b"s3cret\n"
    # The ConfigMap's manifest is valid, names every pod by its stable DNS name and points at
    # the mounted secret.
    data = yaml.safe_load(kinds["ConfigMap"]["data"]["manifest.yaml"])
    deployed = parse_manifest(data, check_files=False)
    assert [p.host for p in deployed.peers] == [
        f"dl-{r}.dl.train.svc.cluster.local" for r in range(6)
    ]
    assert str(deployed.security.token_file) == f"{targets.K8S_SECRET_DIR}/token"
    assert stat.S_IMODE(os.stat(out / "kubernetes.yaml").st_mode) == 0o600


def test_kubernetes_validator_rejects_a_broken_object(manifest_path: Path) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    manifest = load_manifest(manifest_path)
    text = targets.kubernetes_target(manifest, targets.read_secrets(manifest))["kubernetes.yaml"]
    statefulset = list(yaml.safe_load_all(text.text))[-1]
    statefulset["spec"]["replicas"] = "six"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, K8S_VERSION, strict=True)


def _systemd_analyze_works(tmp_path: Path) -> str | None:
    if shutil.which("systemd-analyze") is None:
        return "systemd-analyze is not installed"
    unit = tmp_path / "probe.service"
    unit.write_text("[Unit]\nDescription=probe\n[Service]\nExecStart=/bin/true\n")
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=30
    )
    return None if done.returncode == 0 else f"systemd-analyze verify fails here: {done.stderr}"


def test_systemd_units_verify(manifest_path: Path, tmp_path: Path) -> None:
    reason = _systemd_analyze_works(tmp_path)
    if reason:
        pytest.skip(reason)
    executable = tmp_path / "bin" / "decentlam"
    executable.parent.mkdir()
    executable.write_text("#!/bin/sh\n")
    executable.chmod(0o755)
    out = tmp_path / "systemd"
    deploy(manifest_path, "systemd", out, "--executable", str(executable))
    units = sorted(out.glob("systemd/*/*.service"))
    assert [u.parent.name for u in units] == ["10.0.0.1"] * 2 + ["10.0.0.2"] * 2 + ["node-c"] * 2
    done = subprocess.run(
        ["systemd-analyze", "verify", *map(str, units)], capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    text = units[0].read_text()
    assert "--rank 0 " in text and "Restart=on-failure" in text
    # A broken unit is caught by the same check (the verifier is not a no-op).
    broken = tmp_path / "broken.service"
    broken.write_text(text.replace(f"ExecStart={executable}", "ExecStart=relative/decentlam"))
    bad = subprocess.run(
        ["systemd-analyze", "verify", str(broken)], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode != 0 or bad.stderr.strip()


def test_ssh_scripts_start_each_hosts_peers(manifest_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "ssh"
    remote = tmp_path / "remote"
    deploy(manifest_path, "ssh", out, "--remote-dir", str(remote))
    scripts = sorted(p.name for p in (out / "hosts").iterdir())
    assert scripts == ["10.0.0.1.sh", "10.0.0.2.sh", "node-c.sh"]
    for script in [*(out / "hosts").iterdir(), out / "deploy.sh"]:
        subprocess.run(["bash", "-n", str(script)], check=True, timeout=10)
    assert stat.S_IMODE(os.stat(out / "secret" / "token").st_mode) == 0o600
    # The deployed manifest has the same digest (security paths differ, the digest skips them).
    deployed = load_manifest(out / "manifest.yaml", check_files=False)
    assert deployed.digest() == load_manifest(manifest_path).digest()
    # Run node-c's script with a stand-in decentlam that records its arguments.
    fake = tmp_path / "fake-decentlam"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    remote.mkdir()
    shutil.copy(out / "manifest.yaml", remote / "manifest.yaml")
    env = {**os.environ, "DECENTLAM": str(fake)}
    subprocess.run(["bash", str(out / "hosts" / "node-c.sh"), "start"], env=env, check=True,
                   timeout=30, capture_output=True)  # fmt: skip
    for rank in (4, 5):
        log = remote / "logs" / f"rank-{rank}.log"
        for _ in range(100):
            if log.exists() and log.read_text():
                break
            subprocess.run(["sleep", "0.05"], check=True)
        assert log.read_text().split() == [
            "--log-level", "INFO", "peer", "--manifest", f"{remote}/manifest.yaml",
            "--rank", str(rank), "--out", f"{remote}/out",
        ]  # fmt: skip


def test_deploy_refuses_a_non_empty_directory(manifest_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "full"
    out.mkdir()
    (out / "x").write_text("keep")
    assert main(["deploy", "--manifest", str(manifest_path), "--target", "ssh",
                 "-o", str(out)]) == 2  # fmt: skip
    assert (out / "x").read_text() == "keep"


def test_deploy_example_manifest_round_trips(tmp_path: Path) -> None:
    manifest = init_manifest(4, "ring", hosts=["a", "b"], peers_per_host=2)
    path = tmp_path / "m.yaml"
    path.write_text(dump_manifest(manifest))
    files = targets.generate("systemd", manifest, targets.Secrets(), {})
    assert sorted(p for p in files if p.endswith(".service")) == [
        "systemd/a/decentlam-peer0.service", "systemd/a/decentlam-peer1.service",
        "systemd/b/decentlam-peer2.service", "systemd/b/decentlam-peer3.service",
    ]  # fmt: skip
    assert "secret/token" not in files
