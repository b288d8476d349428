"""Browser origin policy for WebSocket handshakes (protocol §6).

Runs before any consumer code: a refused handshake is closed before accept, which daphne
turns into HTTP 403.
"""

from __future__ import annotations

from collections.abc import Awaitable
from urllib.parse import urlsplit

from django.conf import settings


def normalize_origin(origin: str) -> str | None:
    """scheme://host[:port] in lower case with default ports dropped; None if malformed."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        return None
    if parts.path not in {"", "/"} or parts.query or parts.fragment or parts.username:
        return None
    default = {"http": 80, "https": 443}[parts.scheme]
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    suffix = f":{port}" if port is not None and port != default else ""
    return f"{parts.scheme}://{host}{suffix}"


def origin_allowed(origin: str | None) -> bool:
    if origin is None:
        return settings.CHAT_ALLOW_NO_ORIGIN
    normalized = normalize_origin(origin)
    if normalized is None:  # includes the opaque origin "null"
        return False
    allowed = {normalize_origin(item) for item in settings.CHAT_ALLOWED_ORIGINS}
    return normalized in allowed


class OriginPolicy:
    """ASGI middleware: refuse WebSocket handshakes from origins not on the allow-list.

    `__call__` is not a coroutine: it returns the application's own awaitable, so a socket
    (which lives for hours) holds no suspended frame of this middleware (~0.4 KB each)."""

    _asgi_single_callable = True  # for asgiref: an ASGI 3 application all the same

    def __init__(self, app):
        self.app = app

    def __call__(self, scope, receive, send) -> Awaitable[None]:
        if scope["type"] == "websocket":
            origin = None
            for name, value in scope.get("headers", []):
                if name == b"origin":
                    origin = value.decode("latin-1")
                    break
            if not origin_allowed(origin):
                return self.refuse(receive, send)
        return self.app(scope, receive, send)

    @staticmethod
    async def refuse(receive, send) -> None:
        await receive()  # websocket.connect
        await send({"type": "websocket.close", "code": 1008})
