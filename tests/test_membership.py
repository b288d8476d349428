"""Rooms and membership on the socket (protocol §11), hostile: the real consumer on the
in-memory layer, rooms and members set up with the ORM.

Deny by default: a socket for a room the user may not join gets `ROOM_FORBIDDEN`, close 4004
and nothing else, the same bytes whether the room exists or not; a removed member's socket
is closed and hears nothing more; a history frame asks the rule again. Identity: the
assistant's uid and name cannot be borrowed, client metadata cannot carry the server's keys
or be unbounded, a display name is fixed for the socket's life. The assistant's defaults by
room kind and its per-user quota. Last, a property: whatever an outsider sends, nothing of a
private room reaches them.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.test import override_settings
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from chat.auth import display_name
from chat.models import ChatMessage, ChatSession, Role, Room, RoomKind, RoomMember
from tests.conftest import NO_BUDGETS, ChatClient, join, open_socket, read_join, token_for

pytestmark = pytest.mark.django_db(transaction=True)

FORBIDDEN = ("ROOM_FORBIDDEN", 4004)
HEALTH_PATH = "/api/v1/ws/health-analysis/{uid}"
SERVER_METADATA_KEYS = ["in_reply_to", "analysis", "stream_id", "edited_at", "deleted_at"]


def room_make(
    name: str, kind: str = RoomKind.PRIVATE, members: dict[str, str] | None = None, **fields
) -> None:
    """A room and its members: {uid: role, or "banned" (a banned member)}."""
    room = Room.objects.create(name=name, kind=kind, **fields)
    for uid, role in (members or {}).items():
        banned = role == "banned"
        RoomMember.objects.create(
            room=room, user_id=uid, role=Role.MEMBER if banned else role, banned=banned
        )


make = database_sync_to_async(room_make)


@database_sync_to_async
def member_of(room_id: str, uid: str) -> RoomMember | None:
    return RoomMember.objects.filter(room_id=room_id, user_id=uid).first()


@database_sync_to_async
def sessions_of(uid: str) -> int:
    return ChatSession.objects.filter(user_id=uid).count()


@database_sync_to_async
def messages_in(room_id: str) -> list[ChatMessage]:
    return list(ChatMessage.objects.filter(room_id=room_id).order_by("id"))


async def refusal(client: ChatClient) -> tuple[str, dict]:
    """The raw error frame of a refused socket and the close right after it, with nothing
    before, between or after (no presence, no history)."""
    sent = await client.communicator.receive_output(2)
    assert sent["type"] == "websocket.send", sent
    closed = await client.communicator.receive_output(2)
    assert closed["type"] == "websocket.close", closed
    await client.close_and_expect_nothing_more()
    return sent["text"], closed


async def expect_forbidden(client: ChatClient) -> tuple[str, dict]:
    text, closed = await refusal(client)
    assert json.loads(text)["error_code"] == FORBIDDEN[0], text
    assert closed["code"] == FORBIDDEN[1], closed
    return text, closed


def untimed(text: str) -> str:
    """An error frame's bytes without its timestamp."""
    return text.replace(json.loads(text)["timestamp"], "")


# --- joining: who gets in ---------------------------------------------------------------------

ACTORS = {
    "non-member": None,
    "member": Role.MEMBER,
    "moderator": Role.MODERATOR,
    "owner": Role.OWNER,
    "banned": "banned",
}
LET_IN = {
    RoomKind.PUBLIC: {"non-member", "member", "moderator", "owner"},
    RoomKind.PRIVATE: {"member", "moderator", "owner"},
    RoomKind.DIRECT: {"member", "moderator", "owner"},
    RoomKind.PERSONAL: set(),  # never over the chat path, not even its own user
}


@pytest.mark.parametrize("actor", list(ACTORS))
@pytest.mark.parametrize("kind", list(LET_IN))
async def test_join_matrix(clients, kind, actor):
    room = "health_analysis_zed" if kind == RoomKind.PERSONAL else f"room-{kind}"
    role = ACTORS[actor]
    await make(room, kind, {"zed": role} if role else {})
    client = await clients.open(room, token=token_for("zed"))
    if actor in LET_IN[kind]:
        await read_join(client)
        assert client.ack["server_info"]["room_id"] == room
        assert [u["user_id"] for u in client.presence["users"]] == ["zed"]
        assert client.history["room_id"] == room
    else:
        await expect_forbidden(client)
        assert await sessions_of("zed") == 0


