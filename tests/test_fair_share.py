"""Every frame is paid for (protocol §16): the attacks of issue 13 on the inbound side.

Each test is what a hostile client would do to make a worker spend without limit, and
failed before the budgets existed: refused frames and padded or rapid heartbeats were free,
bytes were not counted, a history request cost one frame whatever it sent back, connection
attempts were unlimited, and a WebSocket to an unrouted path was a 500.
"""

from __future__ import annotations

import json

import pytest
from channels.db import database_sync_to_async
from django.test import AsyncClient

from chat.budgets import HEARTBEAT_MAX_SIZE, Budgets, SocketBudget
from chat.client_address import ProxiedClient, client_address, trusted_networks
from chat.models import ChatSession
from chat.ratelimit import Rule
from chat.testing.client import ChatSocket
from chat.testing.client import token_for as worker_token
from chat.testing.clock import ManualClock
from tests.conftest import frames_until_close, join, open_socket, token_for
from tests.servers import run_workers

pytestmark = pytest.mark.django_db(transaction=True)

FRAMES = Rule(seconds=60, max_requests=5, close_factor=3)


# --- refused frames, heartbeats -------------------------------------------------------------


@pytest.mark.parametrize(
    "junk",
    [
        pytest.param(lambda c: c.send_text("{not json"), id="invalid JSON"),
        pytest.param(lambda c: c.send_bytes(b"\x00" * 100), id="binary"),
        # over the analysis frames' limit (a frame over the message size and under it goes to
        # an analysis process: tests/test_analysis.py)
        pytest.param(lambda c: c.send_text("x" * 1_000_001), id="over the size limit"),
        pytest.param(lambda c: c.send({"type": "nope"}), id="unknown type"),
    ],
)
async def test_refused_frames_count_toward_the_rate_limit_and_close_4029(clients, settings, junk):
    settings.CHAT_MESSAGE_RATE_LIMIT = 5
    settings.CHAT_INBOUND_BYTES_PER_MINUTE = 0  # the frames' own budget only
    alice = await clients.join("lobby", "alice")
    for _ in range(30):
        await junk(alice)
    frames, code = await frames_until_close(alice)
    codes = [f["error_code"] for f in frames]
    # refused for what they are, but paid for: then refused by the limit, and closed once
    # beyond 3x the limit in the window
    assert "RATE_LIMIT_EXCEEDED" not in codes[:5] and len(set(codes[:5])) == 1, codes
    assert codes[5:] == ["RATE_LIMIT_EXCEEDED"] * 11, codes
    assert code == 4029


async def test_a_heartbeat_flood_is_paid_for_and_closed(clients, settings):
    settings.CHAT_MESSAGE_RATE_LIMIT = 5
    alice = await clients.join("lobby", "alice")
    for _ in range(60):
        await alice.send({"type": "heartbeat"})
    frames, code = await frames_until_close(alice)
    answers = [f.get("error_code") or f["type"] for f in frames]
    # one a second is free, the others are paid: 5 answered, then refused, then closed
    assert 6 <= answers.count("heartbeat_ack") < 10, answers
    assert answers[-1] == "RATE_LIMIT_EXCEEDED" and code == 4029, answers


async def test_a_padded_heartbeat_is_a_paid_frame(clients, settings):
    settings.CHAT_MESSAGE_RATE_LIMIT = 2
    alice = await clients.join("lobby", "alice")
    for _ in range(2):
        await alice.send({"type": "typing", "is_typing": False})
        await alice.recv_type("typing")
    padded = {"type": "heartbeat", "pad": "x" * HEARTBEAT_MAX_SIZE}
    await alice.send(padded)
    await alice.expect_error("RATE_LIMIT_EXCEEDED")
    await alice.send({"type": "heartbeat"})  # a plain one is still free
    assert (await alice.recv())["type"] == "heartbeat_ack"


async def test_one_heartbeat_a_second_per_socket_is_free():
    clock = ManualClock()
    budget = SocketBudget(
        user_id="hb",
        budgets=Budgets(
            frames=FRAMES,
            bytes=None,
            catch_up=None,
            connects_per_user=None,
            connects_per_address=None,
        ),
        clock=clock,
    )
    for _ in range(20):  # a well-behaved client: never charged
        assert await budget.inbound(size=70, heartbeat=True) is None
        await clock.advance(1.0)
    refusals = [await budget.inbound(size=70, heartbeat=True) for _ in range(7)]
    # the first is free, the next five are paid, the last is over the limit
    assert [r is None for r in refusals] == [True] * 6 + [False]
    await clock.advance(0.5)
    assert await budget.inbound(size=70, heartbeat=True) is not None  # still within the second
    await clock.advance(0.5)
    assert await budget.inbound(size=70, heartbeat=True) is None


# --- the byte budget --------------------------------------------------------------------------


