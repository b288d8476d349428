"""Origin policy at the handshake: refused before any consumer code runs (HTTP 403), through
the ASGI application and on the wire against a real daphne worker."""

import base64
import contextlib
import os
import socket
import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from channels.testing import WebsocketCommunicator

from chat.models import ChatSession
from chat.origins import normalize_origin, origin_allowed
from chat.testing.processes import HOST, Worker
from clarity_project.asgi import application
from tests.conftest import token_for
from tests.servers import run_workers

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def allow_list(settings):
    settings.CHAT_ALLOWED_ORIGINS = ["https://app.clarity.example", "http://localhost:8000"]
    settings.CHAT_ALLOW_NO_ORIGIN = True


async def handshake(origin: bytes | None) -> tuple[bool, object]:
    headers = [(b"origin", origin)] if origin is not None else []
    communicator = WebsocketCommunicator(
        application, f"/api/v1/ws/lobby?token={token_for('alice')}", headers=headers
    )
    result = await communicator.connect(timeout=5)
    await communicator.disconnect()
    return result


@pytest.mark.parametrize(
    "origin",
    [b"https://app.clarity.example", b"https://APP.clarity.example:443", b"http://localhost:8000"],
)
async def test_allowed_origins_connect(origin):
    assert (await handshake(origin))[0] is True


@pytest.mark.parametrize(
    "origin",
    [
        b"null",
        b"https://app.clarity.example.evil.com",
        b"https://evilapp.clarity.example",
        b"http://app.clarity.example",
        b"https://app.clarity.example:8443",
        b"http://localhost:8001",
        b"file://",
        b"",
        b"https://app.clarity.example/path",
    ],
)
async def test_other_origins_are_refused_before_accept(origin):
    connected, _ = await handshake(origin)
    assert connected is False


async def test_native_clients_without_origin(settings):
    assert (await handshake(None))[0] is True
    settings.CHAT_ALLOW_NO_ORIGIN = False
    assert (await handshake(None))[0] is False


def test_normalize_origin():
    assert normalize_origin("HTTPS://Example.COM:443") == "https://example.com"
    assert normalize_origin("http://[::1]:8000") == "http://[::1]:8000"
    assert normalize_origin("null") is None
    assert normalize_origin("https://u:p@example.com") is None
    assert origin_allowed(None) is True


# --- Raw handshakes against a real daphne worker ----------------------------------------------
#
# What a browser (or anyone) sends on the wire, and the HTTP status daphne answers: 101 to
# switch to WebSocket, 403 for a refused origin. Each request carries a valid token for a user
# of its own, so a refusal that let the consumer run would leave a session row behind.

ALLOWED = "http://example.com,https://app.example.com:8443"


@pytest.fixture(scope="module")
def lenient(tmp_path_factory) -> Iterator[Worker]:
    """Allows ALLOWED, and handshakes without Origin (the default)."""
    env = {"CHAT_ALLOWED_ORIGINS": ALLOWED, "CHAT_ALLOW_NO_ORIGIN": "1"}
    with run_workers(tmp_path_factory.mktemp("origins-lenient"), env=env) as workers:
        yield workers[0]


@pytest.fixture(scope="module")
def strict(tmp_path_factory) -> Iterator[Worker]:
    """Allows ALLOWED only: no handshake without Origin."""
    env = {"CHAT_ALLOWED_ORIGINS": ALLOWED, "CHAT_ALLOW_NO_ORIGIN": "0"}
    with run_workers(tmp_path_factory.mktemp("origins-strict"), env=env) as workers:
        yield workers[0]


@dataclass
class Handshake:
    status: int
    uid: str  # the user whose token it carried
    client: str  # host:port, as the access log names it