async def test_joining_a_public_room_makes_a_member(clients):
    await make("plaza", RoomKind.PUBLIC)
    assert await member_of("plaza", "zed") is None
    await clients.join("plaza", "zed", public_room=False)
    member = await member_of("plaza", "zed")
    assert member is not None and member.role == Role.MEMBER and not member.banned


@pytest.mark.parametrize(
    ("room", "kind", "members"),
    [
        ("vault", RoomKind.PRIVATE, {"owen": Role.OWNER}),
        ("pair", RoomKind.DIRECT, {"owen": Role.MEMBER, "mia": Role.MEMBER}),
        ("plaza", RoomKind.PUBLIC, {"eve": "banned"}),
        ("health_analysis_owen", RoomKind.PERSONAL, {"owen": Role.OWNER}),
    ],
)
@pytest.mark.parametrize("prefix", ["/api/v1/ws/", "/api/v1/chat/"])
async def test_a_forbidden_room_answers_exactly_like_a_missing_one(
    clients, room, kind, members, prefix
):
    await make(room, kind, members)
    eve = token_for("eve")
    missing_text, missing_close = await expect_forbidden(
        await clients.open(path=f"{prefix}no-such-room", token=eve)
    )
    text, closed = await expect_forbidden(await clients.open(path=f"{prefix}{room}", token=eve))
    assert untimed(text) == untimed(missing_text)
    assert (
        closed
        == missing_close
        == {"type": "websocket.close", "code": 4004, "reason": "Room not found"}
    )
    for room_id in (room, "no-such-room"):  # the refusal names no room
        assert room_id not in text and room_id not in missing_text
        assert room_id not in json.dumps(closed)


async def test_a_refused_join_leaves_no_trace_and_tells_nobody(clients):
    await make("vault", RoomKind.PRIVATE, {"mia": Role.MEMBER})
    mia = await clients.join("vault", "mia", public_room=False)
    eve = await clients.open("vault", token=token_for("eve"))
    await expect_forbidden(eve)
    await mia.expect_nothing_pending()  # no system notice, no user_joined
    assert await sessions_of("eve") == 0
    assert await member_of("vault", "eve") is None
    watcher = await clients.join("vault", "mia", public_room=False)
    assert [u["user_id"] for u in watcher.presence["users"]] == ["mia"]


# --- refusal order: INVALID_ROOM, ROOM_FORBIDDEN, ROOM_CLOSED, TOO_MANY_CONNECTIONS, ROOM_FULL


@pytest.mark.parametrize("open_rooms", [False, True])
@pytest.mark.parametrize("room", ["bad room", "x" * 65, "colon:x", "é"])
async def test_an_invalid_id_is_invalid_room_even_though_no_such_room_exists(
    clients, settings, room, open_rooms
):
    settings.CHAT_OPEN_ROOMS = open_rooms
    client = await clients.open(path=f"/api/v1/ws/{room}", token=token_for("eve"))
    text, closed = await refusal(client)
    assert json.loads(text)["error_code"] == "INVALID_ROOM"
    assert closed["code"] == 4004


@pytest.mark.parametrize(
    ("kind", "uid", "expected"),
    [
        (RoomKind.PRIVATE, "eve", "ROOM_FORBIDDEN"),  # a closed room is not revealed
        (RoomKind.PRIVATE, "mia", "ROOM_CLOSED"),
        (RoomKind.PUBLIC, "eve", "ROOM_CLOSED"),  # anyone may know a public room
        (RoomKind.PUBLIC, "ban", "ROOM_FORBIDDEN"),
    ],
)
async def test_closed_room(clients, kind, uid, expected):
    await make("shut", kind, {"mia": Role.MEMBER, "ban": "banned"}, is_closed=True)
    text, closed = await refusal(await clients.open("shut", token=token_for(uid)))
    assert json.loads(text)["error_code"] == expected
    assert closed["code"] == 4004
    if uid == "eve":  # a refused join into a public room leaves no membership behind
        assert await member_of("shut", "eve") is None


