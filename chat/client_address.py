"""The client's address (protocol §16): the peer's, or, when the peer is one of this
deployment's proxies (CHAT_TRUSTED_PROXIES), the one that proxy saw.

`X-Forwarded-For` is read only from a trusted proxy, and from its right end: each proxy
appends the address it saw, so the entries a client wrote itself are at the left. The first
entry from the right that is not a trusted proxy is the client. Every part of the project
that needs the address — the per-address connection limit, sessions, the admin's audit and
sign-in throttling — reads `scope["client"]` (Django's REMOTE_ADDR), which `ProxiedClient`
sets for HTTP and WebSocket alike.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def trusted_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """CHAT_TRUSTED_PROXIES' entries (addresses or CIDR networks); ValueError if one is not."""
    return tuple(
        ipaddress.ip_network(entry.strip(), strict=False) for entry in entries if entry.strip()
    )


def _trusted(address: str, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def client_address(*, peer: str, forwarded_for: str, trusted: tuple[Network, ...]) -> str:
    """The client's address, given the TCP peer and its X-Forwarded-For header value."""
    if not trusted or not _trusted(peer, trusted):
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, trusted):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer  # not what a proxy writes: trust nothing in it
    return hops[0] if hops else peer


def _header(scope: dict, name: bytes) -> str:
    values = [
        value.decode("latin-1") for key, value in scope.get("headers", []) if key.lower() == name
    ]
    return ",".join(values)


class ProxiedClient:
    """ASGI middleware: `scope["client"]` becomes the client's address (see above)."""

    def __init__(self, app, *, trusted: tuple[Network, ...]) -> None:
        self.app = app
        self.trusted = trusted

    async def __call__(self, scope, receive, send):
        peer = scope.get("client")
        if self.trusted and peer and scope["type"] in ("http", "websocket"):
            address = client_address(
                peer=peer[0], forwarded_for=_header(scope, b"x-forwarded-for"), trusted=self.trusted
            )
            if address != peer[0]:
                scope = {**scope, "client": (address, 0)}
        return await self.app(scope, receive, send)
