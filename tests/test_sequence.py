"""Sequence numbers and recovery (protocol §15), on the real consumer and in-memory layer.

Every room event takes the next seq of its room with no gaps, whoever sends it; the ack says
where the room is; `history` pages by seq and replays changes; `resync` tells a socket to
catch up after its worker's layer lost Redis (the layer's side is in tests/test_faults.py,
against a real Redis); a message sent twice with one client id is stored once; catch-up reads
have their own allowance, which nothing else can spend.
"""

from __future__ import annotations

import asyncio

import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer

from chat.edits import Editor, message_edit
from chat.history import messages_page
from chat.layers import resubscribed_event
from chat.models import ChatMessage, Room
from chat.sequence import room_last_seq, seqs_take
from tests.conftest import NO_BUDGETS, frames_until_close

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _generous(settings):
    for name, value in NO_BUDGETS.items():
        setattr(settings, name, value)
    settings.CHAT_RESYNC_SPREAD = 0


async def send_and_echo(client, content: str, cid: str | None = None) -> dict:
    payload = {"type": "message", "content": content}
    if cid is not None:
        payload["message_id"] = cid
    await client.send(payload)
    return await client.recv_type("message")


def seqs_of(room_id: str) -> list[int]:
    return list(
        ChatMessage.objects.filter(room_id=room_id).order_by("seq").values_list("seq", flat=True)
    )


# --- every event its seq --------------------------------------------------------------------


async def test_messages_take_the_rooms_next_seq_and_the_ack_says_where_the_room_is(clients):
    alice = await clients.join("lobby", "alice")
    assert alice.ack["server_info"]["last_seq"] == 0
    first = await send_and_echo(alice, "one")
    second = await send_and_echo(alice, "two")
    assert (first["seq"], second["seq"]) == (1, 2)
    assert first["changed_seq"] is None
    bob = await clients.join("lobby", "bob")
    assert bob.ack["server_info"]["last_seq"] == 2
    assert [m["seq"] for m in bob.history["messages"]] == [1, 2]


async def test_concurrent_senders_get_every_seq_once_with_no_gaps(clients):
    """Six sockets of three users fire at once: seqs 1..N, each once, in every view."""
    sockets = [await clients.join("busy", f"user{n % 3}") for n in range(6)]
    await asyncio.gather(
        *(
            s.send({"type": "message", "content": f"{n}-{k}"})
            for n, s in enumerate(sockets)
            for k in range(10)
        )
    )
    seen = []
    for _ in range(60):
        seen.append((await sockets[0].recv_type("message", timeout=5))["seq"])
    assert sorted(seen) == list(range(1, 61))
    assert await database_sync_to_async(seqs_of)("busy") == list(range(1, 61))
    assert await database_sync_to_async(room_last_seq)(room_id="busy") == 60


async def test_rooms_count_apart(clients):
    a = await clients.join("room-a", "alice")
    b = await clients.join("room-b", "alice")
    assert (await send_and_echo(a, "x"))["seq"] == 1
    assert (await send_and_echo(a, "y"))["seq"] == 2
    assert (await send_and_echo(b, "z"))["seq"] == 1


def test_a_transaction_that_rolls_back_gives_its_seqs_back(db):
    from django.db import transaction

    Room.objects.create(name="lobby")
    with pytest.raises(RuntimeError), transaction.atomic():
        assert seqs_take(room_id="lobby", count=5) == 1
        raise RuntimeError("storing failed")
    with transaction.atomic():
        assert seqs_take(room_id="lobby", count=1) == 1


def test_seqs_are_taken_only_inside_a_transaction(db):
    Room.objects.create(name="lobby")
    with pytest.raises(RuntimeError, match="inside the transaction"):
        seqs_take(room_id="lobby", count=1)


# --- history by seq -------------------------------------------------------------------------


async def test_history_after_seq_replays_new_and_changed_messages_in_their_current_state(clients):
    alice = await clients.join("lobby", "alice")
    sent = [await send_and_echo(alice, f"m{n}") for n in range(5)]  # seqs 1..5
    # An operator edits message 2: the edit takes seq 6.
    await database_sync_to_async(message_edit)(
        message_id=int(sent[1]["message_id"]), content="m1, redacted", editor=Editor.operator("op")
    )
    await alice.send({"type": "history", "after_seq": 3, "request_id": "r"})
    page = await alice.recv_type("history")
    assert [(m["content"], m["seq"], m["changed_seq"]) for m in page["messages"]] == [
        ("m3", 4, None),
        ("m4", 5, None),
        ("m1, redacted", 2, 6),
    ]
    assert page["request_id"] == "r" and page["has_more"] is False
    # Paged: each page starts after the last entry's latest seq.
    await alice.send({"type": "history", "after_seq": 0, "limit": 2})
    page = await alice.recv_type("history")
    assert [m["seq"] for m in page["messages"]] == [1, 3] and page["has_more"] is True
    await alice.send({"type": "history", "after_seq": 3, "limit": 2})
    page = await alice.recv_type("history")
    assert [m["seq"] for m in page["messages"]] == [4, 5] and page["has_more"] is True
    await alice.send({"type": "history", "after_seq": 5, "limit": 2})
    page = await alice.recv_type("history")
    assert [m["changed_seq"] for m in page["messages"]] == [6] and page["has_more"] is False


