"""The chat consumer, driven through the real ASGI application on the in-memory layer."""

from __future__ import annotations

import json

import pytest
from channels.db import database_sync_to_async

from chat.models import ChatMessage, ChatSession, Role, Room, RoomKind, RoomMember
from chat.protocol import ERROR_MESSAGES, ErrorCode
from tests.conftest import open_socket, room_ensure, token_for

pytestmark = pytest.mark.django_db(transaction=True)

ENVELOPE = ["type", "timestamp", "message_id"]


def assert_envelope(frame: dict) -> None:
    assert list(frame)[:3] == ENVELOPE
    assert frame["timestamp"].endswith("Z")


# --- joining ---------------------------------------------------------------------------------


async def test_join_sends_ack_presence_history_in_order(clients, settings):
    alice = await clients.join("lobby", "alice", "Alice")
    ack = alice.ack
    assert_envelope(ack)
    assert ack["message_id"] is None
    assert ack["user_id"] == "alice"
    assert len(ack["session_id"]) == 36
    info = ack["server_info"]
    assert info["heartbeat_interval"] == settings.CHAT_HEARTBEAT_INTERVAL
    assert info["connection_timeout"] == settings.CHAT_CONNECTION_TIMEOUT
    assert info["max_message_size"] == 65536
    assert info["rate_limit"] == 60
    assert info["room_id"] == "lobby"
    assert info["server_time"].endswith("Z")

    assert alice.presence["room_id"] == "lobby"
    [me] = alice.presence["users"]
    assert me["user_id"] == "alice" and me["username"] == "Alice"
    assert me["connection_count"] == 1
    assert me["connected_at"].endswith("Z") and me["last_seen"].endswith("Z")

    assert alice.history["messages"] == []
    assert alice.history["has_more"] is False
    assert alice.history["request_id"] is None
    assert alice.history["room_id"] == "lobby"


async def test_both_chat_paths_are_served(clients):
    await database_sync_to_async(room_ensure)("legacy")
    old = await clients.open(path="/api/v1/chat/legacy", token=token_for("alice"))
    assert (await old.recv())["type"] == "connection_ack"
    # The older path follows the same rule: an unknown room is refused, not made.
    unknown = await clients.open(path="/api/v1/chat/nowhere", token=token_for("alice"))
    await unknown.expect_refusal("ROOM_FORBIDDEN", 4004)


def room_traces(room_id: str) -> tuple[bool, int, int]:
    """Whether the room exists, and its sessions and member rows."""
    return (
        Room.objects.filter(name=room_id).exists(),
        ChatSession.objects.filter(room_id=room_id).count(),
        RoomMember.objects.filter(room_id=room_id).count(),
    )


async def test_with_open_rooms_an_unknown_room_is_created_public_on_first_join(clients, settings):
    settings.CHAT_OPEN_ROOMS = True
    await clients.join("new-room_1.x", "alice", public_room=False)
    room = await database_sync_to_async(Room.objects.get)(name="new-room_1.x")
    assert room.kind == RoomKind.PUBLIC
    members = await database_sync_to_async(list)(
        RoomMember.objects.filter(room=room).values_list("user_id", "role", "banned")
    )
    assert members == [("alice", Role.MEMBER, False)]


async def test_by_default_an_unknown_room_is_refused_and_not_created(clients):
    client = await clients.open("new-room_1.x", token=token_for("alice"))
    error = await client.expect_refusal("ROOM_FORBIDDEN", 4004)
    assert error["message"] == "Room not found"
    assert await database_sync_to_async(room_traces)("new-room_1.x") == (False, 0, 0)