@pytest.mark.parametrize(
    ("kind", "uid", "expected"),
    [
        (RoomKind.PRIVATE, "eve", "ROOM_FORBIDDEN"),  # a full room is not revealed
        (RoomKind.PRIVATE, "mia", "ROOM_FULL"),
        (RoomKind.PUBLIC, "eve", "ROOM_FULL"),
        (RoomKind.PUBLIC, "ban", "ROOM_FORBIDDEN"),
    ],
)
async def test_full_room(clients, kind, uid, expected):
    await make(
        "small", kind, {"owen": Role.OWNER, "mia": Role.MEMBER, "ban": "banned"}, max_users=1
    )
    await clients.join("small", "owen", public_room=False)
    text, closed = await refusal(await clients.open("small", token=token_for(uid)))
    assert json.loads(text)["error_code"] == expected
    assert closed["code"] == 4004
    if uid == "eve":
        assert await member_of("small", "eve") is None


@pytest.mark.parametrize(
    ("room", "expected", "close"),
    [
        ("vault", "ROOM_FORBIDDEN", 4004),  # before the socket cap: says nothing of the room
        ("shut", "ROOM_CLOSED", 4004),  # closed before the cap
        ("small", "TOO_MANY_CONNECTIONS", 4008),  # the cap before full
    ],
)
async def test_refusal_order_around_the_socket_cap(clients, room, expected, close):
    await make("vault", RoomKind.PRIVATE, {"owen": Role.OWNER})
    await make("shut", RoomKind.PRIVATE, {"mia": Role.MEMBER}, is_closed=True)
    await make("small", RoomKind.PRIVATE, {"owen": Role.OWNER, "mia": Role.MEMBER}, max_users=1)
    await clients.join("small", "owen", public_room=False)
    for other in ("one", "two", "three"):
        await clients.join(other, "mia")
    text, closed = await refusal(await clients.open(room, token=token_for("mia")))
    assert json.loads(text)["error_code"] == expected
    assert closed["code"] == close


# --- personal rooms ---------------------------------------------------------------------------


async def health_socket(clients, uid: str) -> ChatClient:
    client = await clients.open(path=HEALTH_PATH.format(uid=uid), token=token_for(uid))
    ack = await client.recv()
    assert ack["type"] == "connection_ack", ack
    welcome = await client.recv()
    assert welcome["type"] == "system", welcome
    return client


async def test_personal_rooms_are_never_chat_rooms(clients):
    # Before it exists, and once the health-analysis socket has made it.
    await expect_forbidden(await clients.open("health_analysis_alice", token=token_for("alice")))
    await health_socket(clients, "alice")
    room = await database_sync_to_async(Room.objects.get)(pk="health_analysis_alice")
    assert room.kind == RoomKind.PERSONAL
    owner = await member_of("health_analysis_alice", "alice")
    assert owner is not None and owner.role == Role.OWNER and not owner.banned
    await expect_forbidden(await clients.open("health_analysis_alice", token=token_for("alice")))
    await expect_forbidden(await clients.open("health_analysis_alice", token=token_for("bob")))
    await expect_forbidden(await clients.open("health_analysis_bob", token=token_for("alice")))
    assert await sessions_of("bob") == 0


async def test_own_health_socket_works_again_and_others_stay_out(clients):
    first = await health_socket(clients, "alice")
    await first.close()
    await health_socket(clients, "alice")  # the room exists now; the owner row lets her in
    bob = await clients.open(path=HEALTH_PATH.format(uid="alice"), token=token_for("bob"))
    text, closed = await refusal(bob)
    assert json.loads(text)["error_code"] == "USER_ID_MISMATCH" and closed["code"] == 4003
    assert await member_of("health_analysis_alice", "bob") is None