async def test_history_before_seq_pages_back(clients):
    alice = await clients.join("lobby", "alice")
    for n in range(6):
        await send_and_echo(alice, f"m{n}")
    await alice.send({"type": "history", "before_seq": 5, "limit": 2})
    page = await alice.recv_type("history")
    assert [m["seq"] for m in page["messages"]] == [3, 4] and page["has_more"] is True


@pytest.mark.parametrize(
    "request_",
    [
        {"type": "history", "after_seq": 1, "before_seq": 5},
        {"type": "history", "after_seq": 1, "after": 1},
        {"type": "history", "after_seq": -1},
        {"type": "history", "after_seq": "1"},
        {"type": "history", "after_seq": 1.5},
        {"type": "history", "after_seq": 2**63},
    ],
)
async def test_a_bad_seq_bound_is_a_parse_error(clients, request_):
    alice = await clients.join("lobby", "alice")
    await alice.send(request_)
    await alice.expect_error("MESSAGE_PARSE_ERROR")


async def test_history_by_seq_reads_only_the_sockets_own_room(clients):
    """A hostile member of one room cannot page another's history by seq."""
    alice = await clients.join("secret", "alice", public_room=True)
    await send_and_echo(alice, "private matter")
    await database_sync_to_async(Room.objects.filter(pk="secret").update)(kind="private")
    mallory = await clients.join("lobby", "mallory")
    await mallory.send({"type": "history", "after_seq": 0, "room_id": "secret"})
    page = await mallory.recv_type("history")
    assert page["room_id"] == "lobby" and page["messages"] == []


# --- idempotent send ------------------------------------------------------------------------


async def test_a_message_sent_twice_with_one_client_id_is_stored_once(clients):
    alice = await clients.join("lobby", "alice")
    bob = await clients.join("lobby", "bob")
    first = await send_and_echo(alice, "hello", cid="c-1")
    assert (await bob.recv_type("message"))["message_id"] == first["message_id"]
    again = await send_and_echo(alice, "hello (retried)", cid="c-1")
    # The sender gets the stored message's echo; nothing new is stored or broadcast.
    assert again["message_id"] == first["message_id"]
    assert again["content"] == "hello" and again["seq"] == first["seq"]
    await bob.expect_nothing_pending()
    assert await database_sync_to_async(seqs_of)("lobby") == [1]
    # The next message takes the next seq: the repeat took none.
    assert (await send_and_echo(alice, "next", cid="c-2"))["seq"] == 2


async def test_the_same_client_id_is_a_new_message_for_another_user_or_room(clients):
    alice = await clients.join("lobby", "alice")
    bob = await clients.join("lobby", "bob")
    other = await clients.join("elsewhere", "alice")
    a = await send_and_echo(alice, "from alice", cid="same")
    assert (await bob.recv_type("message"))["message_id"] == a["message_id"]
    b = await send_and_echo(bob, "from bob", cid="same")
    c = await send_and_echo(other, "alice elsewhere", cid="same")
    assert len({a["message_id"], b["message_id"], c["message_id"]}) == 3


async def test_a_burst_of_repeats_is_stored_once(clients):
    """The same message fired ten times at once (one batch, or several): one row."""
    alice = await clients.join("lobby", "alice")
    await asyncio.gather(
        *(
            alice.send({"type": "message", "content": "once", "message_id": "burst"})
            for _ in range(10)
        )
    )
    echoes = [await alice.recv_type("message") for _ in range(10)]
    assert {e["message_id"] for e in echoes} == {echoes[0]["message_id"]}
    assert await database_sync_to_async(seqs_of)("lobby") == [1]


def test_repeats_within_one_batch_are_stored_once(db):
    from chat.history import messages_store

    Room.objects.create(name="lobby")
    fields = {"room_id": "lobby", "user_id": "alice", "username": "Alice", "metadata": None}
    stored = messages_store(
        messages=[
            fields | {"content": "a", "client_message_id": "x"},
            fields | {"content": "b", "client_message_id": None},
            fields | {"content": "a again", "client_message_id": "x"},
            fields | {"content": "c", "client_message_id": "y"},
        ]
    )
    assert [s.new for s in stored] == [True, True, False, True]
    assert [s.frame["seq"] for s in stored] == [1, 2, 1, 3]
    assert stored[2].frame["message_id"] == stored[0].frame["message_id"]
    assert seqs_of("lobby") == [1, 2, 3]


# --- resync ---------------------------------------------------------------------------------


async def test_a_resubscribed_layer_tells_each_socket_to_resync_with_the_rooms_last_seq(clients):
    alice = await clients.join("lobby", "alice")
    bob = await clients.join("lobby", "bob")
    for n in range(3):
        await send_and_echo(alice, f"m{n}")
    for client in (alice, bob):
        await get_channel_layer().send(await client.channel_name(), resubscribed_event())
    for client in (alice, bob):
        resync = await client.recv_type("resync")
        assert (resync["room_id"], resync["last_seq"]) == ("lobby", 3)


