"""The workers' transport (clarity_project/transport.py) against a real daphne worker, with
real clients: close reasons on the wire, a bound on what a socket that stops reading can make
the worker hold (protocol §16), and a deadline for request heads."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import sqlite3
from collections.abc import Iterator

import pytest

from chat.protocol import Close
from chat.testing.client import ChatSocket, token_for
from chat.testing.processes import HOST, Worker
from chat.testing.waiting import eventually, until
from tests.servers import run_workers

BOUND = 64 * 1024  # CHAT_MAX_OUTBOUND_BUFFER of this worker: a non-reader is caught sooner
HEAD_DEADLINE = 1.0  # CHAT_HANDSHAKE_TIMEOUT of this worker
CONTENT = "x" * 2000  # the largest message content: fills buffers in fewer messages

SLOW_CLOSES = "clarity_slow_consumer_closes_total"


@pytest.fixture(scope="module")
def worker(tmp_path_factory) -> Iterator[Worker]:
    env = {
        "CHAT_MAX_OUTBOUND_BUFFER": str(BOUND),
        "CHAT_HANDSHAKE_TIMEOUT": str(HEAD_DEADLINE),
        # The busy room's sender is one user sending thousands of messages (megabytes).
        "CHAT_MESSAGE_RATE_LIMIT": "1000000",
        "CHAT_INBOUND_BYTES_PER_MINUTE": "0",
        "LOG_LEVEL": "INFO",
    }
    with run_workers(tmp_path_factory.mktemp("transport"), env=env) as workers:
        yield workers[0]
        print(workers[0].logs())


def upgrade_request(port: int, path: str) -> list[bytes]:
    """The lines of a WebSocket upgrade request, each with its CRLF, the blank line last."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {HOST}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        "",
    ]
    return [f"{line}\r\n".encode() for line in lines]


def non_reading_socket(worker: Worker, room: str, uid: str) -> socket.socket:
    """A socket in `room` that reads the handshake's answer and never anything after: its
    receive buffer is small, so what the room says piles up in the worker."""
    conn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    conn.settimeout(5)
    conn.connect((HOST, worker.port))
    path = f"/api/v1/ws/{room}?token={token_for(uid)}"
    conn.sendall(b"".join(upgrade_request(worker.port, path)))
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = conn.recv(1)
        assert byte, f"closed during the handshake: {head!r}"
        head += byte
    assert head.startswith(b"HTTP/1.1 101 "), head
    return conn


def read_to_the_end(conn: socket.socket) -> int:
    """Read what is left until the connection ends (EOF or reset); the bytes read."""
    total = 0
    with contextlib.suppress(ConnectionResetError):
        while chunk := conn.recv(65536):
            total += len(chunk)
    return total


def session_row(worker: Worker, uid: str) -> tuple | None:
    """(close_code, close_reason) of `uid`'s ended session in the worker's database."""
    database = worker.env["DATABASE_URL"].removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(database, timeout=10)) as db:
        return db.execute(
            "select close_code, close_reason from chat_chatsession "
            "where user_id = ? and disconnected_at is not null",
            (uid,),
        ).fetchone()


LAST = "that was all"


class Reader:
    """A ChatSocket read as frames come (a client that keeps up), counting the room's
    messages until one whose content is LAST."""

    def __init__(self, client: ChatSocket):
        self.client = client
        self.messages = 0
        self.task = asyncio.create_task(self.read())

    async def read(self) -> None:
        while True:
            frame = await self.client.recv(timeout=60)
            if frame["type"] == "message":
                if frame["content"] == LAST:
                    return
                self.messages += 1

    async def finish(self) -> int:
        """The messages read before LAST; the socket is still open (the answer to a heartbeat
        comes), and is closed."""
        try:
            await asyncio.wait_for(self.task, 60)
            await self.client.barrier()
            return self.messages
        finally:
            self.task.cancel()
            await self.client.close()


async def test_every_server_close_carries_its_reason(worker):
    """daphne drops the reason of the application's close (django/daphne#374)."""
    refused = await ChatSocket.open(worker.url, "/api/v1/ws/reasons", token="not-a-token")
    await refused.expect_error("AUTH_INVALID")
    closed = await refused.expect_close(4003)
    assert closed.rcvd.reason == Close.INVALID_TOKEN.value.reason == "Invalid or expired token"

    anonymous = await ChatSocket.open(worker.url, "/api/v1/ws/reasons")
    await anonymous.expect_error("AUTH_REQUIRED")
    closed = await anonymous.expect_close(4001)
    assert closed.rcvd.reason == "Authentication token is required"


