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
- daphne's HTTP and WebSocket factories are this project's (clarity_project/transport.py):
  a deadline for request heads (CHAT_HANDSHAKE_TIMEOUT, then the connection is aborted),
  close reasons that reach the client, a bound on a socket's unsent output
  (CHAT_MAX_OUTBOUND_BUFFER: past it SLOW_CONSUMER and close 4009, aborted after
  CHAT_SLOW_CLOSE_TIMEOUT), protocol violations closed with their code, and no Twisted
  access log.
- On the embedded default (no REDIS_URL), the worker takes the lock of its SQLite database
  (chat/embedded.py) before it listens, and holds it until it exits: a second worker on the
  same file logs why it refuses and exits 1 instead of ending the first one's sessions.
- When its shutdown begins (SIGTERM/SIGINT, chat/worker.py), the worker stops listening:
  reconnecting clients are refused by the kernel instead of handshaking with it.
- The application is always clarity_project.asgi:application; do not name one.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from typing import Any

import daphne.server
from daphne.cli import CommandLineInterface
from daphne.server import Server

from chat.embedded import WorkerAlreadyServing, embedded_lock_acquire
from clarity_project.transport import WorkerHTTPFactory, WorkerWebSocketFactory

APPLICATION = "clarity_project.asgi:application"

logger = logging.getLogger("clarity_project.serve")  # also when run as __main__
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


class WorkerServer(Server):
    """daphne's server with this project's access log and factories in place of its own."""

    def __init__(self, *args: Any, action_logger: Any = None, **kwargs: Any):
        super().__init__(*args, action_logger=access_log if action_logger else None, **kwargs)
        self.ports: list[Any] = []

    def listen_success(self, port: Any) -> None:
        self.ports.append(port)
        super().listen_success(port)

    def stop_listening(self) -> None:
        """Accept no more connections (a shutdown has begun): clients that reconnect are
        refused by the kernel at once and try again, elsewhere or on the restarted worker,
        instead of costing this worker a handshake it would only answer with 4012."""
        for port in self.ports:
            port.stopListening()

    def run(self) -> None:
        # The application, and with it Django and its logging, is loaded by now; nothing
        # listens yet.
        from django.conf import settings

        try:
            self.embedded_lock = embedded_lock_acquire(
                database=settings.DATABASES["default"], redis_url=settings.REDIS_URL
            )
        except WorkerAlreadyServing as refusal:
            logger.error("%s", refusal)
            raise SystemExit(1) from None
        # Server.run builds its factories from these module attributes; only this process,
        # which runs one server, reads them.
        daphne.server.HTTPFactory = WorkerHTTPFactory
        daphne.server.WebSocketFactory = WorkerWebSocketFactory
        from clarity_project.asgi import worker

        worker.stop_listening = self.stop_listening
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
    stopped = False

    def exit_without_teardown() -> None:
        """Once the worker has stopped (its sessions ended, its sockets closed, its analysis
        processes stopped) and every exit handler registered after this one has run (the
        analysis pool's included): exit without the interpreter's teardown, which freed a
        stopped worker's heap object by object (~0.3 s with 2,000 sockets' objects, in a
        restart whose port is free only once the process is gone). Instagram's exit, for
        the same reason. A worker that did not stop cleanly takes the normal way out."""
        if stopped:
            logging.shutdown()  # (its own exit handler was registered before this one)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    atexit.register(exit_without_teardown)  # the first registered here: it runs last
    WorkerCommandLine().run(daphne_arguments(options))
    stopped = True


if __name__ == "__main__":
    main(sys.argv[1:])