async def test_open_rooms_open_no_private_room_and_lift_no_ban(clients, settings):
    settings.CHAT_OPEN_ROOMS = True
    await make("vault", RoomKind.PRIVATE, {"owen": Role.OWNER})
    await make("plaza", RoomKind.PUBLIC, {"eve": "banned"})
    for room in ("vault", "plaza"):
        await expect_forbidden(await clients.open(room, token=token_for("eve")))
    vault = await database_sync_to_async(Room.objects.get)(pk="vault")
    assert vault.kind == RoomKind.PRIVATE
    assert await member_of("vault", "eve") is None
    assert (await member_of("plaza", "eve")).banned


async def test_open_rooms_never_make_a_personal_room_public(clients, settings):
    settings.CHAT_OPEN_ROOMS = True
    await clients.join("anything-goes", "alice", public_room=False)  # v1: made on first join
    made = await database_sync_to_async(Room.objects.get)(pk="anything-goes")
    assert made.kind == RoomKind.PUBLIC
    for room in ("health_analysis_alice", "health_analysis_bob", "health_analysis_"):
        await expect_forbidden(await clients.open(room, token=token_for("alice")))
    names = await database_sync_to_async(list)(
        Room.objects.filter(name__startswith="health_analysis_").values_list("name", flat=True)
    )
    assert names == []
    await health_socket(clients, "alice")
    room = await database_sync_to_async(Room.objects.get)(pk="health_analysis_alice")
    assert room.kind == RoomKind.PERSONAL
    await expect_forbidden(await clients.open("health_analysis_alice", token=token_for("alice")))


# --- revocation -------------------------------------------------------------------------------


@database_sync_to_async
def membership_end(room_id: str, uid: str, how: str) -> None:
    if how == "removed":
        RoomMember.objects.filter(room_id=room_id, user_id=uid).delete()
    else:
        RoomMember.objects.filter(room_id=room_id, user_id=uid).update(banned=True)


async def revoke(client: ChatClient, room_id: str) -> None:
    """What the membership service does: `room.revoke` to the session's own channel."""
    await get_channel_layer().send(
        await client.channel_name(), {"type": "room.revoke", "room_id": room_id}
    )


@pytest.mark.parametrize("how", ["removed", "banned"])
async def test_a_revoked_socket_is_closed_and_hears_nothing_more(clients, how):
    await make("vault", RoomKind.PRIVATE, {"owen": Role.OWNER, "mia": Role.MEMBER})
    owen = await clients.join("vault", "owen", public_room=False)
    mia = await clients.join("vault", "mia", public_room=False)
    await owen.recv_type("user_joined")
    await membership_end("vault", "mia", how)
    await revoke(mia, "vault")

    error = await mia.recv()
    assert error["type"] == "error" and error["error_code"] == "ROOM_FORBIDDEN", error
    closed = await mia.communicator.receive_output(2)
    assert closed == {"type": "websocket.close", "code": 4004, "reason": "Room not found"}
    # Until the client completes the close, the room keeps talking: none of it reaches her.
    await owen.send({"type": "message", "content": "after she left"})
    assert (await owen.recv_type("message"))["content"] == "after she left"
    await owen.send({"type": "typing", "is_typing": True})
    await owen.recv_type("typing")
    await mia.close_and_expect_nothing_more()

    await expect_forbidden(await clients.open("vault", token=token_for("mia")))
    session = await database_sync_to_async(ChatSession.objects.get)(
        session_id=mia.ack["session_id"]
    )
    assert session.disconnected_at is not None
    assert (session.close_code, session.close_reason) == (4004, "room_forbidden")


async def test_a_revoke_for_another_room_is_ignored(clients):
    await make("vault", RoomKind.PRIVATE, {"mia": Role.MEMBER})
    mia = await clients.join("vault", "mia", public_room=False)
    await revoke(mia, "elsewhere")
    await mia.expect_nothing_pending()  # the socket stays open, told nothing


@pytest.mark.parametrize("how", ["removed", "banned"])
async def test_history_after_removal_is_refused_before_any_revoke(clients, how):
    await make("vault", RoomKind.PRIVATE, {"owen": Role.OWNER, "mia": Role.MEMBER})
    owen = await clients.join("vault", "owen", public_room=False)
    await owen.send({"type": "message", "content": "kept from mia"})
    await owen.recv_type("message")
    mia = await clients.join("vault", "mia", public_room=False)
    await membership_end("vault", "mia", how)

    await mia.send({"type": "history", "limit": 100, "request_id": "r1"})
    text, closed = await expect_forbidden(mia)
    assert "kept from mia" not in text
    assert closed["code"] == 4004