async def test_a_socket_that_stops_reading_is_closed_and_its_room_goes_on(worker):
    """The attack: join a busy room and never read. The worker must not hold what the room
    says for it without bound: past CHAT_MAX_OUTBOUND_BUFFER the socket is closed 4009
    (here aborted: it never reads the close), and whoever reads goes on."""
    before = worker.metric(SLOW_CLOSES)
    slow = non_reading_socket(worker, "busy", "slow")
    bystander = Reader(await ChatSocket.join(worker.url, "busy", "bystander"))
    sender = Reader(await ChatSocket.join(worker.url, "busy", "sender"))
    sent = 0

    # Far more than the bound and every buffer in front of it (the kernel's send buffer
    # grows to a few MB on loopback), sent until the worker says it closed the socket.
    async def closed_for_slowness() -> bool:
        nonlocal sent
        for _ in range(50):
            await sender.client.send({"type": "message", "content": CONTENT})
            sent += 1
        return await asyncio.to_thread(worker.metric, SLOW_CLOSES) > before

    try:
        await until(closed_for_slowness, timeout=90, step=0, what="the slow socket closed")
        read_to_the_end(slow)  # the connection is gone: EOF or reset, not a timeout
    except BaseException:
        for reader in (bystander, sender):
            reader.task.cancel()
            await reader.client.close()
        raise
    finally:
        slow.close()
    # Those who read got every message, and are still served.
    await sender.client.send({"type": "message", "content": LAST})
    assert [await bystander.finish(), await sender.finish()] == [sent, sent]

    metrics = worker.metrics()
    assert metrics[f'{SLOW_CLOSES}{{outcome="aborted"}}'] == 1
    assert metrics["clarity_slow_consumer_close_seconds_count"] == 1
    assert metrics['clarity_server_closes_total{code="4009"}'] >= 1
    ended = await eventually(lambda: session_row(worker, "slow"), what="slow's session ended")
    assert ended == (4009, "slow_consumer")


async def test_a_socket_that_reads_under_the_same_load_is_never_closed(worker):
    """Many times the bound goes through sockets that keep reading: none of it counts."""
    before = worker.metric(SLOW_CLOSES)
    reader = Reader(await ChatSocket.join(worker.url, "steady", "reader"))
    sender = Reader(await ChatSocket.join(worker.url, "steady", "steady-sender"))
    count = 40 * BOUND // len(CONTENT)
    for _ in range(count):
        await sender.client.send({"type": "message", "content": CONTENT})
    await sender.client.send({"type": "message", "content": LAST})
    assert [await reader.finish(), await sender.finish()] == [count, count]
    assert worker.metric(SLOW_CLOSES) == before


async def test_a_request_head_trickled_past_the_deadline_is_aborted(worker):
    """The attack: one header line every 0.3 s, forever. Each byte restarted Twisted's idle
    timeout, so this held a connection open for as long as the client liked."""
    before = worker.metric("clarity_request_head_timeouts_total")
    path = f"/api/v1/ws/trickle?token={token_for('trickler')}"
    head = upgrade_request(worker.port, path)[:-1]  # never the blank line that ends it
    with socket.create_connection((HOST, worker.port), timeout=5) as conn:
        conn.settimeout(0.3)  # the trickle's pace: a line whenever the server said nothing
        lines = 0
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            while lines < 10 * HEAD_DEADLINE / 0.3:
                conn.sendall(head[lines] if lines < len(head) else f"X-Pad-{lines}: 1\r\n".encode())
                lines += 1
                try:
                    if conn.recv(1024) == b"":
                        break
                except TimeoutError:
                    continue
            else:
                pytest.fail(f"the connection still open after {lines} lines")
    assert worker.metric("clarity_request_head_timeouts_total") == before + 1


async def test_a_deadline_for_heads_leaves_open_connections_alone(worker):
    """Heads that arrive in time are served; a WebSocket, and a kept-alive HTTP connection
    between its requests, outlive the deadline."""
    before = worker.metric("clarity_request_head_timeouts_total")
    client = await ChatSocket.join(worker.url, "heads", "punctual")
    request = (f"GET /healthz HTTP/1.1\r\nHost: {HOST}:{worker.port}\r\n\r\n").encode()
    with socket.create_connection((HOST, worker.port), timeout=5) as conn:
        conn.sendall(request)
        assert conn.recv(4096).startswith(b"HTTP/1.1 200 ")
        conn.settimeout(2 * HEAD_DEADLINE)
        with pytest.raises(TimeoutError):  # nothing, and no close, past the deadline
            conn.recv(1)
        conn.settimeout(5)
        conn.sendall(request)
        assert conn.recv(4096).startswith(b"HTTP/1.1 200 ")
    await client.barrier()
    await client.close()
    assert worker.metric("clarity_request_head_timeouts_total") == before
