"""Network-namespace "hosts" for multi-host tests: a thin Python face on ``scripts/netns.sh``.

:class:`NetnsHosts` builds ``n`` hosts (namespaces ``<prefix>-h<i>``, address ``10.77.0.<i+1>``,
name ``h<i>``) on one bridge, with a unique prefix per instance so that parallel runs never
collide, and starts processes inside them. :meth:`NetnsHosts.down` ends those processes and
removes everything; it runs from the fixture's ``finally`` and from ``atexit``. All traffic
stays inside the namespaces created here.

Use the ``netns_hosts`` fixture (``from tests.netns import netns_hosts``, mark the test
``@pytest.mark.netns``); it skips with the reason when not root or namespaces are unavailable.
Benchmarks use :class:`NetnsHosts` directly.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO

import pytest

logger = logging.getLogger(__name__)

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "netns.sh"
SCRIPT_TIMEOUT_SECONDS = 60.0


def netns_unavailable() -> str | None:
    """Why namespace hosts cannot be built here, or ``None`` when they can."""
    if os.geteuid() != 0:
        return "network-namespace tests need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"network-namespace tests need '{tool}' (Debian package iproute2)"
    probe = f"dlprobe{secrets.token_hex(3)}"
    try:
        made = subprocess.run(
            ["ip", "netns", "add", probe], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot create a network namespace: {exc}"
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None


class NetnsHosts:
    """``n`` namespace hosts on one bridge (see the module docstring).

    Args:
        n: number of hosts.
        subnet: first three octets of the hosts' /24.
        congestion_control: every host's TCP congestion control (``cubic``, Linux's default,
            unless said; a namespace would otherwise inherit this machine's, BBR on some VMs).
    """

    def __init__(self, n: int, subnet: str = "10.77.0", congestion_control: str = "cubic") -> None:
        self.n = n
        self.subnet = subnet
        self.congestion_control = congestion_control
        self.prefix = f"dl{secrets.token_hex(3)}"
        self.processes: list[subprocess.Popen[bytes]] = []
        self._up = False

    def _script(self, *args: str) -> str:
        env = {
            **os.environ,
            "DECENTLAM_NETNS": self.prefix,
            "DECENTLAM_NETNS_SUBNET": self.subnet,
            "DECENTLAM_NETNS_CC": self.congestion_control,
        }
        done = subprocess.run(
            [str(SCRIPT), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=SCRIPT_TIMEOUT_SECONDS,
        )
        if done.returncode != 0:
            raise RuntimeError(f"netns.sh {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def up(self) -> NetnsHosts:
        """Create the hosts (removed by :meth:`down`, also at interpreter exit)."""
        atexit.register(self.down)
        self._up = True
        self._script("up", str(self.n))
        return self

    def down(self) -> None:
        """End every process started here and delete the namespaces (idempotent)."""
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                logger.warning("process %d did not die", process.pid)
        if self._up:
            self._up = False
            self._script("down")
        atexit.unregister(self.down)

    def address(self, host: int) -> str:
        """IPv4 address of ``host``."""
        return f"{self.subnet}.{host + 1}"

    def namespace(self, host: int) -> str:
        """Namespace name of ``host``."""
        return f"{self.prefix}-h{host}"

    def cap(self, host: int, rate: str) -> None:
        """Cap ``host``'s link both ways (``tc`` rate, e.g. ``25mbit``)."""
        self._script("cap", str(host), rate)

    def uncap(self, host: int) -> None:
        """Remove ``host``'s rate cap."""
        self._script("uncap", str(host))

    def cut(self, host: int) -> None:
        """Cut ``host``'s link (packets to and from it vanish)."""
        self._script("cut", str(host))

    def restore(self, host: int) -> None:
        """Plug ``host``'s link back in."""
        self._script("restore", str(host))

    def command(self, host: int, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside ``host``."""
        return ["ip", "netns", "exec", self.namespace(host), *argv]

    def run(
        self, host: int, argv: Sequence[str], timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside ``host`` to completion (bounded by ``timeout``)."""
        return subprocess.run(
            self.command(host, argv), capture_output=True, text=True, timeout=timeout
        )

    def popen(
        self,
        host: int,
        argv: Sequence[str],
        *,
        log: IO[bytes] | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside ``host``; :meth:`down` kills it if it is still running."""
        process = subprocess.Popen(
            self.command(host, argv),
            stdout=log if log is not None else subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.processes.append(process)
        return process

    def terminate(self, process: subprocess.Popen[bytes]) -> None:
        """SIGTERM ``process`` (a graceful stop for a peer)."""
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)


@pytest.fixture
def netns_hosts() -> Iterator[Callable[[int], NetnsHosts]]:
    """Factory ``make(n)`` of namespace hosts; everything is torn down at teardown."""
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    made: list[NetnsHosts] = []

    def make(n: int) -> NetnsHosts:
        hosts = NetnsHosts(n)
        made.append(hosts)
        return hosts.up()

    try:
        yield make
    finally:
        for hosts in made:
            hosts.down()