# --- the catch-up allowance -----------------------------------------------------------------


async def test_catch_up_reads_have_their_own_allowance(clients, settings):
    settings.CHAT_MESSAGE_RATE_LIMIT = 3
    settings.CHAT_CATCH_UP_RATE_LIMIT = 5
    alice = await clients.join("lobby", "alice")
    for n in range(3):  # the frame budget spent on chat
        await send_and_echo(alice, f"m{n}")
    # Catching up still works, from its own allowance...
    for _ in range(5):
        await alice.send({"type": "history", "after_seq": 0})
        assert (await alice.recv())["type"] == "history"
    # ...which is bounded too.
    await alice.send({"type": "history", "after_seq": 0})
    error = await alice.expect_error("RATE_LIMIT_EXCEEDED")
    assert error["details"]["scope"] == "catch_up"


async def test_a_frame_dressed_as_a_catch_up_read_is_charged_as_a_frame(clients, settings):
    """A hostile client names after_seq in other frames to spend the catch-up allowance
    instead of its frame budget: they are charged as frames after all."""
    settings.CHAT_MESSAGE_RATE_LIMIT = 3
    settings.CHAT_CATCH_UP_RATE_LIMIT = 100
    alice = await clients.join("lobby", "alice")
    for n in range(3):
        await send_and_echo(alice, f"m{n}", cid=None)
    await alice.send({"type": "message", "content": "free?", "after_seq": 1})
    error = await alice.expect_error("RATE_LIMIT_EXCEEDED")
    assert "scope" not in error["details"]
    await alice.send({"type": "history", "before_seq": 2, "pad": "after_seq"})
    error = await alice.expect_error("RATE_LIMIT_EXCEEDED")
    assert "scope" not in error["details"]


@pytest.mark.parametrize(
    "junk",
    [
        '{"type": "history", "after_seq": 1',  # INVALID_JSON
        '["after_seq"]',  # not an object
        '{"type": "nope", "after_seq": 1}',  # UNKNOWN_MESSAGE_TYPE
        '{"type": "history", "after_seq": "1"}',  # MESSAGE_PARSE_ERROR
        '{"type": "history", "after_seq": 1, "before_seq": 2}',  # MESSAGE_PARSE_ERROR
    ],
)
async def test_a_refused_frame_dressed_as_a_catch_up_read_is_charged_as_a_frame(
    clients, settings, junk
):
    """Refused frames count toward the rate limit (§16): naming after_seq in junk does not
    move it onto the catch-up allowance, so a flood of it closes the socket 4029."""
    settings.CHAT_MESSAGE_RATE_LIMIT = 3
    settings.CHAT_RATE_LIMIT_CLOSE_FACTOR = 3
    settings.CHAT_CATCH_UP_RATE_LIMIT = 100
    alice = await clients.join("lobby", "alice")
    for n in range(3):
        await send_and_echo(alice, f"m{n}")
    await alice.send_text(junk)
    error = await alice.expect_error("RATE_LIMIT_EXCEEDED")
    assert "scope" not in error["details"]
    for _ in range(20):
        await alice.send_text(junk)
    frames, code = await frames_until_close(alice)
    assert {f["error_code"] for f in frames} == {"RATE_LIMIT_EXCEEDED"} and code == 4029


# --- the migration's numbering, and the page helper ----------------------------------------


def test_messages_page_after_seq_orders_by_latest_seq(db):
    from chat.history import message_store

    Room.objects.create(name="lobby")
    ids = [
        int(
            message_store(
                room_id="lobby",
                user_id="alice",
                username="Alice",
                content=f"m{n}",
                metadata=None,
                client_message_id=None,
            )["message_id"]
        )
        for n in range(3)
    ]
    message_edit(message_id=ids[0], content="m0 edited", editor=Editor.user("alice"))
    frames, _ = messages_page(room_id="lobby", limit=10, after_seq=1, max_bytes=1_000_000)
    assert [(f["seq"], f["changed_seq"]) for f in frames] == [(2, None), (3, None), (1, 4)]


def test_an_erasure_numbers_each_tombstone_so_after_seq_replays_it(db):
    from chat.history import message_store
    from chat.userdata import user_erase

    Room.objects.create(name="lobby")

    def say(uid: str, content: str) -> dict:
        return message_store(
            room_id="lobby",
            user_id=uid,
            username=uid,
            content=content,
            metadata=None,
            client_message_id=None,
        )

    say("alice", "mine 1")
    say("bob", "his")
    say("alice", "mine 2")
    user_erase(user_id="alice", timeout=1, audit=lambda counts: None)
    frames, _ = messages_page(room_id="lobby", limit=10, after_seq=3, max_bytes=1_000_000)
    assert [(f["seq"], f["changed_seq"], f["content"]) for f in frames] == [
        (1, 4, None),
        (3, 5, None),
    ]
    assert room_last_seq(room_id="lobby") == 5
