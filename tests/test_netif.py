"""A peer finds its own manifest entry from this machine's addresses and names; PmSGD's
interface is the one carrying the manifest address (pure matching, no network)."""

from __future__ import annotations

import socket
from dataclasses import dataclass

import pytest

from peer.transport import netif


@dataclass
class Entry:
    rank: int
    host: str
    port: int


PEERS = [
    Entry(0, "10.77.0.1", 50051),
    Entry(1, "10.77.0.1", 50052),
    Entry(2, "h1", 50051),
    Entry(3, "10.77.0.3", 50051),
]
NAMES = {"h1": {"10.77.0.2"}}


def resolver(host: str) -> set[str]:
    return NAMES.get(host, {host} if host[0].isdigit() else set())


def find(addresses: set[str], names: set[str] | None = None, **kwargs: int) -> int:
    entry = netif.own_entry(PEERS, addresses, names or {"box"}, resolver, **kwargs)  # type: ignore[arg-type]
    return entry.rank


def test_single_entry_by_address_and_by_resolved_name() -> None:
    assert find({"127.0.0.1", "10.77.0.3"}) == 3
    assert find({"127.0.0.1", "10.77.0.2"}) == 2  # "h1" resolves to this machine


def test_entry_by_host_name() -> None:
    assert find({"192.168.1.9"}, names={"h1"}) == 2


def test_several_peers_on_one_host_need_local_index_or_port() -> None:
    with pytest.raises(netif.NoOwnEntry, match=r"ranks \[0, 1\]\): give --local-index 0..1"):
        find({"10.77.0.1"})
    assert find({"10.77.0.1"}, local_index=0) == 0
    assert find({"10.77.0.1"}, local_index=1) == 1
    assert find({"10.77.0.1"}, port=50052) == 1
    with pytest.raises(netif.NoOwnEntry, match="out of range"):
        find({"10.77.0.1"}, local_index=2)
    with pytest.raises(netif.NoOwnEntry, match="port 50099"):
        find({"10.77.0.1"}, port=50099)


def test_no_entry_names_what_was_compared() -> None:
    with pytest.raises(netif.NoOwnEntry) as caught:
        find({"192.168.1.9", "fe80::1"})
    message = str(caught.value)
    assert "10.77.0.1, 10.77.0.3, h1" in message and "192.168.1.9" in message
    assert "fe80" not in message and "\n" not in message


def test_loopback_manifest_matches_every_loopback_address() -> None:
    loop = [Entry(0, "127.0.0.1", 1), Entry(1, "localhost", 2), Entry(2, "127.0.0.2", 3)]
    mine = netif.matching_entries(loop, {"127.0.0.1"}, {"localhost"}, resolver)
    assert [e.rank for e in mine] == [0, 1, 2]


def test_interface_for_address() -> None:
    interfaces = {"lo": {"127.0.0.1", "::1"}, "eth0": {"10.77.0.2", "fe80::2"}}
    assert netif.interface_for("10.77.0.2", interfaces) == "eth0"
    assert netif.interface_for("127.0.0.5", interfaces) == "lo"
    assert netif.interface_for("10.77.0.9", interfaces) is None
    assert netif.interface_for("not-an-ip", interfaces) is None


def test_real_machine_has_loopback_and_resolves_literals() -> None:
    interfaces = netif.interface_addresses()
    assert netif.interface_for("127.0.0.1", interfaces) is not None
    assert netif.resolve("10.0.0.1") == {"10.0.0.1"}
    assert "127.0.0.1" in netif.resolve("localhost") or "::1" in netif.resolve("localhost")
    assert socket.gethostname().lower() in netif.local_names()


def test_cli_peer_without_rank_on_a_foreign_manifest_says_why(tmp_path, capsys) -> None:
    from launcher.cli import main
    from topology.manifest import dump_manifest, init_manifest

    path = tmp_path / "m.yaml"
    path.write_text(dump_manifest(init_manifest(2, "ring", hosts=["10.99.0.1", "10.99.0.2"])))
    assert main(["peer", "--manifest", str(path), "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("decentlam: error: no manifest peer is on this machine")
    assert "10.99.0.1, 10.99.0.2" in error and "\n" not in error


def test_cli_launch_refuses_hosts_that_are_not_this_machine(tmp_path, capsys) -> None:
    from launcher.cli import main
    from topology.manifest import dump_manifest, init_manifest

    path = tmp_path / "m.yaml"
    manifest = init_manifest(4, "ring", hosts=["127.0.0.1", "10.99.0.2"], peers_per_host=2)
    path.write_text(dump_manifest(manifest))
    assert main(["launch", "--manifest", str(path), "--out", str(tmp_path / "o")]) == 2
    error = capsys.readouterr().err
    assert "peers [2, 3] are on hosts that are not this machine (10.99.0.2)" in error