async def test_join_and_leave_notices_go_to_others_once_per_user(clients):
    alice = await clients.join("lobby", "alice")
    bob = await clients.join("lobby", "bob")
    joined = await alice.recv()
    assert joined["type"] == "system"
    assert joined["content"] == "Bob joined the chat" and joined["level"] == "info"
    user_joined = await alice.recv()
    assert user_joined["type"] == "user_joined"
    assert user_joined["user_id"] == "bob" and user_joined["status"] == "online"
    await bob.expect_nothing_pending()  # the newcomer is not told about itself

    bob2 = await clients.join("lobby", "bob")  # a second socket: no notice
    assert [u["connection_count"] for u in bob2.presence["users"] if u["user_id"] == "bob"] == [2]
    await alice.expect_nothing_pending()
    await bob2.close()
    await alice.expect_nothing_pending()  # bob still has a socket in the room

    await bob.close()
    left = await alice.recv()
    assert left["type"] == "system" and left["content"] == "Bob left the chat"
    user_left = await alice.recv()
    assert user_left["type"] == "user_left" and user_left["user_id"] == "bob"


async def test_presence_lists_everyone_in_the_room(clients):
    await clients.join("lobby", "alice")
    await clients.join("lobby", "bob")
    await clients.join("elsewhere", "carol")
    dave = await clients.join("lobby", "dave")
    assert [u["user_id"] for u in dave.presence["users"]] == ["alice", "bob", "dave"]


async def test_sessions_are_recorded_and_closed(clients):
    alice = await clients.join("lobby", "alice")
    session = await database_sync_to_async(ChatSession.objects.get)(
        session_id=alice.ack["session_id"]
    )
    assert session.is_active and session.user_id == "alice" and session.room_id == "lobby"
    await alice.send({"type": "message", "content": "one"})
    await alice.recv_type("message")
    await alice.close()
    await database_sync_to_async(session.refresh_from_db)()
    assert not session.is_active
    assert session.close_code == 1000
    assert session.messages_sent == 1


# --- refusals (accept, error frame, close) ---------------------------------------------------


@pytest.mark.parametrize(
    "room",
    ["bad room", "x" * 65, "colon:x", "é", "a/b", ""],
)
async def test_invalid_rooms_are_refused(clients, room):
    client = await clients.open(path=f"/api/v1/ws/{room}", token=token_for("alice"))
    error = await client.expect_refusal("INVALID_ROOM", 4004)
    assert error["message"] == "Invalid room"


async def open_health_room(uid: str) -> None:
    """The user's personal room exists: made by their health-analysis socket."""
    health = await open_socket(path=f"/api/v1/ws/health-analysis/{uid}", token=token_for(uid))
    assert (await health.recv())["type"] == "connection_ack"
    await health.close()


@pytest.mark.parametrize("exists", [True, False], ids=["opened-before", "never-opened"])
async def test_health_rooms_are_forbidden_over_the_chat_path(clients, exists):
    """Another user's personal room, and the user's own, are no chat rooms (protocol §11)."""
    if exists:
        for uid in ("alice", "bob"):
            await open_health_room(uid)
        kinds = await database_sync_to_async(dict)(
            Room.objects.filter(name__startswith="health_analysis_").values_list("name", "kind")
        )
        assert kinds == {f"health_analysis_{uid}": RoomKind.PERSONAL for uid in ("alice", "bob")}
    for room in ("health_analysis_bob", "health_analysis_alice"):
        client = await clients.open(room, token=token_for("alice"))
        error = await client.expect_refusal("ROOM_FORBIDDEN", 4004)
        assert error["message"] == "Room not found"
    chat_sessions = ChatSession.objects.filter(
        room__name__startswith="health_analysis_", endpoint="chat"
    )
    assert await database_sync_to_async(chat_sessions.count)() == 0


async def test_closed_room_refuses_new_joins(clients):
    await database_sync_to_async(Room.objects.create)(
        name="shut", kind=RoomKind.PUBLIC, is_closed=True
    )
    client = await clients.open("shut", token=token_for("alice"))
    await client.expect_refusal("ROOM_CLOSED", 4004)


async def test_full_room_refuses_new_users_but_not_more_sockets(clients):
    await database_sync_to_async(Room.objects.create)(
        name="small", kind=RoomKind.PUBLIC, max_users=1
    )
    await clients.join("small", "alice")
    await clients.join("small", "alice")  # same user, second socket
    bob = await clients.open("small", token=token_for("bob"))
    await bob.expect_refusal("ROOM_FULL", 4004)