async def test_the_byte_budget_is_per_user_across_sockets(clients, settings):
    settings.CHAT_MESSAGE_RATE_LIMIT = 10_000
    # Unknown keys are ignored, not refused: a message of any size up to the frame limit.
    big = {"type": "message", "content": "big", "pad": "x" * 20_000}
    settings.CHAT_INBOUND_BYTES_PER_MINUTE = 5 * len(json.dumps(big)) + 1000  # + join pages
    first = await clients.join("lobby", "alice")
    second = await clients.join("other", "alice")
    for client in (first, second, first, second):
        await client.send(big)
        await client.recv_type("message")
    await first.send(big)
    await first.recv_type("message")  # five frames in all: the budget, nearly
    await second.send(big)
    error = await second.expect_error("RATE_LIMIT_EXCEEDED")
    assert error["details"]["scope"] == "bytes"
    assert 1 <= error["details"]["retry_after"] <= 120  # until this frame would fit
    await first.send(big)  # the other socket shares the budget
    error = await first.expect_error("RATE_LIMIT_EXCEEDED")
    assert error["details"]["scope"] == "bytes"
    # invalid frames are paid for by their size too: 3x over the budget closes 4029
    for _ in range(20):
        await second.send_text("y" * 20_000)
    frames, code = await frames_until_close(second)
    *refused, closing = frames
    assert {(f["error_code"], f["details"]["scope"]) for f in refused} == {
        ("RATE_LIMIT_EXCEEDED", "bytes")
    }
    assert closing["error_code"] == "RATE_LIMIT_EXCEEDED" and code == 4029


async def test_a_history_reply_is_paid_for_by_its_size(clients, settings):
    settings.CHAT_MESSAGE_RATE_LIMIT = 10_000
    settings.CHAT_INBOUND_BYTES_PER_MINUTE = 115_000
    settings.CHAT_HISTORY_ON_JOIN = 10  # ~20 KB
    writer = await clients.join("archive", "bob")
    for n in range(40):
        await writer.send({"type": "message", "content": f"{n} " + "h" * 1_990})
        await writer.recv_type("message")
    reader = await clients.join("archive", "eve")
    # A 70-byte request for ~80 KB: the first fits the budget, the second does not.
    await reader.send({"type": "history", "limit": 40, "request_id": "r1"})
    page = await reader.recv_type("history")
    assert len(page["messages"]) == 40 and len(json.dumps(page)) > 80_000
    await reader.send({"type": "history", "limit": 40, "request_id": "r2"})
    error = await reader.recv_type("error")
    assert error["error_code"] == "RATE_LIMIT_EXCEEDED" and error["details"]["scope"] == "bytes"
    await reader.expect_nothing_pending()  # and no page after it
    # A join over the budget: the socket is let in, its history refused, not sent.
    late = await open_socket("archive", token=token_for("eve"))
    assert (await late.recv())["type"] == "connection_ack"
    assert (await late.recv())["type"] == "presence"
    error = await late.recv()
    assert error["error_code"] == "RATE_LIMIT_EXCEEDED" and error["details"]["scope"] == "bytes"
    await late.close()


# --- connection attempts ----------------------------------------------------------------------


async def test_connection_attempts_per_user_are_limited_before_any_join_work(settings):
    settings.CHAT_CONNECT_RATE_LIMIT = 3
    for _ in range(3):
        client = await join("lobby", "loop")
        await client.close()
    sessions = await database_sync_to_async(ChatSession.objects.count)()
    refused = await open_socket("lobby", token=token_for("loop"))
    await refused.expect_refusal("RATE_LIMIT_EXCEEDED", 4029)
    # before any join work: no session, and a room that does not exist is not even looked up
    assert await database_sync_to_async(ChatSession.objects.count)() == sessions
    other = await open_socket("no-such-room", token=token_for("loop"))
    await other.expect_refusal("RATE_LIMIT_EXCEEDED", 4029)
    someone_else = await join("lobby", "bystander")  # another user is not affected
    await someone_else.close()


def _worker_env(**limits: int) -> dict[str, str]:
    return {name: str(value) for name, value in limits.items()}


async def test_connection_attempts_per_address_are_limited_before_the_token_is_read(tmp_path):
    env = _worker_env(CHAT_CONNECT_RATE_LIMIT_PER_ADDRESS=3, CHAT_CONNECT_RATE_LIMIT=0)
    with run_workers(tmp_path, env=env) as (worker,):
        for n in range(3):
            client = await ChatSocket.join(worker.url, "lobby", f"user-{n}")
            await client.close()
        # a fourth user from the same address, even without a valid token: refused first
        for token in (worker_token("user-4"), "not-a-token"):
            refused = await ChatSocket.open(worker.url, "/api/v1/ws/lobby", token=token)
            await refused.expect_error("RATE_LIMIT_EXCEEDED")
            await refused.expect_close(4029)


