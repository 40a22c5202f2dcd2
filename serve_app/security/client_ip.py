"""Which address a request comes from, for per-IP limits and bans.

X-Forwarded-For is written by whoever sent the request, so it is believed only as far as a chain
of our own proxies vouches for it: starting from the TCP peer, and only if the peer is in a
trusted proxy network, walk the header right to left (each proxy appends the address it saw)
past further trusted proxies; the first address that is not a trusted proxy is the client.
Entries left of that point are the client's own claims and are never read.

The header may arrive as several lines (a proxy that adds its own line instead of extending the
client's): they are one list, in order (RFC 9110 §5.3), so every line is read and the walk starts
at the last. Reading only the first line would let the client's own line pick its address.

Limits and bans apply to `address_block(ip)`, not the address: IPv4 per address, IPv6 per /64,
the block one subscriber gets (RFC 6177) and picks addresses from at will, so per-address
counting would give one IPv6 client 2^64 buckets. The audit log keeps the full address.

A malformed entry (garbage, "unknown", an obfuscated RFC 7239 token) ends the walk and the last
trusted hop is returned: skipping it would step into client-written territory. Addresses are
normalised (ports and brackets stripped, IPv4-mapped IPv6 as IPv4) so one client cannot appear
as several to the limiter. Never raises on request input; an invalid `trusted_proxies` entry is
a configuration error (ValueError).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from functools import lru_cache

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Bound the walk: real chains are a handful of proxies long.
MAX_FORWARDED_HOPS = 16
IPV6_BLOCK_PREFIX = 64
_IPV6_BLOCK_MASK = ((1 << IPV6_BLOCK_PREFIX) - 1) << (128 - IPV6_BLOCK_PREFIX)


def client_ip(peer: str, x_forwarded_for: Sequence[str], trusted_proxies: list[str]) -> str:
    """The client's address as text; `peer` itself (normalised) unless trusted proxies vouch otherwise.

    `x_forwarded_for` holds every X-Forwarded-For line of the request, in the order received.
    """
    if isinstance(x_forwarded_for, str):
        raise TypeError("x_forwarded_for is the list of header lines, not one line")
    peer_address = parse_address(peer)
    if peer_address is None:
        return peer  # not an IP peer (unix socket, test client): nothing to walk from
    networks = parse_networks(tuple(trusted_proxies))
    if not x_forwarded_for or not in_networks(peer_address, networks):
        return str(peer_address)
    hops = ",".join(x_forwarded_for).split(",")[-MAX_FORWARDED_HOPS:]
    nearest = peer_address
    for hop in reversed(hops):
        address = parse_address(hop)
        if address is None:
            break
        nearest = address
        if not in_networks(address, networks):
            break
    return str(nearest)


def address_block(ip: str) -> str:
    """The subject of per-IP limits and bans for `ip`: the address itself for IPv4, its /64 for IPv6
    ("2001:db8:1:2::/64"); text that is not an address (a test client's peer name) stays as it is."""
    address = parse_address(ip)
    if not isinstance(address, ipaddress.IPv6Address):
        return str(address) if address is not None else ip
    network_address = ipaddress.IPv6Address(int(address) & _IPV6_BLOCK_MASK)  # cheaper than an IPv6Network
    return f"{network_address}/{IPV6_BLOCK_PREFIX}"


def parse_address(text: str) -> IPAddress | None:
    """An IP address from "a.b.c.d", "a.b.c.d:port", "::1", "[::1]:port"; None if it is not one."""
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@lru_cache(maxsize=16)
def parse_networks(cidrs: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    """CIDRs parsed once per distinct configuration; ValueError on an invalid one."""
    return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)


def in_networks(address: IPAddress, networks: tuple[IPNetwork, ...]) -> bool:
    return any(address in network for network in networks)