async def test_fourth_socket_of_a_user_is_refused_across_rooms(clients):
    await clients.join("one", "alice")
    await clients.join("two", "alice")
    await clients.join("three", "alice")
    fourth = await clients.open("four", token=token_for("alice"), public_room=True)
    await fourth.expect_refusal("TOO_MANY_CONNECTIONS", 4008)
    await clients.join("four", "bob")  # other users are unaffected


async def test_no_token_is_refused(clients):
    client = await clients.open("lobby")
    error = await client.expect_refusal("AUTH_REQUIRED", 4001)
    assert error["message"] == "Authentication token is required"


# --- chat messages ---------------------------------------------------------------------------


async def test_two_users_see_each_others_messages(clients):
    alice = await clients.join("lobby", "alice")
    bob = await clients.join("lobby", "bob")
    await alice.recv_type("user_joined")
    await alice.send(
        {"type": "message", "content": "  hello bob  ", "message_id": "c-1", "metadata": {"k": 1}}
    )
    to_bob = await bob.recv()
    to_alice = await alice.recv()
    assert to_bob == to_alice
    assert_envelope(to_bob)
    assert to_bob["type"] == "message"
    assert to_bob["content"] == "hello bob"
    assert to_bob["user_id"] == "alice" and to_bob["username"] == "Alice"
    assert to_bob["client_message_id"] == "c-1"
    assert to_bob["metadata"] == {"k": 1}
    assert to_bob["room_id"] == "lobby"
    stored = await database_sync_to_async(ChatMessage.objects.get)(pk=int(to_bob["message_id"]))
    assert stored.content == "hello bob" and stored.room_id == "lobby"

    await bob.send({"type": "message", "content": "hi alice", "user_id": "bob"})
    assert (await alice.recv())["content"] == "hi alice"
    assert (await bob.recv())["content"] == "hi alice"


async def test_user_in_two_rooms_gets_each_rooms_traffic_on_its_own_socket(clients):
    alice_a = await clients.join("room-a", "alice")
    alice_b = await clients.join("room-b", "alice")
    bob = await clients.join("room-a", "bob")
    carol = await clients.join("room-b", "carol")
    await alice_a.recv_type("user_joined")
    await alice_b.recv_type("user_joined")

    await bob.send({"type": "message", "content": "for room a"})
    assert (await alice_a.recv())["content"] == "for room a"
    await bob.send({"type": "typing", "is_typing": True})
    assert (await alice_a.recv())["type"] == "typing"
    await carol.send({"type": "message", "content": "for room b"})
    assert (await alice_b.recv())["content"] == "for room b"
    await alice_a.expect_nothing_pending()
    await alice_b.expect_nothing_pending()


async def test_history_on_join_has_the_last_messages(clients, settings):
    settings.CHAT_HISTORY_ON_JOIN = 3
    alice = await clients.join("lobby", "alice")
    for n in range(5):
        await alice.send({"type": "message", "content": f"m{n}"})
        await alice.recv_type("message")
    bob = await clients.join("lobby", "bob")
    assert [m["content"] for m in bob.history["messages"]] == ["m2", "m3", "m4"]
    assert bob.history["has_more"] is True
    first = bob.history["messages"][0]
    assert first["type"] == "message" and first["message_id"] is not None


async def test_history_paging_before_and_after(clients):
    alice = await clients.join("lobby", "alice")
    ids = []
    for n in range(7):
        await alice.send({"type": "message", "content": f"m{n}"})
        ids.append((await alice.recv_type("message"))["message_id"])

    await alice.send({"type": "history", "before": ids[-1], "limit": 3, "request_id": "r1"})
    page = await alice.recv()
    assert page["type"] == "history" and page["request_id"] == "r1"
    assert [m["content"] for m in page["messages"]] == ["m3", "m4", "m5"]
    assert page["has_more"] is True

    await alice.send({"type": "history", "before": int(ids[1]), "limit": 3})
    page = await alice.recv()
    assert [m["content"] for m in page["messages"]] == ["m0"]
    assert page["has_more"] is False and page["request_id"] is None

    await alice.send({"type": "history", "after": ids[2], "limit": 2, "request_id": "r2"})
    page = await alice.recv()
    assert [m["content"] for m in page["messages"]] == ["m3", "m4"]
    assert page["has_more"] is True

    await alice.send({"type": "history", "after": ids[5]})
    page = await alice.recv()
    assert [m["content"] for m in page["messages"]] == ["m6"]
    assert page["has_more"] is False


