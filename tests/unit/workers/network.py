"""Where a test's server listens, as the machine sees it: its listening sockets and a non-loopback address."""

from __future__ import annotations

import ipaddress
import socket

import psutil


def listening_hosts(port: int) -> set[str]:
    """The addresses TCP sockets listen on at `port`, on this machine (any process); an IPv4-mapped IPv6
    address (gRPC's socket for 127.0.0.1 is one) as its IPv4 address."""
    return {_unmapped(c.laddr.ip) for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port}


def _unmapped(ip: str) -> str:
    address = ipaddress.ip_address(ip.split("%", 1)[0])
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return str(mapped) if mapped is not None else ip


def non_loopback_ipv4() -> str | None:
    """An IPv4 address of this machine that is not loopback (None on a machine with none)."""
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not ipaddress.ip_address(address.address).is_loopback:
                return str(address.address)
    return None


def refused_on_the_network(port: int) -> bool:
    """Whether nothing answers at `port` on this machine's non-loopback address (True on a machine with none:
    the caller checks listening_hosts too)."""
    other = non_loopback_ipv4()
    if other is None:
        return True
    try:
        socket.create_connection((other, port), timeout=5).close()
    except OSError:
        return True
    return False
