"""Which webhook targets may be called: http(s) URLs resolving only to public addresses."""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


class TargetRefused(ValueError):
    """The URL may not be called from this server (scheme, or a non-public address)."""


def address_allowed(address: str) -> bool:
    """Only public unicast addresses: no loopback, private, link-local (cloud metadata),
    shared (CGNAT), multicast, reserved or unspecified ones; IPv4-mapped IPv6 judged as IPv4."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


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
    refused = [a for a in addresses if not address_allowed(a)]
    if refused:
        raise TargetRefused(
            f"{host!r} is a private, loopback or link-local address ({', '.join(refused)}); "
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
