"""Start one daphne worker of this project: `python -m clarity_project.serve [daphne options]`.

scripts/serve, the systemd unit (deploy/) and the cluster harness of the tests and the
bench (chat/testing/) all start workers this way, so what this adds to daphne's own command
line holds everywhere:

- daphne's WebSocket message and frame limits are CHAT_WS_MAX_FRAME_SIZE (settings): a larger
  message is refused by daphne with close 1009 before the application reads it; anything up
  to it reaches the application, whose own limits answer with a typed MESSAGE_TOO_LARGE.
- The access log (verbosity 1, daphne's default, or more) goes through `logging`, as logger
  `daphne.access`, in LOG_FORMAT, and names paths only: daphne's own writes an HTTP request's
  whole URI, query string included, and browsers put tokens in the query string.
  (`--access-log FILE` is therefore ignored: the log goes where every other record goes.)
- The application is always clarity_project.asgi:application; do not name one.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import daphne.server
from daphne.cli import CommandLineInterface
from daphne.http_protocol import HTTPFactory
from daphne.server import Server
from daphne.ws_protocol import WebSocketFactory

APPLICATION = "clarity_project.asgi:application"

access_logger = logging.getLogger("daphne.access")

# daphne's action names, as its own access log spells them.
_WEBSOCKET_ACTIONS = {
    "connecting": "WSCONNECTING",
    "rejected": "WSREJECT",
    "connected": "WSCONNECT",
    "disconnected": "WSDISCONNECT",
}


def access_log(protocol: str, action: str, details: dict[str, Any]) -> None:
    """daphne's action logger: one record per HTTP response and WebSocket step, path only."""
    path = details["path"].partition("?")[0]
    client = details.get("client") or "-"
    if protocol == "http" and action == "complete":
        access_logger.info(
            "%s %s %s %s",
            client,
            details["method"],
            path,
            details["status"],
            extra={
                "client": client,
                "method": details["method"],
                "path": path,
                "status": details["status"],
                "size": details["size"],
                "duration": round(details["time_taken"], 6),
            },
        )
    elif protocol == "websocket" and action in _WEBSOCKET_ACTIONS:
        event = _WEBSOCKET_ACTIONS[action]
        access_logger.info(
            "%s %s %s", client, event, path, extra={"client": client, "event": event, "path": path}
        )


class PathOnlyHTTPFactory(HTTPFactory):
    """daphne's HTTP factory without Twisted's access log, which daphne shows from verbosity 2
    and which writes the whole URI, query string included: `access_log` is the only one."""

    def log(self, request: Any) -> None:
        pass


class ClosingWebSocketFactory(WebSocketFactory):
    """daphne's WebSocket factory, but a connection that breaks the protocol's rules (a message
    over the size limit, invalid UTF-8) is closed with the code that says why (1009, 1007,
    1002) instead of autobahn's default of dropping the TCP connection (the client sees 1006)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.setProtocolOptions(failByDrop=False)


class WorkerServer(Server):
    """daphne's server with this project's access log and factories in place of its own."""

    def __init__(self, *args: Any, action_logger: Any = None, **kwargs: Any):
        super().__init__(*args, action_logger=access_log if action_logger else None, **kwargs)

    def run(self) -> None:
        # Server.run builds its factories from these module attributes; only this process,
        # which runs one server, reads them.
        daphne.server.HTTPFactory = PathOnlyHTTPFactory
        daphne.server.WebSocketFactory = ClosingWebSocketFactory
        super().run()


class WorkerCommandLine(CommandLineInterface):
    server_class = WorkerServer


def daphne_arguments(options: list[str]) -> list[str]:
    """daphne's command line: the caller's options, then this project's limits and app."""
    from django.conf import settings

    limit = str(settings.CHAT_WS_MAX_FRAME_SIZE)
    return [
        *options,
        "--websocket-max-message-size",
        limit,
        "--websocket-max-frame-size",
        limit,
        APPLICATION,
    ]


def main(options: list[str]) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "clarity_project.settings")
    WorkerCommandLine().run(daphne_arguments(options))


if __name__ == "__main__":
    main(sys.argv[1:])
