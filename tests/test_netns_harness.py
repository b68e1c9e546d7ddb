"""The namespace-host harness itself: addresses and names resolve, hosts run cubic, a rate cap
holds, a cut link is a black hole until restored, and teardown leaves nothing behind."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.netns import NetnsHosts, netns_hosts  # noqa: F401 - the fixture

pytestmark = pytest.mark.netns

SERVER = """
import socket, sys
s = socket.socket(); s.bind((sys.argv[1], 5001)); s.listen()
print("ready", flush=True)
while True:
    c, _ = s.accept()
    while c.recv(1 << 20):
        pass
    c.close()
"""
CLIENT = """
import socket, sys, time
start = time.monotonic()
s = socket.create_connection((sys.argv[1], 5001), timeout=float(sys.argv[3]))
s.sendall(b"x" * int(sys.argv[2])); s.shutdown(socket.SHUT_WR); s.recv(1); s.close()
print(time.monotonic() - start)
"""


def test_cap_cut_restore_and_teardown(netns_hosts) -> None:  # noqa: F811
    hosts: NetnsHosts = netns_hosts(2)
    server = hosts.popen(1, [sys.executable, "-c", SERVER, hosts.address(1)])
    time.sleep(0.5)
    assert server.poll() is None

    def send(nbytes: int, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
        return hosts.run(0, [sys.executable, "-c", CLIENT, "h1", str(nbytes), str(timeout)])

    for _ in range(50):  # the server may take a moment to listen under load
        if send(1).returncode == 0:
            break
        time.sleep(0.2)
    for host in range(2):  # not the machine's default (BBR on some VMs): see scripts/netns.sh
        cc = hosts.run(host, ["sysctl", "-n", "net.ipv4.tcp_congestion_control"]).stdout
        assert cc.strip() == "cubic"
    hosts.cap(1, "8mbit")
    seconds = float(send(1_000_000).stdout)  # 8 Mbit at 8 Mbit/s: about 1 s
    assert 0.8 < seconds < 5.0, seconds
    hosts.cut(1)
    blocked = send(10, timeout=1.0)
    assert blocked.returncode != 0 and "timed out" in blocked.stderr.lower()
    hosts.restore(1)
    hosts.uncap(1)
    for _ in range(50):
        if send(10).returncode == 0:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("link did not come back")
    names = [hosts.namespace(h) for h in range(2)]
    hosts.down()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in names)
    assert server.poll() is not None
