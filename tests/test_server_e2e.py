"""End to end: one real daphne worker (embedded default: SQLite file, in-memory layer,
local-memory cache) driven over loopback by real WebSocket clients.

No pytest-django database: the server has its own SQLite file. Each test uses its own room,
so the tests do not depend on each other's leftovers in the shared server.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator

import pytest
import respx
from websockets.exceptions import ConnectionClosed

from chat.testing.client import ChatSocket
from chat.testing.processes import Worker, alive, child_pids, command_line
from chat.testing.waiting import eventually
from tests.gemini_api import GENERATE_URL, GeminiServer, model_writes
from tests.servers import run_workers

PROVIDER = "chat.assistant.process"  # the provider process's command line names it


@pytest.fixture(scope="module")
def worker(tmp_path_factory) -> Iterator[Worker]:
    with run_workers(tmp_path_factory.mktemp("e2e-server"), count=1) as workers:
        yield workers[0]


@pytest.fixture
async def sockets(worker: Worker):
    """Opens sockets on the worker; closes them all after the test. The worker's logs are
    printed at teardown: pytest shows them with the report of a failed test only."""
    opened: list[ChatSocket] = []

    class Opener:
        async def join(self, room: str, uid: str, name: str | None = None, **kw) -> ChatSocket:
            client = await ChatSocket.join(worker.url, room, uid, name, **kw)
            opened.append(client)
            return client

        async def open(self, path: str, **kw) -> ChatSocket:
            client = await ChatSocket.open(worker.url, path, **kw)
            opened.append(client)
            return client

    yield Opener()
    await asyncio.gather(*(client.close() for client in opened))
    print(worker.logs())
    assert worker.alive(), f"the server died\n{worker.logs()}"


def user_ids(presence: dict) -> list[str]:
    return [user["user_id"] for user in presence["users"]]


async def test_two_users_chat_type_heartbeat_and_leave(sockets):
    room = "e2e"
    alice = await sockets.join(room, "alice")
    assert alice.ack["user_id"] == "alice"
    assert alice.ack["server_info"]["room_id"] == room
    assert isinstance(alice.ack["session_id"], str)
    assert user_ids(alice.presence) == ["alice"]
    assert alice.history["messages"] == [] and alice.history["request_id"] is None

    bob = await sockets.join(room, "bob")
    assert bob.ack["user_id"] == "bob"
    assert sorted(user_ids(bob.presence)) == ["alice", "bob"]
    assert bob.history["room_id"] == room

    joined = await alice.expect("system")
    assert joined["content"] == "Bob joined the chat" and joined["level"] == "info"
    user_joined = await alice.expect("user_joined")
    assert user_joined["user_id"] == "bob" and user_joined["username"] == "Bob"
    assert user_joined["status"] == "online"
    await bob.barrier()  # no join notice about oneself

    await alice.send({"type": "message", "content": "  hello bob  ", "message_id": "c-1"})
    to_alice = await alice.expect("message")
    to_bob = await bob.expect("message")
    assert to_alice == to_bob
    assert isinstance(to_alice["message_id"], str) and to_alice["message_id"].isdecimal()
    assert to_alice["content"] == "hello bob"
    assert to_alice["user_id"] == "alice" and to_alice["username"] == "Alice"
    assert to_alice["client_message_id"] == "c-1" and to_alice["room_id"] == room

    await bob.send({"type": "typing", "is_typing": True})
    for client in (alice, bob):
        typing = await client.expect("typing")
        assert typing["user_id"] == "bob" and typing["is_typing"] is True
        assert typing["message_id"] is None

    stamp = "2025-06-01T12:00:00.123Z"
    await alice.send({"type": "heartbeat", "client_timestamp": stamp})
    ack = await alice.expect("heartbeat_ack")
    assert ack["client_timestamp"] == stamp
    assert ack["server_timestamp"].endswith("Z")
    await bob.barrier()  # the ack goes to the sender only

    # Bob leaves while still "typing": the room sees the typing withdrawn, then the notices.
    await bob.close()
    withdrawn = await alice.expect("typing")
    assert withdrawn["user_id"] == "bob" and withdrawn["is_typing"] is False
    left = await alice.expect("system")
    assert left["content"] == "Bob left the chat"
    user_left = await alice.expect("user_left")
    assert user_left["user_id"] == "bob" and user_left["status"] == "offline"


async def test_history_page_before_newest(sockets):
    room = "e2e-history"
    carol = await sockets.join(room, "carol")
    ids = []
    for n in range(5):
        await carol.send({"type": "message", "content": f"m{n}"})
        ids.append((await carol.expect("message"))["message_id"])
    assert ids == sorted(ids, key=int)

    await carol.send({"type": "history", "before": ids[-1], "limit": 2, "request_id": "page-1"})
    page = await carol.expect("history")
    assert page["request_id"] == "page-1" and page["room_id"] == room
    assert [m["message_id"] for m in page["messages"]] == ids[2:4]  # oldest first
    assert [m["content"] for m in page["messages"]] == ["m2", "m3"]
    assert page["has_more"] is True

    # A newcomer's join history holds them all, oldest first, with the same frames.
    dave = await sockets.join(room, "dave")
    assert [m["message_id"] for m in dave.history["messages"]] == ids
    assert dave.history["has_more"] is False


async def test_older_chat_path_alias(sockets):
    room = "e2e-alias"
    erin = await sockets.join(room, "erin", path=f"/api/v1/chat/{room}")
    assert erin.ack["server_info"]["room_id"] == room
    frank = await sockets.join(room, "frank")  # the current path: same room
    assert sorted(user_ids(frank.presence)) == ["erin", "frank"]
    await erin.recv_type("user_joined")
    await erin.send({"type": "message", "content": "via the old path"})
    assert (await frank.expect("message"))["content"] == "via the old path"
    assert (await erin.expect("message"))["content"] == "via the old path"


async def test_no_token_error_then_close_4001(sockets):
    anonymous = await sockets.open("/api/v1/ws/e2e-auth")
    error = await anonymous.expect_error("AUTH_REQUIRED")  # arrives before the close
    assert error["message"] == "Authentication token is required"
    closed = await anonymous.expect_close(4001)
    assert isinstance(closed, ConnectionClosed)


async def test_binary_frame_refused_socket_stays_usable(sockets):
    grace = await sockets.join("e2e-binary", "grace")
    await grace.send_raw(b"\x00\x01binary")
    await grace.expect_error("UNSUPPORTED_FRAME")
    await grace.send({"type": "heartbeat"})
    assert (await grace.expect("heartbeat_ack"))["client_timestamp"] is None
    await grace.send({"type": "message", "content": "still here"})
    assert (await grace.expect("message"))["content"] == "still here"


async def test_sigterm_closes_sockets_4012_and_ends_sessions(tmp_path):
    """Shutdown (protocol §4.7): every socket gets SERVICE_UNAVAILABLE then 4012, every
    session is recorded as ended with reason `shutdown`, and the worker exits cleanly."""
    import signal
    import sqlite3

    with run_workers(tmp_path, count=1) as (worker,):
        alice = await ChatSocket.join(worker.url, "shutdown", "alice")
        bob = await ChatSocket.join(worker.url, "shutdown", "bob")
        await alice.recv_type("user_joined")
        worker.send_signal(signal.SIGTERM)
        for client in (alice, bob):
            await client.expect_error("SERVICE_UNAVAILABLE", timeout=10)
            await client.expect_close(4012, timeout=10)
        assert worker.reap(timeout=15) == 0, worker.logs()
        # Read before run_workers ends: the workers' database goes with them.
        database = worker.env["DATABASE_URL"].removeprefix("sqlite:///")
        with sqlite3.connect(database) as db:
            rows = db.execute(
                "select close_code, close_reason, disconnected_at from chat_chatsession"
            )
            assert [(code, reason) for code, reason, ended in rows if ended] == [
                (4012, "shutdown"),
                (4012, "shutdown"),
            ]


async def close_code(client: ChatSocket, timeout: float = 20) -> int | None:
    """Read whatever the server sends until it closes; its close code."""
    try:
        while True:
            await client.recv(timeout)
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd is not None else None


async def test_sigterm_ends_hundreds_of_sessions_within_the_grace(tmp_path):
    """A worker restarted under its users ends every session itself (reason `shutdown`), in
    batches, well within the grace: none left for another worker to reap as `worker_lost`,
    none still counting toward its user's connection cap."""
    import signal
    import sqlite3
    import time

    count = 300
    with run_workers(tmp_path, count=1, env={"CHAT_SHUTDOWN_GRACE": "20"}) as (worker,):
        clients = await asyncio.gather(
            *(ChatSocket.join(worker.url, f"restart-{n % 30}", f"user{n}") for n in range(count))
        )
        started = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        closing = asyncio.gather(*(close_code(c) for c in clients))
        # It stops listening first: a client reconnecting now is refused by the kernel while
        # the worker is still closing its sockets (not handshaked, not joined).
        refused_while_closing = None
        while refused_while_closing is None and time.monotonic() - started < 10:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", worker.port)
                writer.close()
                await asyncio.sleep(0.02)
            except (ConnectionRefusedError, ConnectionResetError):
                # (reset: the listener closed with this connection still in its backlog)
                refused_while_closing = not closing.done()
        codes = await closing
        assert worker.reap(timeout=25) == 0, worker.logs()
        elapsed = time.monotonic() - started
        database = worker.env["DATABASE_URL"].removeprefix("sqlite:///")
        with sqlite3.connect(database) as db:
            reasons = [
                reason
                for (reason,) in db.execute(
                    "select close_reason from chat_chatsession where disconnected_at is not null"
                )
            ]
            still_open = db.execute(
                "select count(*) from chat_chatsession where disconnected_at is null"
            ).fetchone()[0]
    assert set(codes) == {4012}
    assert refused_while_closing is True
    assert reasons == ["shutdown"] * count and still_open == 0
    assert "shutdown grace over" not in worker.logs()
    print(f"SIGTERM with {count} sockets: worker gone after {elapsed:.2f} s")