async def test_history_is_always_the_sockets_own_room(clients):
    await make("room-a", RoomKind.PRIVATE, {"alice": Role.OWNER})
    await make("room-b", RoomKind.PRIVATE, {"bob": Role.OWNER})
    bob = await clients.join("room-b", "bob", public_room=False)
    for n in range(3):
        await bob.send({"type": "message", "content": f"b-secret-{n}"})
        await bob.recv_type("message")
    alice = await clients.join("room-a", "alice", public_room=False)
    await alice.send({"type": "message", "content": "a-own"})
    await alice.recv_type("message")
    b_ids = [int(m.pk) for m in await messages_in("room-b")]

    requests = [
        {"limit": 100},
        {"after": 1, "limit": 100},
        {"after": min(b_ids) - 1 or 1, "limit": 100},
        {"before": max(b_ids) + 1, "limit": 100},
        {"before": max(b_ids) + 100, "limit": 100},
        {"after": b_ids[0], "limit": 1, "room_id": "room-b"},  # unknown keys are ignored
    ]
    for request in requests:
        await alice.send({"type": "history", **request})
        page = await alice.recv()
        assert page["type"] == "history" and page["room_id"] == "room-a", page
        assert all(m["room_id"] == "room-a" for m in page["messages"]), page
        assert "b-secret" not in json.dumps(page)


# --- identity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/v1/ws/plaza", HEALTH_PATH.format(uid="AI")])
async def test_the_assistants_uid_is_refused(clients, path):
    await make("plaza", RoomKind.PUBLIC)
    text, closed = await refusal(await clients.open(path=path, token=token_for("AI")))
    assert json.loads(text)["error_code"] == "AUTH_INVALID"
    assert closed["code"] == 4003
    assert await sessions_of("AI") == 0


def shown_as_someone_else(username: str, name: str) -> bool:
    """A user named like the assistant is shown with a suffix, never as `AI`."""
    return (
        username.casefold() != "ai"
        and username.startswith(name.strip())
        and username != name.strip()
    )


@pytest.mark.parametrize("name", ["AI", "ai", " Ai ", "aI"])
async def test_a_user_named_like_the_assistant_is_shown_with_a_suffix(clients, name):
    await make("plaza", RoomKind.PUBLIC)
    wes = await clients.join("plaza", "wes", public_room=False)
    imp = await clients.join("plaza", "imp", name, public_room=False)
    [me] = [u for u in imp.presence["users"] if u["user_id"] == "imp"]
    shown = me["username"]
    assert shown_as_someone_else(shown, name), shown

    notice = await wes.recv_type("system")
    assert notice["content"] == f"{shown} joined the chat"
    assert (await wes.recv_type("user_joined"))["username"] == shown
    await imp.send({"type": "message", "content": "I am the assistant"})
    for client in (imp, wes):
        assert (await client.recv_type("message"))["username"] == shown
    await imp.send({"type": "typing", "is_typing": True})
    assert (await wes.recv_type("typing"))["username"] == shown

    late = await clients.join("plaza", "late", public_room=False)
    [entry] = [u for u in late.presence["users"] if u["user_id"] == "imp"]
    assert entry["username"] == shown
    assert [m["username"] for m in late.history["messages"]] == [shown]


@pytest.mark.parametrize("key", SERVER_METADATA_KEYS)
async def test_server_metadata_keys_are_refused(clients, key):
    await make("plaza", RoomKind.PUBLIC)
    wes = await clients.join("plaza", "wes", public_room=False)
    imp = await clients.join("plaza", "imp", public_room=False)
    await wes.recv_type("user_joined")
    for metadata in ({key: "1"}, {"ok": True, key: {"nested": 1}}):
        await imp.send({"type": "message", "content": "forged", "metadata": metadata})
        error = await imp.expect_error("MESSAGE_PARSE_ERROR")
        assert error["details"]["errors"], error
    await imp.expect_nothing_pending()
    await wes.expect_nothing_pending()
    assert await messages_in("plaza") == []