async def test_history_pages_never_exceed_their_byte_cap(clients, settings):
    """Large messages: a page holds as many as fit in CHAT_HISTORY_MAX_BYTES, the rest are
    left for the next page (has_more), instead of a frame that costs more than a client can
    be made to receive for one request (protocol §16).

    Messages are as large as a client may make them (2,000 characters of content, about 4 KB
    of metadata, protocol §11): about 6.2 KB encoded each, so three fit in the page's budget
    (the frame size less HISTORY_ENVELOPE_BYTES) and four do not."""
    settings.CHAT_HISTORY_MAX_BYTES = 22_500
    alice = await clients.join("lobby", "alice")
    ids = []
    for n in range(6):
        await alice.send(
            {
                "type": "message",
                "content": f"m{n}" + "y" * 1990,
                "metadata": {"blob": "x" * 4000},
            }
        )
        ids.append((await alice.recv_type("message"))["message_id"])

    bob = await clients.join("lobby", "bob")
    newest = [m["content"][:2] for m in bob.history["messages"]]
    assert newest == ["m3", "m4", "m5"] and bob.history["has_more"] is True
    await bob.send({"type": "history", "before": ids[3]})
    older = await bob.recv_type("history")
    assert [m["content"][:2] for m in older["messages"]] == ["m0", "m1", "m2"]
    assert older["has_more"] is False
    await bob.send({"type": "history", "after": ids[0]})
    catch_up = await bob.recv_type("history")
    assert [m["content"][:2] for m in catch_up["messages"]] == ["m1", "m2", "m3"]
    assert catch_up["has_more"] is True


@pytest.mark.parametrize(
    "request_",
    [
        {"type": "history", "limit": 101},
        {"type": "history", "limit": 0},
        {"type": "history", "before": 3, "after": 1},
        {"type": "history", "before": "abc"},
        {"type": "history", "limit": "5"},
    ],
)
async def test_bad_history_requests(clients, request_):
    alice = await clients.join("lobby", "alice")
    await alice.send(request_)
    error = await alice.expect_error("MESSAGE_PARSE_ERROR")
    assert error["details"]["errors"]


# --- typing ----------------------------------------------------------------------------------


async def test_typing_is_relayed_to_the_room_including_the_sender(clients):
    alice = await clients.join("lobby", "alice")
    bob = await clients.join("lobby", "bob")
    await alice.recv_type("user_joined")
    await bob.send({"type": "typing", "is_typing": True, "username": "Spoofed"})
    for client in (alice, bob):
        typing = await client.recv()
        assert typing["type"] == "typing"
        assert typing["user_id"] == "bob" and typing["username"] == "Bob"
        assert typing["is_typing"] is True


async def test_typing_is_withdrawn_when_the_socket_closes(clients):
    alice = await clients.join("lobby", "alice")
    bob = await clients.join("lobby", "bob")
    await alice.recv_type("user_joined")
    await bob.send({"type": "typing", "is_typing": True})
    assert (await alice.recv())["is_typing"] is True
    await bob.close()
    withdrawn = await alice.recv()
    assert withdrawn["type"] == "typing" and withdrawn["is_typing"] is False
    assert (await alice.recv())["type"] == "system"


# --- heartbeats and timeouts -----------------------------------------------------------------


async def test_heartbeat_ack_echoes_a_valid_client_timestamp(clients):
    alice = await clients.join("lobby", "alice")
    await alice.send({"type": "heartbeat", "client_timestamp": "2025-06-04T18:44:51.123Z"})
    ack = await alice.recv()
    assert_envelope(ack)
    assert ack["type"] == "heartbeat_ack"
    assert ack["client_timestamp"] == "2025-06-04T18:44:51.123Z"
    assert ack["server_timestamp"].endswith("Z")


