"""Both channel layers' bounded queues (chat/layers.py, chat/pubsub.py): a channel that fills
up overflows (its queued messages dropped and counted, one `layer.overflow` event left), and
its socket is closed 4009 (protocol §16), while senders and other members go on. Plus the
in-memory layer's own semantics (copies, expiry)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid

import pytest
import redis
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from prometheus_client import REGISTRY

from chat.layers import InMemoryChannelLayer
from chat.models import ChatSession
from chat.protocol import Close, ErrorCode
from chat.pubsub import RedisPubSubChannelLayer
from chat.testing.redis_server import REDIS_URL, redis_answers
from chat.testing.waiting import until
from tests.conftest import ChatClient, read_join, token_for

OVERFLOW = {"type": "layer.overflow"}


class LayerCounts:
    """The layer metrics' growth since this object was made."""

    NAMES = ("clarity_layer_overflows_total", "clarity_layer_dropped_total")

    def __init__(self) -> None:
        self.before = [REGISTRY.get_sample_value(name) or 0 for name in self.NAMES]

    def growth(self) -> tuple[float, float]:
        after = [REGISTRY.get_sample_value(name) or 0 for name in self.NAMES]
        overflows, dropped = (now - then for now, then in zip(after, self.before, strict=True))
        return overflows, dropped


# --- the in-memory layer on its own ---------------------------------------------------------


async def test_group_send_gives_every_member_its_own_copy():
    layer = InMemoryChannelLayer(capacity=10)
    await layer.group_add("room.a", "one!x")
    await layer.group_add("room.a", "two!y")
    await layer.group_send("room.a", {"type": "chat.frame", "text": "hi"})
    first, second = await layer.receive("one!x"), await layer.receive("two!y")
    assert first == second == {"type": "chat.frame", "text": "hi"}
    first["text"] = "changed"
    assert second["text"] == "hi"


async def test_a_full_member_queue_overflows_once_and_the_others_still_receive(caplog):
    layer = InMemoryChannelLayer(capacity=3)
    await layer.group_add("room.a", "slow!x")
    await layer.group_add("room.a", "fast!y")
    counts = LayerCounts()
    longest = 0
    with caplog.at_level(logging.WARNING, logger="chat.layers"):
        for n in range(10):
            await layer.group_send("room.a", {"type": "chat.frame", "text": str(n)})
            longest = max(longest, layer.channels["slow!x"].qsize())
            assert (await layer.receive("fast!y"))["text"] == str(n)
    # Full at 3; the 4th overflowed it (3 queued + itself dropped), the 6 after it dropped.
    assert longest == 3
    assert counts.growth() == (1, 10)
    [warning] = [r for r in caplog.records if r.name == "chat.layers"]
    assert "slow!x full (capacity 3), 4 messages dropped" in warning.getMessage()
    assert layer.channels["slow!x"].qsize() == 1
    assert await layer.receive("slow!x") == OVERFLOW
    # Read: the channel takes messages again.
    await layer.group_send("room.a", {"type": "chat.frame", "text": "after"})
    assert (await layer.receive("slow!x"))["text"] == "after"


async def test_a_send_to_a_full_channel_overflows_it_instead_of_failing_the_sender():
    layer = InMemoryChannelLayer(capacity=2)
    counts = LayerCounts()
    for n in range(5):
        await layer.send("slow!x", {"type": "room.revoke", "n": n})  # never raises
    assert counts.growth() == (1, 5)
    assert await layer.receive("slow!x") == OVERFLOW
    assert "slow!x" not in layer.channels  # read empty: its memory is gone


async def test_expired_messages_and_memberships_are_cleaned_at_most_once_per_interval():
    layer = InMemoryChannelLayer(capacity=10, expiry=0, group_expiry=0, clean_interval=3600)
    await layer.group_add("room.a", "gone!x")
    await layer.send("gone!x", {"type": "a"})
    await layer.group_send("room.a", {"type": "b"})  # first clean: the message has expired
    assert "gone!x" not in layer.groups.get("room.a", {})
    await layer.group_add("room.a", "gone!x")
    await layer.group_send("room.a", {"type": "c"})  # within the interval: no scan
    assert "gone!x" in layer.groups["room.a"]


# --- a slow socket through the real consumer (in-memory layer) -------------------------------