def metadata_of_size(size: int) -> dict:
    """Metadata whose encoding (compact JSON, as the server writes it) is `size` bytes."""
    metadata = {"k": "x" * (size - len('{"k":""}'))}
    assert len(json.dumps(metadata, separators=(",", ":")).encode()) == size
    return metadata


def nested(depth: int, container: str) -> dict:
    """Metadata `depth` levels deep, the metadata object itself being the first."""
    value: Any = 1
    for _ in range(depth - 1):
        value = {"a": value} if container == "dict" else [value]
    return {"a": value}


@pytest.mark.parametrize(
    ("metadata", "accepted"),
    [
        pytest.param(metadata_of_size(4096), True, id="4096-bytes"),
        pytest.param(metadata_of_size(4097), False, id="4097-bytes"),
        pytest.param(nested(8, "dict"), True, id="8-deep-dicts"),
        pytest.param(nested(9, "dict"), False, id="9-deep-dicts"),
        pytest.param(nested(8, "list"), True, id="8-deep-lists"),
        pytest.param(nested(9, "list"), False, id="9-deep-lists"),
    ],
)
async def test_metadata_bounds(clients, metadata, accepted):
    await make("plaza", RoomKind.PUBLIC)
    wes = await clients.join("plaza", "wes", public_room=False)
    imp = await clients.join("plaza", "imp", public_room=False)
    await wes.recv_type("user_joined")
    await imp.send({"type": "message", "content": "meta", "metadata": metadata})
    if accepted:
        for client in (imp, wes):
            assert (await client.recv_type("message"))["metadata"] == metadata
        [stored] = await messages_in("plaza")
        assert stored.metadata == metadata
    else:
        error = await imp.expect_error("MESSAGE_PARSE_ERROR")
        assert error["details"]["errors"], error
        await wes.expect_nothing_pending()
        assert await messages_in("plaza") == []


async def test_the_display_name_is_fixed_for_the_sockets_life(clients):
    await make("plaza", RoomKind.PUBLIC)
    wes = await clients.join("plaza", "wes", public_room=False)
    alice = await clients.join("plaza", "alice", "Alice", public_room=False)
    await wes.recv_type("user_joined")
    for renamed in ("Mallory", "AI"):
        await alice.send({"type": "auth", "token": token_for("alice", renamed)})
        await alice.recv_type("auth_ack")
        await alice.send({"type": "message", "content": f"still me after {renamed}"})
        for client in (alice, wes):
            frame = await client.recv_type("message")
            assert frame["username"] == "Alice", frame
        await alice.send({"type": "typing", "is_typing": False})
        assert (await wes.recv_type("typing"))["username"] == "Alice"
    assert {m.username for m in await messages_in("plaza")} == {"Alice"}


# --- the assistant's defaults -----------------------------------------------------------------


async def say(client: ChatClient, content: str) -> dict:
    await client.send({"type": "message", "content": content})
    frame = await client.recv_type("message")
    assert frame["content"] == content and frame["user_id"] != "AI", frame
    return frame


async def reply_to(client: ChatClient, question: dict) -> dict:
    reply = await client.recv_type("message", timeout=5)
    assert reply["user_id"] == "AI", reply
    assert reply["metadata"]["in_reply_to"] == question["message_id"], reply
    return reply


async def test_by_default_a_public_room_answers_every_message(clients, settings):
    settings.ASSISTANT_MODE = ""
    await make("plaza", RoomKind.PUBLIC)
    alice = await clients.join("plaza", "alice", public_room=False)
    question = await say(alice, "how do I sleep better")
    await reply_to(alice, question)


@pytest.mark.parametrize("kind", [RoomKind.PRIVATE, RoomKind.DIRECT])
async def test_by_default_a_private_room_answers_only_mentions(clients, settings, kind):
    settings.ASSISTANT_MODE = ""
    settings.ASSISTANT_MAX_CONCURRENCY = 1  # replies one at a time, in the order asked
    await make("quiet", kind, {"alice": Role.MEMBER, "bob": Role.MEMBER})
    alice = await clients.join("quiet", "alice", public_room=False)
    await say(alice, "just between us")
    question = await say(alice, "@ai and now a question")
    await reply_to(alice, question)  # the first reply is to the mention
    await alice.expect_nothing_pending()  # and the only one
    replies = [m for m in await messages_in("quiet") if m.user_id == "AI"]
    assert [r.metadata["in_reply_to"] for r in replies] == [question["message_id"]]