def raw_handshake(worker: Worker, headers: list[str]) -> Handshake:
    """Send a hand-written WebSocket upgrade with these extra header lines. After a 101, waits
    for the first frame (the consumer has then opened the session) and drops the connection."""
    uid = f"origin-{uuid.uuid4().hex[:12]}"
    request = "".join(
        f"{line}\r\n"
        for line in [
            f"GET /api/v1/ws/lobby?token={token_for(uid)} HTTP/1.1",
            f"Host: {HOST}:{worker.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}",
            "Sec-WebSocket-Version: 13",
            *headers,
            "",
        ]
    )
    with socket.create_connection((HOST, worker.port), timeout=5) as conn:
        client = "{}:{}".format(*conn.getsockname())
        conn.sendall(request.encode("latin-1"))
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = conn.recv(4096)
            assert chunk, f"connection closed after {received!r}"
            received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if status == 101 and not body:
            assert conn.recv(4096), "no frame after the upgrade"
    return Handshake(status, uid, client)


def sessions_of(worker: Worker, uid: str) -> int:
    database = worker.env["DATABASE_URL"].removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(database)) as db:
        table = ChatSession._meta.db_table
        return db.execute(f"SELECT COUNT(*) FROM {table} WHERE user_id = ?", [uid]).fetchone()[0]


def assert_refused_before_the_consumer(worker: Worker, handshake: Handshake) -> None:
    """No session and no record of our loggers for its user; for a 403, daphne's access log
    says the application rejected it (WSREJECT). That record is already written when the
    client has the 403: daphne logs it in the same reactor step as it queues the response,
    which Twisted writes out only after that step."""
    records = worker.log_records()
    if handshake.status == 403:
        rejects = [(r.get("event"), r.get("client")) for r in records]
        assert ("WSREJECT", handshake.client) in rejects, "no WSREJECT in the access log"
    assert sessions_of(worker, handshake.uid) == 0
    ours = [r for r in records if r["logger"].startswith("chat.")]
    assert not [r for r in ours if handshake.uid in r["message"]], ours


@pytest.mark.parametrize(
    "origin",
    [
        "http://example.com",
        "http://example.com:80",  # the default port, spelled out
        "HTTP://EXAMPLE.COM",  # scheme and host are case-insensitive (RFC 6454)
        "https://app.example.com:8443",
    ],
)
def test_raw_handshake_from_an_allowed_origin_switches_protocols(lenient, origin):
    handshake = raw_handshake(lenient, [f"Origin: {origin}"])
    assert handshake.status == 101
    assert sessions_of(lenient, handshake.uid) == 1


@pytest.mark.parametrize(
    "header",
    [
        "Origin: http://example.com.evil.net",
        "Origin: http://EXAMPLE.COM.evil.net",
        "Origin: http://evil-example.com",
        "Origin: http://evilexample.com",
        "Origin: http://sub.example.com",
        "Origin: http://example.com@evil.net",
        "Origin: http://evil.net#http://example.com",
        "Origin: http://example.com/evil",
        "Origin: https://example.com",  # another scheme
        "Origin: http://example.com:8080",  # another port
        "Origin: https://app.example.com",  # the allowed host on its default port
        "Origin: ws://example.com",
        "Origin: null",
        "oRiGiN: http://evil.net",  # header names are case-insensitive
    ],
)
def test_raw_handshake_from_another_origin_is_refused_before_any_consumer_code(lenient, header):
    handshake = raw_handshake(lenient, [header])
    assert handshake.status == 403
    assert_refused_before_the_consumer(lenient, handshake)


def test_raw_handshake_with_an_empty_origin_is_a_bad_request(lenient):
    """autobahn refuses it as malformed (400) before daphne hands it to the application."""
    handshake = raw_handshake(lenient, ["Origin: "])
    assert handshake.status == 400
    assert_refused_before_the_consumer(lenient, handshake)


def test_raw_handshake_without_origin_follows_chat_allow_no_origin(lenient, strict):
    assert raw_handshake(lenient, []).status == 101
    handshake = raw_handshake(strict, [])
    assert handshake.status == 403
    assert_refused_before_the_consumer(strict, handshake)
    assert raw_handshake(strict, ["Origin: http://example.com"]).status == 101
