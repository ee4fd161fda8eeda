"""Which webhook targets may be called: http(s) URLs resolving only to public addresses.

An address is judged by the most specific row of the tables below that holds it: the IANA
IPv4 and IPv6 special-purpose address registries (plus multicast), each row refused,
except the IPv6 forms that embed or translate an IPv4 address, which are unwrapped and
judged by that IPv4 (a NAT64 or 6to4 address of 127.0.0.1 reaches 127.0.0.1). Addresses in
no row must be global unicast. Checked at registration and again at every send (DNS may
answer differently by then).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable
from functools import lru_cache
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# https://www.iana.org/assignments/iana-ipv4-special-registry (and multicast, RFC 5771).
# Every row is refused: even the few the registry marks globally reachable (AS112, AMT,
# 192.0.0.9/10) are infrastructure, never a tenant's webhook receiver.
IPV4_SPECIAL: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "this network"),
    ("0.0.0.0/32", "this host on this network"),
    ("10.0.0.0/8", "private use"),
    ("100.64.0.0/10", "shared address space (CGNAT)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local (cloud metadata)"),
    ("172.16.0.0/12", "private use"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.0.0/29", "IPv4 service continuity prefix (DS-Lite)"),
    ("192.0.0.8/32", "IPv4 dummy address"),
    ("192.0.0.9/32", "port control protocol anycast"),
    ("192.0.0.10/32", "traversal using relays around NAT anycast"),
    ("192.0.0.170/32", "NAT64/DNS64 discovery"),
    ("192.0.0.171/32", "NAT64/DNS64 discovery"),
    ("192.0.2.0/24", "documentation (TEST-NET-1)"),
    ("192.31.196.0/24", "AS112-v4"),
    ("192.52.193.0/24", "AMT"),
    ("192.88.99.0/24", "deprecated 6to4 relay anycast"),
    ("192.168.0.0/16", "private use"),
    ("192.175.48.0/24", "direct delegation AS112 service"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation (TEST-NET-2)"),
    ("203.0.113.0/24", "documentation (TEST-NET-3)"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("255.255.255.255/32", "limited broadcast"),
)


def _last_32(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]


def _sixtofour(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    return [ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF)]


def _teredo(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    # 2001:0:SSSS:SSSS:flags:port:CCCC:CCCC: the server's IPv4, then the client's XOR-ed
    # with 0xffffffff (RFC 4380); the packet may go to either.
    server = ipaddress.IPv4Address((int(ip) >> 64) & 0xFFFFFFFF)
    client = ipaddress.IPv4Address((int(ip) & 0xFFFFFFFF) ^ 0xFFFFFFFF)
    return [server, client]


def _nat64_48(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    # RFC 6052 with a /48 prefix: IPv4 bits 0-15 at bits 48-63, bits 16-31 at bits 72-87
    # (bits 64-71 are the reserved "u" octet).
    value = int(ip)
    high = (value >> 64) & 0xFFFF
    low = (value >> 40) & 0xFFFF
    return [ipaddress.IPv4Address((high << 16) | low)]


Unwrap = Callable[[ipaddress.IPv6Address], list[ipaddress.IPv4Address]]

# https://www.iana.org/assignments/iana-ipv6-special-registry (and multicast, RFC 4291).
# A row with an unwrap function embeds or translates IPv4: judged by the IPv4 it holds.
IPV6_SPECIAL: tuple[tuple[str, str, Unwrap | None], ...] = (
    ("::/128", "unspecified", None),
    ("::1/128", "loopback", None),
    ("::/96", "IPv4-compatible (deprecated)", _last_32),
    ("::ffff:0:0/96", "IPv4-mapped", _last_32),
    ("::ffff:0:0:0/96", "IPv4-translated (SIIT, RFC 2765)", _last_32),
    ("64:ff9b::/96", "IPv4/IPv6 translation (NAT64)", _last_32),
    ("64:ff9b:1::/48", "local-use IPv4/IPv6 translation", _nat64_48),
    ("100::/64", "discard-only", None),
    ("100:0:0:1::/64", "dummy IPv6 prefix", None),
    ("2001::/23", "IETF protocol assignments", None),
    ("2001::/32", "Teredo", _teredo),
    ("2001:1::1/128", "port control protocol anycast", None),
    ("2001:1::2/128", "traversal using relays around NAT anycast", None),
    ("2001:1::3/128", "DNS-SD service registration protocol anycast", None),
    ("2001:2::/48", "benchmarking", None),
    ("2001:3::/32", "AMT", None),
    ("2001:4:112::/48", "AS112-v6", None),
    ("2001:10::/28", "deprecated ORCHID", None),
    ("2001:20::/28", "ORCHIDv2", None),
    ("2001:30::/28", "drone remote ID protocol entity tags", None),
    ("2001:db8::/32", "documentation", None),
    ("2002::/16", "6to4", _sixtofour),
    ("2620:4f:8000::/48", "direct delegation AS112 service", None),
    ("3fff::/20", "documentation", None),
    ("5f00::/16", "segment routing SIDs", None),
    ("fc00::/7", "unique local", None),
    ("fe80::/10", "link-local", None),
    ("fec0::/10", "site-local (deprecated)", None),
    ("ff00::/8", "multicast", None),
)


class TargetRefused(ValueError):
    """The URL may not be called from this server (scheme, or a non-public address)."""


@lru_cache(maxsize=1)
def _tables() -> list[tuple[IPNetwork, str, Unwrap | None]]:
    rows: list[tuple[IPNetwork, str, Unwrap | None]] = [
        (ipaddress.ip_network(net), name, None) for net, name in IPV4_SPECIAL
    ]
    rows += [(ipaddress.ip_network(net), name, unwrap) for net, name, unwrap in IPV6_SPECIAL]
    # Most specific first: ::1/128 before ::/96, Teredo 2001::/32 before 2001::/23.
    rows.sort(key=lambda row: -row[0].prefixlen)
    return rows


def refusal(address: str | IPAddress) -> str | None:
    """Why ``address`` may not be a webhook target (the range it is in), or None."""
    ip = (
        address
        if isinstance(address, (ipaddress.IPv4Address, ipaddress.IPv6Address))
        else ipaddress.ip_address(address.split("%", 1)[0])
    )
    for network, name, unwrap in _tables():
        if ip.version != network.version or ip not in network:
            continue
        if unwrap is None:
            return name
        assert isinstance(ip, ipaddress.IPv6Address)
        for embedded in unwrap(ip):
            if (why := refusal(embedded)) is not None:
                return f"{name} of an IPv4 address in {why}"
        return None
    return None if ip.is_global else "not a global unicast address"


def address_allowed(address: str) -> bool:
    """Only public unicast addresses, judged by the special-purpose tables above."""
    return refusal(address) is None


def resolve_public(url: str) -> list[str]:
    """The addresses ``url``'s host resolves to, all of them public, else ``TargetRefused``."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TargetRefused("must be an http:// or https:// URL with a host")
    host = parts.hostname
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        literal = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [str(literal)]
    else:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise TargetRefused(f"host {host!r} does not resolve: {exc}") from exc
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not addresses:
            raise TargetRefused(f"host {host!r} does not resolve")
    # The ranges only, not the addresses: a name's answers from this server's resolver
    # (an internal zone) are not the tenant's to learn.
    refused = sorted({why for a in addresses if (why := refusal(a)) is not None})
    if refused:
        raise TargetRefused(
            f"{host!r} is not a public address ({'; '.join(refused)}); "
            "such targets are not allowed on this server"
        )
    return addresses


def target_error(url: str, allow_private: bool) -> str | None:
    """Why ``url`` may not be registered as a webhook target here, or None."""
    if allow_private:
        return None
    try:
        resolve_public(url)
    except TargetRefused as exc:
        return str(exc)
    return None
