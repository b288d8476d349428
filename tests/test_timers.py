"""The socket's timers (chat/timers.py): unit tests on a manual clock, then the real consumer
with the worker's clock replaced by a manual one, so time moves when the test says so.
Nothing here waits for time to pass."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer

from chat.models import ChatSession
from chat.rooms import room_event, room_group, user_group, worker_group
from chat.testing.clock import ManualClock
from chat.testing.waiting import until
from chat.timers import Due, SocketTimers, TimerIntervals
from tests.conftest import read_join, token_for

INTERVALS = TimerIntervals(
    heartbeat=30, connection_timeout=300, typing_timeout=10, group_renewal=1800
)


class Recorder:
    """An `on_due` that notes when (clock time) what fell due."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.due: list[tuple[float, frozenset[Due]]] = []

    async def __call__(self, due: frozenset[Due]) -> None:
        self.due.append((self.clock.monotonic(), due))


def started_timers(*, token_lifetime: float = 3600, intervals: TimerIntervals = INTERVALS):
    clock = ManualClock()
    recorder = Recorder(clock)
    timers = SocketTimers(clock=clock, intervals=intervals, on_due=recorder)
    timers.start(token_expires_at=clock.now() + timedelta(seconds=token_lifetime))
    return clock, timers, recorder


# --- the timers on their own -----------------------------------------------------------------


async def test_heartbeats_fall_due_every_interval_and_nothing_before():
    clock, _, recorder = started_timers()
    await clock.advance(29.9)
    assert recorder.due == []
    await clock.advance(0.1)
    await clock.advance(30)
    assert recorder.due == [(30, {Due.HEARTBEAT}), (60, {Due.HEARTBEAT})]


async def test_every_group_renewal_falls_due_on_its_interval():
    intervals = TimerIntervals(
        heartbeat=1000, connection_timeout=5000, typing_timeout=10, group_renewal=50
    )
    clock, _, recorder = started_timers(intervals=intervals)
    await clock.advance(100)
    assert recorder.due == [(50, {Due.RENEWAL}), (100, {Due.RENEWAL})]


async def test_inbound_frames_move_the_idle_deadline_and_idle_is_the_end():
    clock, timers, recorder = started_timers(
        intervals=TimerIntervals(
            heartbeat=1000, connection_timeout=60, typing_timeout=10, group_renewal=5000
        )
    )
    await clock.advance(50)
    timers.inbound()
    await clock.advance(50)
    assert recorder.due == []
    await clock.advance(10)
    assert recorder.due == [(110, {Due.IDLE})]
    await clock.advance(10_000)
    assert recorder.due == [(110, {Due.IDLE})], "nothing is due after the end"


async def test_token_expiry_and_a_renewed_token_that_expires_sooner():
    clock, timers, recorder = started_timers(token_lifetime=100)
    timers.token_renewed(expires_at=clock.now() + timedelta(seconds=10))
    await clock.advance(10)
    assert recorder.due == [(10, {Due.TOKEN_EXPIRED})]


async def test_typing_expires_unless_withdrawn():
    clock, timers, recorder = started_timers()
    timers.typing(is_typing=True)
    await clock.advance(10)
    assert recorder.due == [(10, {Due.TYPING_EXPIRED})]
    timers.typing(is_typing=True)
    timers.typing(is_typing=False)
    await clock.advance(20)
    assert [due for _, due in recorder.due] == [{Due.TYPING_EXPIRED}, {Due.HEARTBEAT}]
    timers.typing(is_typing=True)
    assert timers.typing_withdraw() is True and timers.typing_withdraw() is False


async def test_stopped_timers_fire_no_more():
    clock, timers, recorder = started_timers()
    timers.stop()
    await clock.advance(10_000)
    assert recorder.due == []


async def test_work_that_fails_does_not_stop_the_timers():
    clock = ManualClock()
    seen: list[frozenset[Due]] = []

    async def failing(due: frozenset[Due]) -> None:
        seen.append(due)
        raise RuntimeError("channel layer down")

    timers = SocketTimers(clock=clock, intervals=INTERVALS, on_due=failing)
    timers.start(token_expires_at=clock.now() + timedelta(hours=1))
    await clock.advance(60)
    assert seen == [{Due.HEARTBEAT}, {Due.HEARTBEAT}]


# --- the real consumer on a manual clock ------------------------------------------------------


sockets = pytest.mark.django_db(transaction=True)


@pytest.fixture
def clock(monkeypatch) -> ManualClock:
    """The worker's clock, for every socket opened in the test."""
    from clarity_project.asgi import worker

    manual = ManualClock()
    monkeypatch.setattr(worker, "clock", manual)
    return manual


@sockets
async def test_server_sends_heartbeats(clients, clock, settings):
    settings.CHAT_HEARTBEAT_INTERVAL = 30
    alice = await clients.join("lobby", "alice")
    for _ in range(2):
        await clock.advance(30)
        beat = await alice.recv()
        assert beat["type"] == "heartbeat" and beat["client_timestamp"] is None