async def test_the_assistant_quota_is_per_user(clients, settings):
    settings.ASSISTANT_MODE = ""
    settings.ASSISTANT_USER_RATE_LIMIT = 2
    settings.ASSISTANT_MAX_CONCURRENCY = 1  # replies one at a time, in the order asked
    await make("plaza", RoomKind.PUBLIC)
    bob = await clients.join("plaza", "bob", public_room=False)
    alice = await clients.join("plaza", "alice", public_room=False)
    await bob.recv_type("user_joined")
    for n in (1, 2):
        question = await say(alice, f"@ai question {n}")
        await reply_to(alice, question)
        assert (await bob.recv_type("message"))["message_id"] == question["message_id"]
        await reply_to(bob, question)
    await alice.send({"type": "message", "content": "@ai question 3"})
    frames = [await alice.recv(), await alice.recv()]
    [error] = [f for f in frames if f["type"] == "error"]
    [echo] = [f for f in frames if f["type"] == "message"]
    assert echo["content"] == "@ai question 3"
    assert error["error_code"] == "RATE_LIMIT_EXCEEDED"
    assert error["details"]["scope"] == "assistant" and error["details"]["retry_after"] > 0
    third = await bob.recv_type("message")  # stored and broadcast all the same
    assert third["message_id"] == echo["message_id"]

    await alice.expect_nothing_pending()  # the socket stays open
    question = await say(bob, "@ai my own quota")  # another user's quota is untouched
    await reply_to(bob, question)
    # No reply to the third: it would have come before this one.
    assert (await alice.recv_type("message"))["message_id"] == question["message_id"]
    await reply_to(alice, question)
    await alice.expect_nothing_pending()

    stored = await messages_in("plaza")
    answered = {m.metadata["in_reply_to"] for m in stored if m.user_id == "AI"}
    assert echo["message_id"] not in answered and len(answered) == 3
    assert any(m.content == "@ai question 3" for m in stored)


# --- property: nothing of a private room reaches an outsider ----------------------------------

# Everything secret contains capitals and digits; what the attacker sends cannot (so no frame
# of theirs can echo a secret back).
VAULT = "Vault9Priv_X"
SECRET = "Zq7SecretMarker"
INSIDERS = {"Mia7Uid": "Mia Q8 Hidden", "Own3rUid": "Owen K4 Hidden"}
SECRETS = [VAULT, SECRET, *INSIDERS, *INSIDERS.values()]
HARMLESS = 'abcdefghijklmnop @{}[]":,'

attacker_frames = st.one_of(
    st.tuples(st.just("message"), st.text(alphabet="abcdefg @", min_size=1, max_size=20)),
    st.tuples(st.just("typing"), st.booleans()),
    st.tuples(
        st.just("history"),
        st.sampled_from([None, "before", "after"]),
        st.integers(min_value=-3, max_value=3),  # around the private room's last message
        st.one_of(st.none(), st.integers(min_value=1, max_value=100)),
    ),
    st.tuples(st.just("heartbeat")),
    st.tuples(st.just("auth")),
    st.tuples(st.just("garbage"), st.text(alphabet=HARMLESS, max_size=30)),
    st.tuples(st.just("speak")),  # an insider posts a secret meanwhile
    st.tuples(st.just("knock")),  # the outsider tries the private room again
)


def attacker_payload(action: tuple, *, last_secret_id: int, token: str) -> str | None:
    kind = action[0]
    if kind == "message":
        return json.dumps({"type": "message", "content": action[1]})
    if kind == "typing":
        return json.dumps({"type": "typing", "is_typing": action[1]})
    if kind == "history":
        _, direction, offset, limit = action
        payload: dict[str, Any] = {"type": "history"}
        if direction is not None:
            payload[direction] = max(1, last_secret_id + offset)
        if limit is not None:
            payload["limit"] = limit
        return json.dumps(payload)
    if kind == "heartbeat":
        return json.dumps({"type": "heartbeat"})
    if kind == "auth":
        return json.dumps({"type": "auth", "token": token})
    if kind == "garbage":
        return action[1]
    return None


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, (secret, text)