class StalledCommunicator(WebsocketCommunicator):
    """A client that stops reading: the application's sends wait once `window` frames are
    unread, as a consumer does whose socket cannot keep up (so it stops reading its
    channel-layer queue while its rooms keep talking)."""

    def __init__(self, *args, window: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._window = asyncio.Queue(maxsize=window)

    @property
    def output_queue(self) -> asyncio.Queue:
        return self._window


async def join_stalled(room: str, uid: str, *, window: int) -> ChatClient:
    from clarity_project.asgi import application

    communicator = StalledCommunicator(
        application, f"/api/v1/ws/{room}?token={token_for(uid)}", window=window
    )
    connected, _ = await communicator.connect(timeout=5)
    assert connected
    return await read_join(ChatClient(communicator))


def session(session_id: str) -> ChatSession:
    return ChatSession.objects.get(session_id=session_id)


@pytest.mark.django_db(transaction=True)
async def test_a_socket_that_falls_behind_is_closed_4009_and_the_senders_go_on(clients, settings):
    capacity, sent = 5, 20
    settings.CHANNEL_LAYERS = {
        "default": {"BACKEND": "chat.layers.InMemoryChannelLayer", "CONFIG": {"capacity": capacity}}
    }
    senders = [await clients.join("lobby", "alice"), await clients.join("lobby", "bob")]
    slow = await join_stalled("lobby", "carol", window=1)
    try:
        layer = get_channel_layer()
        channel = (await database_sync_to_async(session)(slow.ack["session_id"])).channel_name
        for member in senders:  # carol's join notices, the last frames before the flood
            while (await member.recv_type("user_joined"))["user_id"] != "carol":
                pass

        # ... and her socket has taken its copies (it skips them) off its queue.
        async def notices_read() -> bool:
            return channel not in layer.channels or layer.channels[channel].empty()

        await until(notices_read, step=0, what="carol's join notices read")

        counts = LayerCounts()
        longest = 0
        for n in range(sent):
            await senders[n % 2].send({"type": "message", "content": f"m{n}"})
            for member in senders:  # every sender gets every message, and nothing else
                frame = await member.recv()
                assert (frame["type"], frame["content"]) == ("message", f"m{n}"), frame
            queue = layer.channels.get(channel)
            longest = max(longest, queue.qsize() if queue is not None else 0)
        # Full at the capacity, then only the overflow event.
        assert longest == capacity
        assert layer.channels[channel].qsize() == 1

        # Carol reads at last: what reached her socket before the overflow, then the error
        # and the close.
        delivered = []
        while (frame := await slow.recv())["type"] == "message":
            delivered.append(frame["content"])
        assert (frame["error_code"], frame["message"]) == (
            ErrorCode.SLOW_CONSUMER,
            "Client too slow",
        )
        await slow.expect_close(Close.SLOW_CONSUMER.value.code)
    finally:
        await slow.close()
    assert delivered == [f"m{n}" for n in range(len(delivered))]
    assert counts.growth() == (1, sent - len(delivered))

    ended = await database_sync_to_async(session)(slow.ack["session_id"])
    assert ended.disconnected_at is not None
    assert (ended.close_code, ended.close_reason) == (4009, "slow_consumer")
    for member in senders:  # the room sees her leave, and goes on
        assert (await member.recv_type("user_left"))["user_id"] == "carol"
    await senders[0].send({"type": "message", "content": "still here"})
    for member in senders:
        assert (await member.recv_type("message"))["content"] == "still here"


# --- the Redis pub/sub layer, with a real Redis -----------------------------------------------


@pytest.fixture
async def redis_layer():
    """The Redis layer as settings make it, capacity 5, under a prefix of its own."""
    if not redis_answers(REDIS_URL):
        if os.environ.get("CI"):
            raise AssertionError(f"no Redis at {REDIS_URL} under CI")
        pytest.skip(f"no Redis at {REDIS_URL}")
    layer = RedisPubSubChannelLayer(
        hosts=[{"address": REDIS_URL}], prefix=f"test-layers-{uuid.uuid4().hex}", capacity=5
    )
    yield layer
    await layer.flush()


async def test_redis_pubsub_queues_are_bounded_and_overflow_to_the_event(redis_layer):
    """A channel that does not receive while its group gets 50 messages: its queue never
    holds more than the capacity, then `receive` yields `layer.overflow`. A second member
    receives each message before the next is published (so it says when the layer has
    dispatched it)."""
    layer = redis_layer
    slow = await layer.new_channel()
    witness = await layer.new_channel()
    await layer.group_add("room", slow)
    await layer.group_add("room", witness)
    queue = layer._get_layer().channels[slow]
    counts = LayerCounts()
    lengths = []
    for n in range(50):
        await layer.group_send("room", {"type": "chat.frame", "n": n})
        async with asyncio.timeout(5):
            assert (await layer.receive(witness))["n"] == n
        lengths.append(queue.qsize())
    assert lengths == [1, 2, 3, 4, 5] + [1] * 45
    assert counts.growth() == (1, 50)
    async with asyncio.timeout(5):
        assert await layer.receive(slow) == OVERFLOW
    # Read: the channel takes messages again.
    await layer.send(slow, {"type": "chat.frame", "n": "after"})
    async with asyncio.timeout(5):
        assert (await layer.receive(slow))["n"] == "after"


async def test_redis_pubsub_direct_sends_overflow_too(redis_layer):
    layer = redis_layer
    slow = await layer.new_channel()
    witness = await layer.new_channel()
    counts = LayerCounts()
    for n in range(20):
        await layer.send(slow, {"type": "room.revoke", "n": n})
    # Each publish is awaited, so Redis has passed the 20 to the subscriber connection before
    # the witness's message, and the layer reads them in that order.
    await layer.send(witness, {"type": "done"})
    async with asyncio.timeout(10):
        assert await layer.receive(witness) == {"type": "done"}
    assert layer._get_layer().channels[slow].qsize() == 1
    assert counts.growth() == (1, 20)
    async with asyncio.timeout(5):
        assert await layer.receive(slow) == OVERFLOW


async def test_a_burst_of_group_sends_waits_for_the_pools_connections_and_loses_none():
    """A worker restarting under 2,000 users sends 2,000 leave notices at once: with a pool
    of 4 connections every one of 500 concurrent sends is published (none fails with "Too
    many connections"), on at most 4 connections."""
    if not redis_answers(REDIS_URL):
        pytest.skip(f"no Redis at {REDIS_URL}")
    layer = RedisPubSubChannelLayer(
        hosts=[{"address": REDIS_URL, "max_connections": 4}],
        prefix=f"test-layers-{uuid.uuid4().hex}",
        capacity=1000,
    )
    try:
        member = await layer.new_channel()
        await layer.group_add("room", member)
        await asyncio.gather(
            *(layer.group_send("room", {"type": "chat.frame", "n": n}) for n in range(500))
        )
        received = set()
        async with asyncio.timeout(10):
            while len(received) < 500:
                received.add((await layer.receive(member))["n"])
        pool = layer._get_layer()._shards[0]._redis.connection_pool
        assert len(pool._available_connections) + len(pool._in_use_connections) <= 4
    finally:
        await layer.flush()


def subscribe_commands() -> int:
    """SUBSCRIBE commands Redis has run since it started (every client's)."""
    with contextlib.closing(redis.Redis.from_url(REDIS_URL)) as client:
        return int(client.info("commandstats").get("cmdstat_subscribe", {}).get("calls", 0))


async def test_a_turns_subscriptions_go_as_one_command_and_the_last_asked_wins(redis_layer):
    """200 sockets joining at once subscribe their channels with one SUBSCRIBE, and each is
    subscribed for real; a group joined and left before its subscription was sent is not
    left subscribed (nothing is sent for it at all)."""
    layer = redis_layer
    own = await layer.new_channel()  # (the subscriber connection made)

    async def socket(n: int) -> int:  # a consumer's task: its channel lives as long
        channel = await layer.new_channel()
        await layer.send(channel, {"type": "chat.frame", "n": n})
        async with asyncio.timeout(10):
            return (await layer.receive(channel))["n"]

    before = subscribe_commands()
    assert await asyncio.gather(*(socket(n) for n in range(200))) == list(range(200))
    assert subscribe_commands() - before <= 2  # (another client's may land in between)

    loop_layer = layer._get_layer()
    group_channel = loop_layer._get_group_channel_name("fleeting")
    shard = loop_layer._shards[0]
    joined = asyncio.ensure_future(layer.group_add("fleeting", own))

    async def asked() -> bool:  # group_add has asked for the subscription, not sent it
        return group_channel in shard._changes

    await until(asked, what="the subscription asked for", step=0)
    await layer.group_discard("fleeting", own)
    await joined
    assert group_channel not in shard._subscribed_to
    with contextlib.closing(redis.Redis.from_url(REDIS_URL)) as client:
        assert client.pubsub_numsub(group_channel) == [(group_channel.encode(), 0)]
    # and a group joined for real is subscribed
    await layer.group_add("lasting", own)
    await layer.group_send("lasting", {"type": "chat.frame", "n": "group"})
    async with asyncio.timeout(5):
        assert (await layer.receive(own))["n"] == "group"
