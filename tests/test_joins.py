"""Joins in batches (chat/joins.py, chat/batching.py): sockets that join together share one
transaction and one presence and history read per room, and every guarantee of a lone join
holds for each of them — the per-user cap, first-in, the one authorization rule, nothing
left behind by a refusal — whoever else is in the batch."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from chat import history
from chat.access import Refused
from chat.auth import Identity
from chat.batching import Batcher
from chat.history import HISTORY_ENVELOPE_BYTES, message_store
from chat.joins import ViewRequest, rooms_view
from chat.layers import InMemoryChannelLayer
from chat.models import (
    ChatMessage,
    ChatSession,
    ChatUser,
    Endpoint,
    Role,
    Room,
    RoomKind,
    RoomMember,
)
from chat.protocol import Close, encode
from chat.rooms import GroupEvents, membership_notice
from chat.sessions import (
    SessionEnd,
    SessionOpened,
    SessionRefused,
    SessionRequest,
    departures_due,
    sessions_close,
    sessions_open,
    sessions_reap,
)
from chat.testing.waiting import until
from chat.worker import announce_departures
from tests.conftest import open_socket, read_join, token_for

pytestmark = pytest.mark.django_db(transaction=True)


def request(uid: str, room_id: str, n: int = 0) -> SessionRequest:
    return SessionRequest(
        identity=Identity(
            user_id=uid, username=uid.title(), expires_at=timezone.now() + timedelta(hours=1)
        ),
        room_id=room_id,
        endpoint=Endpoint.CHAT,
        channel_name=f"test.{uid}.{n}",
        client_address="127.0.0.1",
        user_agent="test",
    )


def open_batch(requests: list[SessionRequest], *, max_connections: int = 3, open_rooms=False):
    return sessions_open(
        requests=requests,
        worker_id="w1",
        max_connections=max_connections,
        open_rooms=open_rooms,
    )


def refusals(outcomes) -> list[Close | None]:
    return [o.close if isinstance(o, SessionRefused) else None for o in outcomes]


def public(name: str, **fields) -> Room:
    return Room.objects.create(name=name, kind=RoomKind.PUBLIC, **fields)


# --- the guarantees of a lone join, per request ------------------------------------------------


def test_one_user_over_the_cap_in_one_batch_gets_exactly_the_cap(db):
    public("lobby")
    outcomes = open_batch([request("alice", "lobby", n) for n in range(6)])
    assert refusals(outcomes) == [None] * 3 + [Close.TOO_MANY_CONNECTIONS] * 3
    assert [o.first_in_room for o in outcomes[:3]] == [True, False, False]
    assert ChatSession.objects.filter(user_id="alice", disconnected_at__isnull=True).count() == 3


def test_the_cap_counts_sessions_opened_before_the_batch(db):
    public("lobby")
    public("other")
    open_batch([request("alice", "lobby", 0), request("alice", "other", 1)])
    outcomes = open_batch([request("alice", "other", 2), request("alice", "lobby", 3)])
    assert refusals(outcomes) == [None, Close.TOO_MANY_CONNECTIONS]
    assert outcomes[0].first_in_room is False


def test_a_hostile_request_in_a_batch_gets_its_refusal_and_the_others_their_rooms(db):
    """Forbidden and unknown rooms are refused the same, with nothing left behind: no user
    row for a user seen for the first time, no membership, no session."""
    public("lobby")
    Room.objects.create(name="secret", kind=RoomKind.PRIVATE)
    RoomMember.objects.create(room_id="secret", user_id="bob", role=Role.OWNER)
    public("closed", is_closed=True)
    outcomes = open_batch(
        [
            request("mallory", "secret"),
            request("bob", "secret"),
            request("eve", "no-such-room"),
            request("alice", "lobby"),
            request("trent", "closed"),
        ]
    )
    assert refusals(outcomes) == [
        Close.ROOM_FORBIDDEN,
        None,
        Close.ROOM_FORBIDDEN,
        None,
        Close.ROOM_CLOSED,
    ]
    assert set(ChatUser.objects.values_list("pk", flat=True)) == {"bob", "alice"}
    assert set(RoomMember.objects.values_list("room_id", "user_id")) == {
        ("secret", "bob"),
        ("lobby", "alice"),  # joining a public room makes a member
    }
    assert set(ChatSession.objects.values_list("user_id", flat=True)) == {"bob", "alice"}
    assert not Room.objects.filter(pk="no-such-room").exists()


def test_a_full_room_counts_users_let_in_earlier_in_the_batch(db):
    public("small", max_users=2)
    outcomes = open_batch(
        [
            request("alice", "small"),
            request("alice", "small", 1),  # not a new user in the room
            request("bob", "small"),
            request("carol", "small"),
        ]
    )
    assert refusals(outcomes) == [None, None, None, Close.ROOM_FULL]


def test_a_banned_member_is_refused_in_a_batch(db):
    public("lobby")
    RoomMember.objects.create(room_id="lobby", user_id="mallory", banned=True)
    outcomes = open_batch([request("mallory", "lobby"), request("alice", "lobby")])
    assert refusals(outcomes) == [Close.ROOM_FORBIDDEN, None]


def test_a_batch_is_one_transaction(db):
    public("lobby")
    with CaptureQueriesContext(connection) as queries:
        outcomes = open_batch([request(f"user{n}", "lobby") for n in range(50)])
    assert all(isinstance(o, SessionOpened) for o in outcomes)
    commits = [q for q in queries.captured_queries if q["sql"].upper().startswith("COMMIT")]
    assert len(commits) <= 1
    assert len(queries.captured_queries) < 20  # not a query per join


# --- leaves in batches ------------------------------------------------------------------------


def ends(outcomes, reason: str = "client") -> list[SessionEnd]:
    return [
        SessionEnd(session_id=o.session_id, close_code=1000, close_reason=reason) for o in outcomes
    ]


def test_closes_in_one_batch_report_last_out_once_per_user_and_room(db):
    public("lobby")
    public("den")
    opened = open_batch(
        [
            request("alice", "lobby", 0),
            request("alice", "lobby", 1),
            request("alice", "den", 2),
            request("bob", "lobby", 3),
        ]
    )
    closed = sessions_close(ends=ends(opened[:2] + opened[3:]))
    assert [c.last_in_room for c in closed] == [False, True, True]  # alice twice, then bob
    assert [c.channel_name for c in closed] == ["test.alice.0", "test.alice.1", "test.bob.3"]
    assert sessions_close(ends=ends(opened[:1])) == [None]  # each session ends once
    assert ChatSession.objects.filter(disconnected_at__isnull=True).count() == 1  # alice, den


def test_a_reaper_and_a_close_end_each_session_once(db):
    public("lobby")
    opened = open_batch([request(f"user{n}", "lobby", n) for n in range(5)])
    closed = sessions_close(ends=ends(opened[:2]))
    reaped = sessions_reap(worker_id="w1")
    assert len([c for c in closed if c]) == 2 and len(reaped) == 3
    assert {c.user_id for c in reaped} == {"user2", "user3", "user4"}
    assert all(c.last_in_room for c in closed + reaped)
    assert sessions_reap(worker_id="w1") == []
    reasons = sorted(ChatSession.objects.values_list("close_reason", flat=True))
    assert reasons == ["client"] * 2 + ["worker_lost"] * 3


async def test_a_stopping_worker_sends_a_new_socket_elsewhere(clients):
    """During its shutdown grace a worker still listens: a reconnecting client that reaches
    it is told 4012 at once instead of joining a worker about to close it again."""
    from clarity_project.asgi import worker

    await database_sync_to_async(public)("lobby")
    worker.shutting_down = True
    try:
        client = await open_socket("lobby", token=token_for("alice"))
        await client.expect_refusal("SERVICE_UNAVAILABLE", 4012)
    finally:
        worker.shutting_down = False
    assert await database_sync_to_async(ChatSession.objects.count)() == 0


# --- the view on joining --------------------------------------------------------------------


def test_presence_and_history_are_read_once_per_batch_and_asked_of_the_rule(db):
    public("lobby")
    public("den")
    for n in range(3):
        message_store(
            room_id="lobby",
            user_id="bob",
            username="Bob",
            content=f"m{n}",
            metadata=None,
            client_message_id=None,
        )
    open_batch([request(uid, "lobby") for uid in ("alice", "bob")])
    open_batch([request("carol", "den")])
    asks = [
        ViewRequest(user_id=uid, room_id=room, history_limit=50, history_max_bytes=262_144)
        for uid, room in (("alice", "lobby"), ("bob", "lobby"), ("carol", "den"))
    ]
    asks.append(
        ViewRequest(user_id="mallory", room_id="lobby", history_limit=50, history_max_bytes=1)
    )
    with CaptureQueriesContext(connection) as queries:
        views = rooms_view(requests=asks)
    assert isinstance(views[3], Refused)  # not a member: reads nothing
    assert views[0] is views[1]
    assert [m["content"] for m in views[0].history] == ["m0", "m1", "m2"]
    assert {u["user_id"] for u in views[0].presence} == {"alice", "bob"}
    assert views[2].history == [] and [u["user_id"] for u in views[2].presence] == ["carol"]
    # The rule (two queries), then presence and history, each in one query for both rooms.
    assert len(queries.captured_queries) == 2 + 2


def test_newest_pages_of_many_rooms_are_each_rooms_own_page(db, monkeypatch):
    """One statement per NEWEST_PAGES_ROOMS rooms, each room's page exactly what the ORM
    reads for it alone: its newest messages, none of another room's, has_more when older
    ones exist, and the byte bound applied per room."""
    monkeypatch.setattr(history, "NEWEST_PAGES_ROOMS", 2)  # 5 rooms: three statements
    counts = {"r0": 0, "r1": 1, "r2": 7, "r3": 5, "r4": 6}
    for room_id, count in counts.items():
        public(room_id)
        for n in range(count):
            message_store(
                room_id=room_id,
                user_id="bob",
                username="Bob",
                content=f"{room_id}-{n}",
                metadata=None,
                client_message_id=None,
            )
    with CaptureQueriesContext(connection) as queries:
        pages = history.newest_pages(room_ids=list(counts), limit=5, max_bytes=262_144)
    assert len(queries.captured_queries) == 3
    for room_id, count in counts.items():
        newest = ChatMessage.objects.filter(room_id=room_id).order_by("-id")[:5]
        frames, has_more = pages[room_id]
        assert [f["content"] for f in frames] == [m.content for m in reversed(newest)]
        assert [f["seq"] for f in frames] == sorted(f["seq"] for f in frames)
        assert has_more == (count > 5)
    small = HISTORY_ENVELOPE_BYTES + 2 * len(encode(pages["r2"][0][-1]).encode()) + 2
    frames, has_more = history.newest_pages(room_ids=["r2"], limit=5, max_bytes=small)["r2"]
    assert [f["content"] for f in frames] == ["r2-5", "r2-6"] and has_more


def test_a_member_removed_after_opening_reads_nothing(db):
    public("lobby")
    open_batch([request("alice", "lobby")])
    RoomMember.objects.filter(room_id="lobby", user_id="alice").delete()
    ask = ViewRequest(user_id="alice", room_id="lobby", history_limit=50, history_max_bytes=10)
    assert isinstance(rooms_view(requests=[ask])[0], Refused)


# --- through the consumer: a burst of sockets ---------------------------------------------------


async def test_a_burst_of_joins_gets_every_frame_of_a_lone_join(clients):
    await database_sync_to_async(public)("lobby")
    await database_sync_to_async(message_store)(
        room_id="lobby",
        user_id="bob",
        username="Bob",
        content="hello",
        metadata=None,
        client_message_id=None,
    )
    sockets = await asyncio.gather(
        *(open_socket("lobby", token=token_for(f"user{n}")) for n in range(20))
    )
    joined = await asyncio.gather(*(read_join(s) for s in sockets))
    for client in joined:
        assert client.ack["server_info"]["last_seq"] == 1
        assert [m["content"] for m in client.history["messages"]] == ["hello"]
        assert any(u["user_id"] for u in client.presence["users"])
    for client in joined:
        await client.close()


async def test_a_burst_tells_the_room_of_every_join_and_no_one_of_their_own(clients):
    """The notices of joins in one turn travel as one event per room (GroupEvents):
    each still reaches everyone in the room but the user who joined."""
    await database_sync_to_async(public)("lobby")
    carol = await clients.join("lobby", "carol")
    sockets = await asyncio.gather(
        *(open_socket("lobby", token=token_for(f"user{n}")) for n in range(12))
    )
    joined = await asyncio.gather(*(read_join(s) for s in sockets))
    heard = [(await carol.recv_type("user_joined"))["user_id"] for _ in range(12)]
    assert sorted(heard) == sorted(f"user{n}" for n in range(12))
    await carol.expect_nothing_pending()
    for n, client in enumerate(joined):
        await client.send({"type": "heartbeat", "client_timestamp": "probe"})
        seen = []
        while (got := await client.recv())["type"] != "heartbeat_ack":
            if got["type"] == "user_joined":
                seen.append(got["user_id"])
        assert f"user{n}" not in seen and set(seen) <= {f"user{m}" for m in range(12)}
    for client in joined:
        await client.close()


async def test_one_user_bursting_past_the_cap_is_refused_exactly(clients, settings):
    settings.CHAT_MAX_CONNECTIONS_PER_USER = 3
    await database_sync_to_async(public)("lobby")
    sockets = await asyncio.gather(
        *(open_socket("lobby", token=token_for("alice")) for _ in range(8))
    )
    firsts = [await s.recv() for s in sockets]
    kinds = sorted(f["type"] if f["type"] != "error" else f["error_code"] for f in firsts)
    assert kinds == ["TOO_MANY_CONNECTIONS"] * 5 + ["connection_ack"] * 3
    for s in sockets:
        await s.close()


# --- the batcher ------------------------------------------------------------------------------


async def test_a_failing_batch_is_retried_one_call_at_a_time():
    calls: list[list[int]] = []

    def run(batch: list[int]) -> list[int | Exception]:
        calls.append(batch)
        if 13 in batch:
            raise RuntimeError("unlucky")
        return [n * 2 if n % 2 else ValueError(n) for n in batch]

    batcher: Batcher[int, int] = Batcher(run=run, what="test", max_batch=10)
    results = await asyncio.gather(
        *(batcher.submit(n) for n in (1, 2, 13, 5)), return_exceptions=True
    )
    assert results[0] == 2 and results[3] == 10
    assert isinstance(results[1], ValueError)  # its own outcome
    assert isinstance(results[2], RuntimeError)  # the call that broke the batch, alone
    assert calls[0] == [1, 2, 13, 5] and [1] in calls and [13] in calls


# --- membership notices ---------------------------------------------------------------------


async def test_notices_of_one_turn_are_one_event_per_room_in_order():
    layer = InMemoryChannelLayer()
    room, other = await layer.new_channel(), await layer.new_channel()
    await layer.group_add("room.a", room)
    await layer.group_add("room.b", other)
    notices = GroupEvents()
    events = [
        membership_notice(user_id=f"u{n}", username=f"U{n}", joined=n % 2 == 0) for n in range(4)
    ]
    await asyncio.gather(
        *(notices.send(layer=layer, group="room.a", event=event) for event in events),
        notices.send(layer=layer, group="room.b", event=events[0]),
    )
    delivered = await layer.receive(room)
    assert delivered["frames"] == [item for event in events for item in event["frames"]]
    assert [item[3] for item in delivered["frames"]] == [
        "u0",
        "u0",
        "u1",
        "u1",
        "u2",
        "u2",
        "u3",
        "u3",
    ]
    assert (await layer.receive(other))["frames"] == events[0]["frames"]
    assert not notices.pending and not layer.channels.get(room)  # nothing else queued


async def test_every_sender_of_a_turn_gets_the_send_error_and_a_cancelled_one_costs_no_one():
    layer = InMemoryChannelLayer()
    notices = GroupEvents()
    event = membership_notice(user_id="u", username="U", joined=True)
    results = await asyncio.gather(
        *(notices.send(layer=layer, group="bad group!", event=event) for _ in range(3)),
        return_exceptions=True,
    )
    assert all(isinstance(result, TypeError) for result in results)  # an invalid group name

    channel = await layer.new_channel()
    await layer.group_add("room.a", channel)
    gone = asyncio.create_task(notices.send(layer=layer, group="room.a", event=event))
    stays = asyncio.create_task(notices.send(layer=layer, group="room.a", event=event))
    await asyncio.sleep(0)  # both queued their notice: one send, on the next turn
    gone.cancel()
    await stays
    assert gone.cancelled()
    assert len((await layer.receive(channel))["frames"]) == 4  # the cancelled one's too


# --- a restart is not a departure (CHAT_SHUTDOWN_REJOIN_GRACE) ---------------------------------


def shutdown_end(session_id: str, *, grace: float = 15) -> SessionEnd:
    return SessionEnd(
        session_id=session_id, close_code=4012, close_reason="shutdown", leave_grace=grace
    )


def test_a_departure_in_grace_is_announced_once_when_it_is_over(db):
    public("lobby")
    (opened,) = open_batch([request("alice", "lobby")])
    (closed,) = sessions_close(ends=[shutdown_end(opened.session_id)])
    assert not closed.last_in_room  # not now
    due = ChatSession.objects.get().leave_due_at
    assert departures_due(now=due - timedelta(seconds=1)) == []
    (gone,) = departures_due(now=due)
    assert (gone.user_id, gone.room_id, gone.last_in_room) == ("alice", "lobby", True)
    assert departures_due(now=due + timedelta(hours=1)) == []  # once
    assert ChatSession.objects.get().leave_due_at is None


def test_back_within_the_grace_is_neither_gone_nor_new(db):
    public("lobby")
    (first,) = open_batch([request("alice", "lobby")])
    sessions_close(ends=[shutdown_end(first.session_id)])
    (again,) = open_batch([request("alice", "lobby", 1)])
    assert not again.first_in_room  # the room never saw her go: no user_joined
    assert departures_due(now=timezone.now() + timedelta(hours=1)) == []  # nor user_left
    (closed,) = sessions_close(
        ends=[SessionEnd(session_id=again.session_id, close_code=1000, close_reason="client")]
    )
    assert closed.last_in_room  # leaving herself later is announced at once


def test_only_the_last_socket_out_defers_and_a_grace_of_0_is_at_once(db):
    public("lobby")
    one, two = open_batch([request("alice", "lobby", 1), request("alice", "lobby", 2)])
    (closed,) = sessions_close(ends=[shutdown_end(one.session_id)])
    assert not closed.last_in_room
    assert not ChatSession.objects.filter(leave_due_at__isnull=False).exists()  # still in
    (closed,) = sessions_close(ends=[shutdown_end(two.session_id, grace=0)])
    assert closed.last_in_room and not ChatSession.objects.filter(leave_due_at__isnull=False)


async def test_a_socket_the_worker_closes_for_shutdown_comes_back_unannounced(clients):
    await database_sync_to_async(public)("lobby")
    alice = await clients.join("lobby", "alice")
    bob = await clients.join("lobby", "bob")
    await alice.recv_type("user_joined")
    await alice.expect_nothing_pending()
    await get_channel_layer().send(await bob.channel_name(), {"type": "worker.shutdown"})
    await bob.expect_refusal("SERVICE_UNAVAILABLE", 4012)
    await bob.close()
    bob = await clients.join("lobby", "bob")
    assert "bob" in {user["user_id"] for user in bob.presence["users"]}
    await alice.expect_nothing_pending()  # no user_left, no user_joined
    await bob.expect_nothing_pending()


async def test_a_shutdown_close_ends_the_session_before_the_client_answers(clients):
    """A stopping worker waits only for its sessions to end: each ends as its close is sent,
    so a client that never answers the close (or thousands answering at once) does not hold
    up the restart. The client's later disconnect changes nothing."""
    await database_sync_to_async(public)("lobby")
    bob = await clients.join("lobby", "bob")
    session_id = bob.ack["session_id"]
    await get_channel_layer().send(await bob.channel_name(), {"type": "worker.shutdown"})
    await bob.expect_error("SERVICE_UNAVAILABLE")
    close = await bob.communicator.receive_output(2)
    assert (close["type"], close["code"]) == ("websocket.close", 4012)
    # the client has not answered the close: its socket is still open to the server
    ended = database_sync_to_async(
        lambda: (
            ChatSession.objects.filter(session_id=session_id, disconnected_at__isnull=False)
            .values("disconnected_at", "close_code", "close_reason", "leave_due_at")
            .first()
        )
    )
    row = await until(ended, what="the session ended")
    assert (row["close_code"], row["close_reason"]) == (4012, "shutdown")
    assert row["leave_due_at"] is not None  # a restart is not a departure
    await bob.close()
    assert await ended() == row