async def test_forwarded_addresses_count_only_behind_a_trusted_proxy(tmp_path):
    """Behind the proxy (127.0.0.1 trusted) each client address has its own count, and a
    forged entry a client put first is ignored; without the setting the header is ignored."""
    env = _worker_env(CHAT_CONNECT_RATE_LIMIT_PER_ADDRESS=1, CHAT_CONNECT_RATE_LIMIT=0)

    async def attempt(worker, uid: str, forwarded: str) -> str:
        client = await ChatSocket.open(
            worker.url,
            "/api/v1/ws/lobby",
            token=worker_token(uid),
            additional_headers={"X-Forwarded-For": forwarded},
        )
        try:
            return (await client.recv())["type"]
        finally:
            await client.close()

    (tmp_path / "proxied").mkdir()
    (tmp_path / "direct").mkdir()
    with run_workers(tmp_path / "proxied", env={**env, "CHAT_TRUSTED_PROXIES": "127.0.0.1"}) as (
        worker,
    ):
        assert await attempt(worker, "a", "203.0.113.1") == "connection_ack"
        assert await attempt(worker, "b", "203.0.113.2") == "connection_ack"
        # the client wrote 203.0.113.9 itself; the proxy appended what it saw: .1 again
        assert await attempt(worker, "c", "203.0.113.9, 203.0.113.1") == "error"
    with run_workers(tmp_path / "direct", env=env) as (worker,):
        assert await attempt(worker, "a", "203.0.113.1") == "connection_ack"
        assert await attempt(worker, "b", "203.0.113.2") == "error"  # both are 127.0.0.1


@pytest.mark.parametrize(
    ("peer", "header", "trusted", "expected"),
    [
        ("198.51.100.7", "203.0.113.1", "", "198.51.100.7"),  # no proxy configured
        ("198.51.100.7", "203.0.113.1", "10.0.0.0/8", "198.51.100.7"),  # peer is not a proxy
        ("10.0.0.2", "203.0.113.1", "10.0.0.0/8", "203.0.113.1"),
        ("10.0.0.2", "6.6.6.6, 203.0.113.1", "10.0.0.0/8", "203.0.113.1"),  # forged first
        ("10.0.0.2", "203.0.113.1, 10.0.0.3", "10.0.0.0/8", "203.0.113.1"),  # two proxies
        ("10.0.0.2", "", "10.0.0.0/8", "10.0.0.2"),
        ("10.0.0.2", "not-an-address", "10.0.0.0/8", "10.0.0.2"),
        ("::1", "2001:db8::5", "::1", "2001:db8::5"),
    ],
)
def test_client_address(peer, header, trusted, expected):
    networks = trusted_networks(trusted.split(","))
    assert client_address(peer=peer, forwarded_for=header, trusted=networks) == expected


async def test_the_admins_address_comes_through_the_same_rule():
    seen = {}

    async def app(scope, receive, send):
        seen["client"] = scope["client"]

    proxied = ProxiedClient(app, trusted=trusted_networks(["127.0.0.1"]))
    headers = [(b"x-forwarded-for", b"6.6.6.6, 203.0.113.1")]
    await proxied({"type": "http", "client": ("127.0.0.1", 5), "headers": headers}, None, None)
    assert seen["client"][0] == "203.0.113.1"
    await proxied({"type": "http", "client": ("198.51.100.1", 5), "headers": headers}, None, None)
    assert seen["client"][0] == "198.51.100.1"


# --- unrouted paths ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/api/v1//ws/lobby", "/api/v1/nothing", "/api/v1/ws", "/elsewhere", "/"],
)
async def test_a_socket_to_an_unrouted_path_is_invalid_room_never_a_500(path):
    client = await open_socket(path=f"{path}?token={token_for('alice')}")
    await client.expect_refusal("INVALID_ROOM", 4004)
    assert await database_sync_to_async(ChatSession.objects.count)() == 0


async def test_a_socket_to_a_path_with_a_newline_is_invalid_room(tmp_path):
    """daphne decodes %0a into the path (the test communicator cannot send one): a room id
    with a newline, or a path broken by one, was a 500 handshake."""
    with run_workers(tmp_path) as (worker,):
        for path in ("/api/v1/ws/lobby%0ax", "/api/v1/ws/%0a", "/api/v1/ws%0a/lobby"):
            client = await ChatSocket.open(worker.url, path, token=worker_token("alice"))
            await client.expect_error("INVALID_ROOM")
            await client.expect_close(4004)


@pytest.mark.parametrize(
    "path",
    ["/api/v1//ws/chat/stats", "/api/v1/ws/chat/stats%0a", "/api/v1/nothing", "/api/v1/%0a"],
)
async def test_an_unrouted_http_path_is_a_404(path):
    response = await AsyncClient().get(path)
    assert response.status_code == 404
