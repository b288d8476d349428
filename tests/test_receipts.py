"""Read positions and receipts (protocol §12, `read`), and the rooms list's unread counts:
the store (chat.receipts) on the database, the frames on the real consumer and in-memory
layer, and what a hostile client would try (marking unsent messages read, reading a room it
left, flooding `read` frames, dressing other frames up as `read`s)."""

from __future__ import annotations

import pytest
from channels.db import database_sync_to_async
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from chat import membership
from chat.access import Refused
from chat.membership import room_create, room_create_private, rooms_of_user
from chat.models import ChatMessage, RoomKind, RoomMember
from chat.receipts import ReadMark, ReadMarked, reads_mark
from tests.conftest import NO_BUDGETS, frames_until_close, stored_message, token_for

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _generous(settings):
    for name, value in NO_BUDGETS.items():
        setattr(settings, name, value)


def store(room_id: str, user_id: str, content: str = "hi") -> dict:
    return stored_message(room_id, user_id, content)


def private_room(owner: str, *members: str) -> str:
    return room_create_private(user_id=owner, name="Care team", members=list(members))["room_id"]


def position(room_id: str, user_id: str) -> int | None:
    return RoomMember.objects.get(room_id=room_id, user_id=user_id).last_read_seq


# --- the store --------------------------------------------------------------------------------


def test_a_read_position_never_moves_back_and_never_passes_the_room(db):
    room = private_room("alice", "bob")
    for n in range(3):
        store(room, "alice", f"m{n}")
    mark = ReadMark(user_id="bob", room_id=room, seq=2)
    assert reads_mark(marks=[mark]) == [ReadMarked(seq=2, advanced=True)]
    assert reads_mark(marks=[ReadMark(user_id="bob", room_id=room, seq=1)]) == [
        ReadMarked(seq=2, advanced=False)
    ]
    assert reads_mark(marks=[mark]) == [ReadMarked(seq=2, advanced=False)]
    # A client cannot mark as read what has not been sent yet: the room's last seq at most.
    assert reads_mark(marks=[ReadMark(user_id="bob", room_id=room, seq=2**63 - 1)]) == [
        ReadMarked(seq=3, advanced=True)
    ]
    assert position(room, "bob") == 3
    store(room, "alice", "later")  # seq 4: unread, whatever bob claimed before
    assert rooms_of_user(user_id="bob")[0]["unread_count"] == 1


def test_a_batch_stores_each_members_highest_mark_and_reports_it_once(db):
    room = private_room("alice", "bob")
    for n in range(5):
        store(room, "alice", f"m{n}")
    outcomes = reads_mark(
        marks=[
            ReadMark(user_id="bob", room_id=room, seq=4),
            ReadMark(user_id="alice", room_id=room, seq=1),
            ReadMark(user_id="bob", room_id=room, seq=2),  # another socket, behind
        ]
    )
    assert outcomes == [
        ReadMarked(seq=4, advanced=False),
        ReadMarked(seq=1, advanced=True),
        ReadMarked(seq=4, advanced=True),  # the member's last mark of the batch tells it
    ]
    assert (position(room, "bob"), position(room, "alice")) == (4, 1)


def test_a_mark_for_a_room_the_user_may_not_read_is_refused_and_stores_nothing(db):
    room = private_room("alice", "bob")
    store(room, "alice")
    outsider, missing, mine = reads_mark(
        marks=[
            ReadMark(user_id="mallory", room_id=room, seq=1),
            ReadMark(user_id="mallory", room_id="no-such-room", seq=1),
            ReadMark(user_id="bob", room_id=room, seq=1),
        ]
    )
    assert isinstance(outsider, Refused) and isinstance(missing, Refused)
    assert outsider.code == missing.code == "ROOM_FORBIDDEN"  # the same: nothing revealed
    assert mine == ReadMarked(seq=1, advanced=True)
    assert not RoomMember.objects.filter(user_id="mallory").exists()


# --- the rooms list ---------------------------------------------------------------------------


def test_unread_counts_skip_own_and_deleted_messages_and_follow_the_read_position(db):
    room = private_room("alice", "bob")
    store(room, "alice", "one")
    store(room, "bob", "mine")  # never unread for bob
    gone = store(room, "alice", "withdrawn")
    store(room, "alice", "three")
    ChatMessage.objects.filter(pk=gone["message_id"]).update(deleted_at=timezone.now())
    (entry,) = rooms_of_user(user_id="bob")
    assert (entry["unread_count"], entry["last_read_seq"]) == (2, None)
    reads_mark(marks=[ReadMark(user_id="bob", room_id=room, seq=1)])
    (entry,) = rooms_of_user(user_id="bob")
    assert (entry["unread_count"], entry["last_read_seq"]) == (1, 1)
    assert rooms_of_user(user_id="alice")[0]["unread_count"] == 1  # bob's one message


def test_unread_counts_are_capped(db, monkeypatch):
    monkeypatch.setattr(membership, "UNREAD_COUNT_MAX", 3)
    room = private_room("alice", "bob")
    for n in range(5):
        store(room, "alice", f"m{n}")
    assert rooms_of_user(user_id="bob")[0]["unread_count"] == 3