def vault_ready() -> None:
    """The private room and the attacker's own (idempotent: examples share the database)."""
    if not Room.objects.filter(pk=VAULT).exists():
        room_make(VAULT, RoomKind.PRIVATE, {"Own3rUid": Role.OWNER, "Mia7Uid": Role.MEMBER})
        room_make("den", RoomKind.PRIVATE, {"eve": Role.OWNER})


async def knock() -> None:
    """An outsider's socket to the private room: refused, naming nothing."""
    outsider = await open_socket(VAULT, token=token_for("eve"))
    text, closed = await expect_forbidden(outsider)
    assert_no_secret(text)
    assert_no_secret(json.dumps(closed))


async def siege(actions: list[tuple]) -> None:
    await database_sync_to_async(vault_ready)()
    owner = await join(VAULT, "Own3rUid", INSIDERS["Own3rUid"], public_room=False)
    mia = await join(VAULT, "Mia7Uid", INSIDERS["Mia7Uid"], public_room=False)
    await owner.recv_type("user_joined")
    # One outsider refused at the door and left hanging (the server closed, the client has
    # not), one member of another room; both send everything.
    eve_token = token_for("eve")
    outsider = await open_socket(VAULT, token=eve_token)
    error = await outsider.recv()
    assert error["error_code"] == "ROOM_FORBIDDEN"
    assert_no_secret(json.dumps(error))
    assert (await outsider.communicator.receive_output(2))["code"] == 4004
    neighbour = await join("den", "eve", "Eve", public_room=False)
    received = [neighbour.ack, neighbour.presence, neighbour.history]
    said = 0
    last_secret_id = max([m.pk for m in await messages_in(VAULT)], default=1)
    try:
        for action in actions:
            if action[0] == "speak":
                said += 1
                await owner.send(
                    {"type": "message", "content": f"{SECRET} {said}", "metadata": {"s": SECRET}}
                )
                secret = await mia.recv_type("message")
                assert secret["content"] == f"{SECRET} {said}"
                last_secret_id = int(secret["message_id"])
                continue
            if action[0] == "knock":
                await knock()
                continue
            text = attacker_payload(action, last_secret_id=last_secret_id, token=eve_token)
            await outsider.send_text(text)
            await neighbour.send_text(text)
        # Everything the neighbour caused is in before the echo of this last message.
        await neighbour.send({"type": "message", "content": "done"})
        while True:
            frame = await neighbour.recv(timeout=5)
            received.append(frame)
            if frame["type"] == "message" and frame["content"] == "done":
                break
        await neighbour.expect_nothing_pending()
        await outsider.close_and_expect_nothing_more()  # a refused socket hears nothing, ever
        for frame in received:
            assert_no_secret(json.dumps(frame))
            if frame["type"] == "history":
                assert frame["room_id"] == "den"
                assert all(m["room_id"] == "den" for m in frame["messages"])
    finally:
        for client in (owner, mia, outsider, neighbour):
            await client.close()


@override_settings(**NO_BUDGETS)
@hypothesis_settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(actions=st.lists(attacker_frames, min_size=5, max_size=25))
def test_nothing_of_a_private_room_reaches_an_outsider(actions):
    async_to_sync(siege)(actions)


@pytest.mark.parametrize(
    "name",
    ["AI", "ai", " Ai ", "A I", "\uff21\uff29", "AI\u200b", "\u200bAI", "A\u2060I", "\u0391\u0399"],
)
def test_look_alikes_of_the_assistants_name_get_the_suffix(name):
    shown = display_name({"name": name}, "u-1")
    assert shown.endswith(" (user)") and shown != "AI"


@pytest.mark.parametrize("name", ["Aida", "Kai", "AIden", "Mai", "A.I. Smith"])
def test_names_that_merely_contain_the_assistants_name_are_kept(name):
    assert display_name({"name": name}, "u-1") == name