def provider_process(worker: Worker) -> int | None:
    """The worker's provider process, once it runs."""
    found = [pid for pid in child_pids(worker.pid) if PROVIDER in command_line(pid)]
    return found[0] if found else None


async def test_gemini_answers_from_the_workers_provider_process(tmp_path):
    """The production path: a real worker starts its provider process at its first request
    (before any question); that process asks the model (the mocked API, over HTTP); the room
    gets the deltas, then the stored reply; the process goes when the worker stops."""
    router = respx.MockRouter(assert_all_called=False)
    generate = router.post(url__regex=GENERATE_URL.pattern).mock(
        return_value=model_writes("Keep a regular bedtime.", pieces=4, delay=0.05)
    )
    api = GeminiServer(router)
    await api.start()
    env = {
        "ASSISTANT_PROVIDER": "gemini",
        "GEMINI_API_KEY": "test-key",
        "GEMINI_BASE_URL": api.url,
        "ASSISTANT_MODE": "mention",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    try:
        with run_workers(tmp_path, env=env) as workers:
            worker = workers[0]
            alice = await ChatSocket.join(worker.url, "e2e-ai", "alice")
            provider_pid = await eventually(  # started by the socket's request: no question yet
                lambda: provider_process(worker), timeout=30, what="the provider process starts"
            )
            await alice.send({"type": "message", "content": "@ai how do I sleep better?"})
            question = await alice.expect("message")
            deltas = []
            while (frame := await alice.recv(timeout=30))["type"] == "assistant_delta":
                deltas.append(frame)
            assert frame["type"] == "message" and frame["user_id"] == "AI", frame
            assert frame["content"] == "Keep a regular bedtime."
            assert "".join(d["delta"] for d in deltas) == frame["content"]
            assert frame["metadata"] == {
                "in_reply_to": question["message_id"],
                "stream_id": deltas[0]["stream_id"],
            }
            assert generate.call_count == 1
            await alice.close()
            # Its records are the worker's: JSON lines on the worker's stderr.
            assert any(
                record.get("logger") == PROVIDER and record.get("process") == "assistant"
                for record in worker.log_records()
            ), worker.logs()
        await eventually(lambda: not alive(provider_pid), what="the provider process ends")
    finally:
        await api.close()


async def test_the_provider_process_ends_by_itself_when_its_worker_is_killed(tmp_path):
    """SIGKILL (out of memory, a crash): nobody stops the provider process; it ends when its
    stdin closes with the worker."""
    env = {"ASSISTANT_PROVIDER": "gemini", "GEMINI_API_KEY": "test-key"}
    with run_workers(tmp_path, env=env) as (worker,):
        alice = await ChatSocket.join(worker.url, "e2e-ai-killed", "alice")
        provider_pid = await eventually(
            lambda: provider_process(worker), timeout=30, what="the provider process starts"
        )
        assert worker.stop(signal.SIGKILL, timeout=15) == -signal.SIGKILL
        with contextlib.suppress(ConnectionClosed):
            await alice.close()
        await eventually(lambda: not alive(provider_pid), timeout=10, what="it ends")
