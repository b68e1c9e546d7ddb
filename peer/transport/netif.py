"""This machine's network identity: its addresses and names, the interface that carries an
address, and which entries of a manifest are this machine's.

A peer started without ``--rank`` finds its entry with :func:`own_entry`: every manifest host is
resolved and matched against the machine's own addresses (all interfaces, every loopback
address) and host names. PmSGD's gloo / NCCL must talk over the interface that carries the
peer's manifest address (:func:`interface_for`), not whatever the host name resolves to
(often ``127.0.1.1``).

The matching itself (:func:`matching_entries`, :func:`own_entry`) is pure: it takes the
addresses, names and resolver as arguments and is tested without a network.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Protocol

logger = logging.getLogger(__name__)

RESOLVE_TIMEOUT_SECONDS = 5.0


class HostEntry(Protocol):
    """What :func:`own_entry` reads of a manifest peer (``topology.manifest.PeerSpec``)."""

    rank: int
    host: str
    port: int


class NoOwnEntry(LookupError):
    """No entry, or more than one, of the manifest is this machine's (the message says which)."""


def interface_addresses() -> dict[str, set[str]]:
    """Every interface of this machine (namespace) and its IPv4/IPv6 addresses."""
    import psutil

    found: dict[str, set[str]] = {}
    for name, addresses in psutil.net_if_addrs().items():
        for address in addresses:
            if address.family in (socket.AF_INET, socket.AF_INET6):
                found.setdefault(name, set()).add(address.address.split("%", 1)[0])
    return found


def local_names() -> set[str]:
    """This machine's host name and ``localhost`` (no fully qualified name: ``getfqdn`` asks
    DNS, which can hang where no resolver is reachable)."""
    return {n.lower() for n in ("localhost", socket.gethostname()) if n}


def resolve(host: str, timeout_seconds: float = RESOLVE_TIMEOUT_SECONDS) -> set[str]:
    """Addresses ``host`` resolves to (an IP literal is itself; ``set()`` when it does not
    resolve within ``timeout_seconds``)."""
    try:
        return {str(ipaddress.ip_address(host))}
    except ValueError:
        pass
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(socket.getaddrinfo, host, None, 0, socket.SOCK_STREAM)
    try:
        infos = future.result(timeout=timeout_seconds)
    except (OSError, FutureTimeout) as exc:
        logger.debug("cannot resolve %s: %s", host, exc)
        return set()
    finally:
        pool.shutdown(wait=False)
    return {str(info[4][0]).split("%", 1)[0] for info in infos}


def is_local_address(address: str, local_addresses: Iterable[str]) -> bool:
    """True for one of ``local_addresses`` or any loopback address (all of 127/8 is local)."""
    try:
        if ipaddress.ip_address(address).is_loopback:
            return True
    except ValueError:
        return False
    return address in set(local_addresses)


def matching_entries(
    peers: Sequence[HostEntry],
    local_addresses: Iterable[str],
    names: Iterable[str],
    resolver: Callable[[str], set[str]],
) -> list[HostEntry]:
    """The entries of ``peers`` whose host is this machine, in rank order.

    Args:
        peers: the manifest's peers.
        local_addresses: this machine's addresses (:func:`interface_addresses`).
        names: this machine's host names (:func:`local_names`).
        resolver: host -> addresses (:func:`resolve`); called once per distinct host.

    Returns:
        Entries whose host is one of ``names`` or resolves to a local address.
    """
    addresses = set(local_addresses)
    lowered = {n.lower() for n in names}
    verdicts: dict[str, bool] = {}
    for host in {p.host for p in peers}:
        verdicts[host] = host.lower() in lowered or any(
            is_local_address(a, addresses) for a in resolver(host)
        )
    return sorted((p for p in peers if verdicts[p.host]), key=lambda p: p.rank)


def own_entry(
    peers: Sequence[HostEntry],
    local_addresses: Iterable[str],
    names: Iterable[str],
    resolver: Callable[[str], set[str]],
    *,
    local_index: int | None = None,
    port: int | None = None,
) -> HostEntry:
    """This machine's entry of the manifest.

    Args:
        peers, local_addresses, names, resolver: as for :func:`matching_entries`.
        local_index: with several peers on this machine, which one (0-based, rank order).
        port: with several peers on this machine, the one with this gRPC port.

    Raises:
        NoOwnEntry: none or several entries match (the message lists what was compared and
            how to choose).
    """
    addresses = sorted(set(local_addresses))
    mine = matching_entries(peers, addresses, names, resolver)
    if not mine:
        hosts = ", ".join(sorted({p.host for p in peers})[:8])
        shown = ", ".join(a for a in addresses if not a.startswith("fe80"))
        raise NoOwnEntry(
            f"no manifest peer is on this machine (manifest hosts: {hosts}; this machine: "
            f"{shown}; names {', '.join(sorted(names))}): give --rank"
        )
    if port is not None:
        mine = [p for p in mine if p.port == port]
        if not mine:
            raise NoOwnEntry(f"no manifest peer on this machine has port {port}: give --rank")
    if local_index is not None:
        if not 0 <= local_index < len(mine):
            raise NoOwnEntry(
                f"--local-index {local_index} is out of range: this machine has "
                f"{len(mine)} peer(s) of the manifest (ranks {[p.rank for p in mine]})"
            )
        return mine[local_index]
    if len(mine) > 1:
        raise NoOwnEntry(
            f"{len(mine)} manifest peers are on this machine (ranks {[p.rank for p in mine]}): "
            f"give --local-index 0..{len(mine) - 1}, --port or --rank"
        )
    return mine[0]


def interface_for(address: str, interfaces: dict[str, set[str]] | None = None) -> str | None:
    """The interface that carries ``address`` (``lo`` style name), or ``None``.

    A loopback address other than the ones configured (127.0.0.2...) maps to the interface
    that carries 127.0.0.1.
    """
    interfaces = interface_addresses() if interfaces is None else interfaces
    for name, addresses in sorted(interfaces.items()):
        if address in addresses:
            return name
    try:
        loopback = ipaddress.ip_address(address).is_loopback
    except ValueError:
        return None
    if loopback:
        for name, addresses in sorted(interfaces.items()):
            if any(ipaddress.ip_address(a).is_loopback for a in addresses):
                return name
    return None