def test_the_rooms_list_takes_the_same_queries_for_one_room_or_many(db):
    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            rooms_of_user(user_id="bob")
        return len(captured)

    first = private_room("alice", "bob")
    store(first, "alice")
    one = queries()
    for n in range(6):
        room = private_room("alice", "bob")
        store(room, "alice", f"in room {n}")
    room_create(room_id="lobby", kind=RoomKind.PUBLIC)
    assert len(rooms_of_user(user_id="bob")) == 7
    assert queries() == one


# --- the frames -------------------------------------------------------------------------------


async def test_a_read_in_a_private_room_is_told_to_the_room(clients):
    room = await database_sync_to_async(private_room)("alice", "bob")
    alice = await clients.join(room, "alice", public_room=False)
    bob = await clients.join(room, "bob", public_room=False)
    await alice.recv_type("user_joined")
    for n in range(3):
        await alice.send({"type": "message", "content": f"m{n}"})
        await alice.recv_type("message")
        await bob.recv_type("message")
    await bob.send({"type": "read", "seq": 2})
    receipt = await alice.recv_type("read")
    assert receipt | {"timestamp": None} == {
        "type": "read",
        "room_id": room,
        "user_id": "bob",
        "seq": 2,
        "timestamp": None,
        "message_id": None,
    }
    assert (await bob.recv_type("read"))["seq"] == 2  # their own sockets too
    await bob.send({"type": "read", "seq": 1})  # behind: stored position unchanged, no receipt
    await bob.expect_nothing_pending()
    await alice.expect_nothing_pending()
    assert await database_sync_to_async(position)(room, "bob") == 2


async def test_a_read_in_a_public_room_is_told_only_to_the_readers_own_sockets(clients):
    alice = await clients.join("lobby", "alice")
    bob = await clients.join("lobby", "bob")
    bob_too = await clients.join("lobby", "bob")
    await alice.recv_type("user_joined")
    await alice.send({"type": "message", "content": "hello"})
    for client in (alice, bob, bob_too):
        await client.recv_type("message")
    await bob.send({"type": "read", "seq": 1})
    assert (await bob.recv_type("read"))["user_id"] == "bob"
    assert (await bob_too.recv_type("read"))["seq"] == 1
    await alice.expect_nothing_pending()


@pytest.mark.parametrize("seq", ["1", -1, 1.5, None, True])
async def test_a_read_without_a_valid_seq_is_a_parse_error(clients, seq):
    alice = await clients.join("lobby", "alice")
    await alice.send({"type": "read", "seq": seq})
    error = await alice.expect_error("MESSAGE_PARSE_ERROR")
    assert "seq" in str(error["details"])


async def test_reads_do_not_count_toward_the_rate_limit_but_are_bounded(clients, settings):
    """A reader is never refused a message for having reported what it read; a client
    flooding `read` frames is refused from their own allowance, then closed 4029."""
    settings.CHAT_MESSAGE_RATE_LIMIT = 3
    settings.CHAT_READ_RATE_LIMIT = 5
    settings.CHAT_RATE_LIMIT_CLOSE_FACTOR = 3
    alice = await clients.join("lobby", "alice")
    for n in range(5):
        await alice.send({"type": "read", "seq": n})
    await alice.send({"type": "message", "content": "still mine to send"})
    assert (await alice.recv_type("message"))["content"] == "still mine to send"
    await alice.send({"type": "read", "seq": 1})
    # (the receipt of an earlier `read`, stored in the background, may come first)
    error = await alice.recv_type("error")
    assert (error["error_code"], error["details"]["scope"]) == ("RATE_LIMIT_EXCEEDED", "read")
    for _ in range(20):
        await alice.send({"type": "read", "seq": 1})
    frames, code = await frames_until_close(alice)
    assert code == 4029 and {f["type"] for f in frames} <= {"error", "read"}
    assert {f["error_code"] for f in frames if f["type"] == "error"} == {"RATE_LIMIT_EXCEEDED"}


async def test_a_frame_dressed_as_a_read_is_charged_as_a_frame(clients, settings):
    """Naming `"read"` in another frame does not move it onto the read allowance."""
    settings.CHAT_MESSAGE_RATE_LIMIT = 2
    settings.CHAT_READ_RATE_LIMIT = 100
    alice = await clients.join("lobby", "alice")
    for _ in range(2):
        await alice.send({"type": "message", "content": "read"})
        await alice.recv_type("message")
    await alice.send({"type": "message", "content": "read"})
    error = await alice.expect_error("RATE_LIMIT_EXCEEDED")
    assert "scope" not in error["details"]


async def test_the_health_analysis_socket_has_no_read_frame(clients):
    health = await clients.open(path="/api/v1/ws/health-analysis/alice", token=token_for("alice"))
    assert (await health.recv())["type"] == "connection_ack"
    assert (await health.recv())["type"] == "system"  # its greeting
    await health.send({"type": "read", "seq": 1})
    await health.expect_error("UNKNOWN_MESSAGE_TYPE")
