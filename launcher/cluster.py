"""A local cluster of peer processes: spawn, watch, report progress, stop, summarise.

``decentlam launch`` uses :class:`LocalCluster`; tests use it too. Each peer is a separate
``decentlam peer`` process with its log in ``OUT/logs/rank-<r>.log``. Progress is read the way
an operator reads it: by scraping every peer's Prometheus endpoint.

Supervision (torchrun's convention): :meth:`LocalCluster.restart` starts a dead peer again with
the same rank (``DECENTLAM_RESTART_COUNT`` tells it which incarnation it is); the restarted
peer rejoins from its neighbours. Every death and restart is recorded in
:attr:`LocalCluster.events`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SCRAPE_TIMEOUT_SECONDS = 1.0


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports the OS reports free right now (all held open while choosing)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def on_free_ports(manifest: Any, **peer_fields: Any) -> Any:
    """``manifest`` with every peer on its own free gRPC and metrics port (loopback runs).

    Args:
        manifest: a :class:`topology.manifest.Manifest`.
        **peer_fields: further fields set on every peer (``host="127.0.0.1"``, ``device``...).

    Returns:
        A copy of the manifest; the ports come from :func:`free_ports`.
    """
    ports = free_ports(2 * manifest.world_size)
    peers = tuple(
        dataclasses.replace(p, port=ports[2 * i], metrics_port=ports[2 * i + 1], **peer_fields)
        for i, p in enumerate(manifest.peers)
    )
    return dataclasses.replace(manifest, peers=peers)


@dataclass
class PeerProgress:
    """What one scrape of a peer's metrics endpoint said (NaN: not reported).

    Attributes:
        step: completed iterations.
        loss: training loss of the last iteration (NaN before the first).
        accuracy: latest evaluated accuracy (NaN before an evaluation, or without one).
        latency_p50_seconds: median exchange latency so far.
        blocked_share: share of training time spent blocked on exchanges so far.
        reachable: whether the endpoint answered.
        live_neighbors: in-neighbours the peer currently mixes (live membership).
        membership_changes: neighbours it marked down or re-admitted so far.
        rejoins: times it rejoined from a neighbour's state.
        rejoin_seconds: duration of its last rejoin (process start to first mixed step).
        finished: the peer exited with status 0 (its run is complete); a row that says so
            carries no scraped values (the view shows the peer's last ones).
    """

    step: float = math.nan
    loss: float = math.nan
    accuracy: float = math.nan
    latency_p50_seconds: float = math.nan
    blocked_share: float = math.nan
    reachable: bool = False
    live_neighbors: float = math.nan
    membership_changes: float = 0.0
    rejoins: float = 0.0
    rejoin_seconds: float = math.nan
    finished: bool = False


def histogram_quantile(quantile: float, buckets: Sequence[tuple[float, float]]) -> float:
    """Prometheus-style quantile from cumulative ``(upper_bound, count)`` buckets."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return math.nan
    rank = quantile * ordered[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            width = count - lower_count
            fraction = (rank - lower_count) / width if width > 0 else 1.0
            return lower_bound + (bound - lower_bound) * fraction
        lower_bound, lower_count = bound, count
    return lower_bound


def parse_progress(text: str) -> PeerProgress:
    """Extract step, loss, accuracy, exchange latency p50 and blocked share from a metrics page.

    The loss gauge reads 0 before the first iteration: it counts from step 1 on.
    """
    from prometheus_client.parser import text_string_to_metric_families

    progress = PeerProgress(reachable=True)
    buckets: dict[float, float] = {}
    blocked, iterating = math.nan, math.nan
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "decentlam_step":
                progress.step = sample.value
            elif sample.name == "decentlam_loss":
                progress.loss = sample.value
            elif sample.name == "decentlam_eval" and sample.labels.get("metric") == "accuracy":
                progress.accuracy = sample.value
            elif sample.name == "decentlam_live_neighbors":
                progress.live_neighbors = sample.value
            elif sample.name == "decentlam_membership_changes_total":
                progress.membership_changes = sample.value
            elif sample.name == "decentlam_rejoins_total":
                progress.rejoins = sample.value
            elif sample.name == "decentlam_rejoin_seconds":
                progress.rejoin_seconds = sample.value
            elif sample.name == "decentlam_exchange_latency_seconds_bucket":
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
            elif sample.name == "decentlam_exchange_blocked_seconds_total":
                blocked = sample.value
            elif sample.name == "decentlam_iteration_seconds_sum":
                iterating = sample.value
    progress.latency_p50_seconds = histogram_quantile(0.5, list(buckets.items()))
    if not progress.step > 0:
        progress.loss = math.nan
    if iterating > 0:
        progress.blocked_share = min(1.0, blocked / iterating)
    return progress


def scrape(url: str) -> PeerProgress:
    """Scrape one metrics endpoint; unreachable endpoints give an empty progress."""
    try:
        with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_SECONDS) as response:
            return parse_progress(response.read().decode())
    except (OSError, ValueError):
        return PeerProgress()


@dataclass
class PeerProcess:
    """A running peer: its rank, process and log file."""

    rank: int
    process: subprocess.Popen[bytes]
    log_path: Path
    metrics_url: str | None


@dataclass
class LocalCluster:
    """Peer processes of one manifest on this machine.

    Args:
        manifest_path: the manifest every peer loads.
        out_dir: checkpoints, logs (``logs/``), ``peer-<r>.json`` and ``summary.json``.
        peer_args: extra ``decentlam peer`` flags (``--blocking``, ``--resume``...).
        ranks: which ranks to start (default: all).
    """

    manifest_path: Path
    out_dir: Path
    peer_args: Sequence[str] = ()
    ranks: Sequence[int] | None = None
    env: dict[str, str] = field(default_factory=dict)
    peers: list[PeerProcess] = field(default_factory=list)
    restarts: dict[int, int] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    _handled: set[tuple[int, int]] = field(default_factory=set, repr=False)

    def start(self) -> None:
        """Spawn every peer (non-blocking)."""
        from topology.manifest import load_manifest

        manifest = load_manifest(self.manifest_path)
        (self.out_dir / "logs").mkdir(parents=True, exist_ok=True)
        ranks = range(manifest.world_size) if self.ranks is None else self.ranks
        # Peers share this machine: split the cores between them instead of letting every
        # peer's torch start one thread per core (oversubscription made steps ~10x slower).
        threads = str(max(1, (os.cpu_count() or 1) // max(1, len(ranks))))
        self._env = {
            "OMP_NUM_THREADS": threads,
            "DECENTLAM_TORCH_THREADS": threads,
            **os.environ,
            **self.env,
            "PYTHONUNBUFFERED": "1",
            # the peer asks the kernel for SIGTERM when this process dies (no orphans)
            "DECENTLAM_PARENT_PID": str(os.getpid()),
        }
        self._manifest = manifest
        self._started = time.monotonic()
        for rank in ranks:
            self.peers.append(self._spawn(rank, self._env))

    def _spawn(self, rank: int, env: dict[str, str]) -> PeerProcess:
        spec = self._manifest.peer(rank)
        log_path = self.out_dir / "logs" / f"rank-{rank}.log"
        command = [
            sys.executable, "-m", "launcher.cli", "--log-level", "INFO", "peer",
            "--manifest", str(self.manifest_path), "--rank", str(rank),
            "--out", str(self.out_dir), *self.peer_args,
        ]  # fmt: skip
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,  # Ctrl-C reaches the launcher only; it forwards it
            )  # fmt: skip
        url = None
        if spec.metrics_port is not None:
            url = f"http://{spec.address.rsplit(':', 1)[0]}:{spec.metrics_port}/metrics"
        logger.info("started peer %d (pid %d), log %s", rank, process.pid, log_path)
        return PeerProcess(rank, process, log_path, url)

    def peer(self, rank: int) -> PeerProcess:
        """The (latest) process of ``rank``."""
        return next(p for p in self.peers if p.rank == rank)

    def dead(self) -> list[PeerProcess]:
        """Peers that exited with a non-zero status (killed ones included), not yet handled by
        :meth:`restart` or :meth:`give_up`."""
        return [
            p
            for p in self.peers
            if p.process.poll() not in (None, 0) and (p.rank, p.process.pid) not in self._handled
        ]

    def _record(self, peer: PeerProcess, event: str) -> None:
        self._handled.add((peer.rank, peer.process.pid))
        self.events.append(
            {
                "seconds": round(time.monotonic() - self._started, 3),
                "rank": peer.rank,
                "event": event,
                "status": peer.process.returncode,
            }
        )

    def restart(self, rank: int) -> PeerProcess:
        """Start a dead peer again with the same rank; it rejoins from its neighbours."""
        old = self.peer(rank)
        self._record(old, "restarted")
        count = self.restarts.get(rank, 0) + 1
        self.restarts[rank] = count
        new = self._spawn(rank, {**self._env, "DECENTLAM_RESTART_COUNT": str(count)})
        self.peers[self.peers.index(old)] = new
        return new

    def give_up(self, rank: int) -> None:
        """Record that a dead peer stays down (no restarts left); the others go on."""
        self._record(self.peer(rank), "down")

    def failed(self) -> PeerProcess | None:
        """The first peer that exited with a non-zero status, if any."""
        for peer in self.peers:
            code = peer.process.poll()
            if code not in (None, 0):
                return peer
        return None

    def running(self) -> bool:
        """True while any peer is still running."""
        return any(peer.process.poll() is None for peer in self.peers)

    def progress(self) -> dict[int, PeerProgress]:
        """Scrape every running peer's metrics endpoint; a peer that exited with status 0 gets
        a ``finished`` row (one that died gets none: it shows as stale)."""
        rows: dict[int, PeerProgress] = {}
        for peer in self.peers:
            code = peer.process.poll()
            if code is None and peer.metrics_url is not None:
                rows[peer.rank] = scrape(peer.metrics_url)
            elif code == 0:
                rows[peer.rank] = PeerProgress(finished=True)
        return rows

    def signal_all(self, signum: int = signal.SIGTERM) -> None:
        """Send ``signum`` to every running peer."""
        for peer in self.peers:
            if peer.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    peer.process.send_signal(signum)

    def stop(self, grace_seconds: float = 30.0) -> None:
        """SIGTERM every peer, wait up to ``grace_seconds``, then SIGKILL the rest."""
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        for peer in self.peers:
            remaining = max(0.0, deadline - time.monotonic())
            try:
                peer.process.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                logger.warning("peer %d did not stop in time: killing it", peer.rank)
                peer.process.kill()
                peer.process.wait(timeout=10)

    def wait(self, timeout: float) -> bool:
        """Wait for every peer to exit; False on timeout."""
        deadline = time.monotonic() + timeout
        for peer in self.peers:
            try:
                peer.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return False
        return True

    def log_tail(self, rank: int, lines: int = 30) -> str:
        """The last ``lines`` lines of a peer's log."""
        path = self.out_dir / "logs" / f"rank-{rank}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def results(self) -> dict[int, dict[str, Any]]:
        """Per-peer result files written so far."""
        found = {}
        for peer in self.peers:
            path = self.out_dir / f"peer-{peer.rank}.json"
            if path.exists():
                found[peer.rank] = json.loads(path.read_text())
        return found