@sockets
async def test_idle_socket_is_closed_after_the_timeout(clients, clock, settings):
    settings.CHAT_CONNECTION_TIMEOUT = 300
    settings.CHAT_HEARTBEAT_INTERVAL = 1000
    alice = await clients.join("lobby", "alice")
    await clock.advance(300)
    error = await alice.expect_error("CONNECTION_TIMEOUT")
    assert error["message"] == "Connection timeout"
    await alice.expect_close(1000)
    session = await database_sync_to_async(ChatSession.objects.get)(
        session_id=alice.ack["session_id"]
    )
    assert session.close_code == 1000 and session.close_reason == "connection_timeout"


@sockets
async def test_inbound_frames_keep_the_socket_alive(clients, clock, settings):
    settings.CHAT_CONNECTION_TIMEOUT = 300
    settings.CHAT_HEARTBEAT_INTERVAL = 10_000
    alice = await clients.join("lobby", "alice")
    for _ in range(3):
        await clock.advance(299)
        await alice.send({"type": "heartbeat"})
        assert (await alice.recv())["type"] == "heartbeat_ack"
    await clock.advance(300)
    await alice.expect_error("CONNECTION_TIMEOUT")
    await alice.expect_close(1000)


@sockets
async def test_typing_expires_without_refresh(clients, clock, settings):
    settings.CHAT_TYPING_TIMEOUT = 10
    alice = await clients.join("lobby", "alice")
    bob = await clients.join("lobby", "bob")
    await alice.recv_type("user_joined")
    await bob.send({"type": "typing", "is_typing": True})
    assert (await alice.recv())["is_typing"] is True
    assert (await bob.recv())["is_typing"] is True
    await clock.advance(10)
    expired = await alice.recv()
    assert expired["type"] == "typing" and expired["is_typing"] is False
    assert expired["user_id"] == "bob"


@sockets
async def test_socket_closed_when_the_token_expires(clients, clock, settings):
    settings.FIREBASE_CLOCK_SKEW_SECONDS = 0
    settings.CHAT_HEARTBEAT_INTERVAL = 10_000
    token = token_for("alice", issued_at=int(time.time()), lifetime=60)
    client = await read_join(await clients.open(token=token, public_room=True))
    await clock.advance(61)
    error = await client.expect_error("AUTH_EXPIRED")
    assert error["message"] == "Token expired"
    await client.expect_close(4003)


@sockets
async def test_refresh_before_expiry_keeps_the_socket_open(clients, clock, settings):
    settings.FIREBASE_CLOCK_SKEW_SECONDS = 0
    settings.CHAT_HEARTBEAT_INTERVAL = 1000
    now = int(time.time())
    client = await read_join(
        await clients.open(token=token_for("alice", issued_at=now, lifetime=60), public_room=True)
    )
    await client.send({"type": "auth", "token": token_for("alice", issued_at=now)})
    assert (await client.recv())["type"] == "auth_ack"
    await clock.advance(120)  # past the first token's expiry
    await client.send({"type": "heartbeat"})
    assert (await client.recv())["type"] == "heartbeat_ack"


@sockets
async def test_every_joined_group_is_renewed(clients, clock, settings):
    """A layer may expire group memberships (the in-memory layer after its group_expiry):
    the socket renews all three of its groups, not only the room's."""
    settings.CHANNEL_LAYER_GROUP_EXPIRY = 3600
    settings.CHAT_HEARTBEAT_INTERVAL = 10_000
    settings.CHAT_CONNECTION_TIMEOUT = 10_000
    from clarity_project.asgi import worker

    alice = await clients.join("lobby", "alice")
    layer = get_channel_layer()
    groups = [room_group("lobby"), user_group("alice"), worker_group(worker.worker_id)]
    (channel,) = layer.groups[groups[0]]
    for group in groups:  # what the layer's expiry does to memberships nobody renewed
        layer.groups[group].pop(channel)
    await clock.advance(1800)
    for group in groups:
        assert channel in layer.groups.get(group, {}), group
    # ...and each works again: a private result (user group), then a shutdown (worker group).
    note = {"type": "system", "content": "for alice only"}
    await layer.group_send(user_group("alice"), room_event(note))
    assert (await alice.recv())["content"] == "for alice only"
    await layer.group_send(worker_group(worker.worker_id), {"type": "worker.shutdown"})
    await alice.expect_error("SERVICE_UNAVAILABLE")
    await alice.expect_close(4012)


@sockets
async def test_heartbeats_write_every_sockets_liveness_in_one_batch(clients, clock, settings):
    settings.CHAT_HEARTBEAT_INTERVAL = 30
    alice = await clients.join("lobby", "alice")
    bob = await clients.join("lobby", "bob")
    await alice.send({"type": "message", "content": "one"})
    await alice.recv_type("message")
    await clock.advance(30)
    for client in (alice, bob):
        await client.recv_type("heartbeat")

    def written() -> list[ChatSession]:
        rows = list(ChatSession.objects.filter(user_id__in=["alice", "bob"]).order_by("user_id"))
        return rows if rows[0].messages_sent == 1 else []

    rows = await until(
        database_sync_to_async(written), timeout=10, what="the liveness batch written"
    )
    assert [row.messages_sent for row in rows] == [1, 0]
    # Both written by the batch: their last inbound frame, by the clock that noted it (time
    # 0 on the manual clock: alice's message, bob's join).
    assert [row.last_seen for row in rows] == [clock.start, clock.start]