@pytest.mark.parametrize("payload", [{}, {"client_timestamp": "not a time"}])
async def test_heartbeat_ack_without_usable_timestamp(clients, payload):
    alice = await clients.join("lobby", "alice")
    await alice.send({"type": "heartbeat", **payload})
    ack = await alice.recv()
    assert ack["type"] == "heartbeat_ack" and ack["client_timestamp"] is None


# --- the inbound pipeline and its error codes ------------------------------------------------


async def test_binary_frames_are_unsupported(clients):
    alice = await clients.join("lobby", "alice")
    await alice.send_bytes(b"\x00\x01")
    error = await alice.expect_error("UNSUPPORTED_FRAME")
    assert_envelope(error)
    await alice.send({"type": "heartbeat"})
    assert (await alice.recv())["type"] == "heartbeat_ack"


async def test_oversized_frames_are_refused(clients):
    alice = await clients.join("lobby", "alice")
    big = json.dumps({"type": "message", "content": "x", "pad": "y" * 65536})
    await alice.send_text(big)
    error = await alice.expect_error("MESSAGE_TOO_LARGE")
    assert error["details"] == {"max_size": 65536}
    assert error["message"] == "Message size exceeds 65536 bytes"
    # exactly at the limit (multi-byte characters counted as UTF-8 bytes) is fine
    at_limit = json.dumps({"type": "heartbeat", "pad": ""})
    await alice.send_text(at_limit[:-2] + "é" * ((65536 - len(at_limit)) // 2) + '"}')
    assert (await alice.recv())["type"] == "heartbeat_ack"


@pytest.mark.parametrize(
    # "[" * 60_000: nesting deep enough to overflow a recursive decoder, under the size limit
    # (a longer one is MESSAGE_TOO_LARGE: size is checked before decoding, protocol §5)
    "text",
    ["this is not json", "{", '{"type": NaN}', "[" * 60_000, "1e999", ""],
)
async def test_invalid_json(clients, text):
    alice = await clients.join("lobby", "alice")
    await alice.send_text(text)
    error = await alice.expect_error("INVALID_JSON")
    assert error["message"] == "Invalid JSON format"
    assert error["details"] is None


@pytest.mark.parametrize(
    "payload",
    [
        [1, 2],
        "a string",
        {"type": "message"},
        {"type": "message", "content": "   "},
        {"type": "message", "content": "x" * 2001},
        {"type": "message", "content": 5},
        {"type": "message", "content": "ok", "metadata": [1]},
        {"type": "message", "content": "nul \u0000 inside"},
        {"type": "message", "content": "lone \ud800 surrogate"},
        {"type": "typing", "is_typing": "yes"},
        {"type": "typing"},
        {"type": "heartbeat", "client_timestamp": 12},
        {"type": "auth"},
    ],
)
async def test_invalid_frames_get_parse_errors_and_the_socket_stays_open(clients, payload):
    alice = await clients.join("lobby", "alice")
    await alice.send(payload)
    error = await alice.expect_error("MESSAGE_PARSE_ERROR")
    assert error["message"] == "Failed to parse message"
    assert isinstance(error["details"]["errors"], list) and error["details"]["errors"]
    await alice.send({"type": "message", "content": "still here"})
    assert (await alice.recv())["content"] == "still here"


@pytest.mark.parametrize(
    ("payload", "shown"),
    [
        ({"content": "no type"}, "None"),
        ({"type": "subscribe"}, "subscribe"),
        ({"type": 7}, "7"),
        ({"type": "connection_ack"}, "connection_ack"),
        ({"type": "user_joined"}, "user_joined"),
    ],
)
async def test_unknown_message_types(clients, payload, shown):
    alice = await clients.join("lobby", "alice")
    await alice.send(payload)
    error = await alice.expect_error("UNKNOWN_MESSAGE_TYPE")
    assert error["message"] == f"Unknown message type: {shown}"


async def test_user_id_spoofing_is_refused(clients):
    alice = await clients.join("lobby", "alice")
    bob = await clients.join("lobby", "bob")
    await alice.recv_type("user_joined")
    await bob.send({"type": "message", "content": "I am alice", "user_id": "alice"})
    await bob.expect_error("USER_ID_MISMATCH")
    await bob.send({"type": "typing", "is_typing": True, "user_id": "alice"})
    await bob.expect_error("USER_ID_MISMATCH")
    await alice.expect_nothing_pending()
    assert await database_sync_to_async(ChatMessage.objects.count)() == 0


async def test_rate_limit_per_user_across_sockets(clients, settings):
    settings.CHAT_MESSAGE_RATE_LIMIT = 4
    first = await clients.join("lobby", "alice")
    second = await clients.join("other", "alice")
    for client in (first, second, first, second):
        await client.send({"type": "typing", "is_typing": False})
        assert (await client.recv())["type"] == "typing"
    await first.send({"type": "typing", "is_typing": False})
    error = await first.expect_error("RATE_LIMIT_EXCEEDED")
    assert error["message"] == "Too many messages, please slow down"
    assert isinstance(error["details"]["retry_after"], int)
    # The rolling window is estimated from two fixed windows, which with a tiny limit can
    # hold a client back for up to window * (1 + 1/limit) (tests/test_ratelimit.py).
    assert 1 <= error["details"]["retry_after"] <= 60 * (1 + 1 / 4)
    # one heartbeat a second per socket is exempt
    await second.send({"type": "heartbeat"})
    assert (await second.recv())["type"] == "heartbeat_ack"
    # refused frames count too (protocol §16): refused by the limit before being decoded
    await second.send_text("not json")
    await second.expect_error("RATE_LIMIT_EXCEEDED")


async def test_sustained_abuse_closes_4029(clients, settings):
    settings.CHAT_MESSAGE_RATE_LIMIT = 2
    alice = await clients.join("lobby", "alice")
    for _ in range(2):
        await alice.send({"type": "typing", "is_typing": False})
        await alice.recv()
    for _ in range(4):  # limit * 3 = 6 frames in the window is still tolerated
        await alice.send({"type": "typing", "is_typing": False})
        await alice.expect_error("RATE_LIMIT_EXCEEDED")
    await alice.send({"type": "typing", "is_typing": False})
    await alice.expect_refusal("RATE_LIMIT_EXCEEDED", 4029)


async def test_every_error_frame_uses_the_code_table(clients):
    alice = await clients.join("lobby", "alice")
    await alice.send({"type": "nope"})
    error = await alice.recv()
    assert set(error) == {"type", "timestamp", "message_id", "error_code", "message", "details"}
    assert error["error_code"] in set(ErrorCode)
    assert error["message"] == ERROR_MESSAGES[ErrorCode.UNKNOWN_MESSAGE_TYPE].format(type="nope")


# --- the original suite's scenarios, against this consumer -----------------------------------


class TestOriginalSuite:
    async def test_chat_gets_a_broadcast_reply(self, clients):
        user = await clients.join("test-user-123", "test-user-123", "Test User")
        await user.send({"type": "message", "content": "Hello AI", "user_id": "test-user-123"})
        reply = await user.recv_type("message")
        assert reply["content"] == "Hello AI" and reply["user_id"] == "test-user-123"

    async def test_typing_true_and_false_echoed_to_sender(self, clients):
        user = await clients.join("test-user-123", "test-user-123", "Test User")
        for state in (True, False):
            await user.send(
                {
                    "type": "typing",
                    "is_typing": state,
                    "user_id": "test-user-123",
                    "username": "Test User",
                }
            )
            echo = await user.recv()
            assert echo["type"] == "typing"
            assert echo["user_id"] == "test-user-123" and echo["is_typing"] is state

    async def test_heartbeat_gets_heartbeat_ack_with_timestamp(self, clients):
        user = await clients.join("test-user-123", "test-user-123")
        await user.send({"type": "heartbeat", "client_timestamp": "2025-06-04T12:00:00"})
        ack = await user.recv()
        assert ack["type"] == "heartbeat_ack" and "timestamp" in ack

    async def test_non_json_gets_invalid_json(self, clients):
        user = await clients.join("test-user-123", "test-user-123")
        await user.send_text("this is not json")
        error = await user.expect_error("INVALID_JSON")
        assert "Invalid JSON format" in error["message"]

    async def test_no_token_is_refused(self):
        client = await open_socket("test-user-123")
        await client.expect_refusal("AUTH_REQUIRED", 4001)