async def test_a_client_closing_with_4012_itself_gets_no_grace(clients):
    """Only the server's own shutdown close defers the departure: a client cannot hide its
    leaving by sending the shutdown code."""
    await database_sync_to_async(public)("lobby")
    alice = await clients.join("lobby", "alice")
    bob = await clients.join("lobby", "bob")
    await alice.recv_type("user_joined")
    bob.closed = True
    await bob.communicator.disconnect(code=4012, timeout=5)
    left = await alice.recv_type("user_left")
    assert left["user_id"] == "bob"
    assert not await database_sync_to_async(
        ChatSession.objects.filter(leave_due_at__isnull=False).exists
    )()


async def test_the_housekeeping_announcement_reaches_the_room(clients):
    await database_sync_to_async(public)("lobby")
    alice = await clients.join("lobby", "alice")
    bob = await clients.join("lobby", "bob")
    await alice.recv_type("user_joined")
    await get_channel_layer().send(await bob.channel_name(), {"type": "worker.shutdown"})
    await bob.expect_refusal("SERVICE_UNAVAILABLE", 4012)
    await bob.close()
    await alice.expect_nothing_pending()
    assert await announce_departures(now=timezone.now() + timedelta(hours=1)) == 1
    assert (await alice.recv())["content"] == "Bob left the chat"
    assert (await alice.recv())["type"] == "user_left"
    assert await announce_departures(now=timezone.now() + timedelta(hours=1)) == 0
