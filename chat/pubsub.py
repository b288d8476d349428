"""channels-redis' `RedisPubSubChannelLayer` (the channel layer whenever `REDIS_URL` is set),
without its leaks, with bounded queues, and recovering from a Redis restart.

1. A consumer's own channel (a Redis subscription and a queue in the worker) is released by
   the stock layer only when the consumer's pending `receive` is cancelled. A `receive` that
   already holds a message when the socket closes (a room notice that arrived meanwhile, the
   user's own join notice when a client leaves at once) is never cancelled, so the channel
   stays subscribed for the life of the worker: 276 of 300 short-lived sockets in
   tests/test_faults.py's churn (django/channels_redis#276). Here a channel made by
   `new_channel` belongs to the task that made it (a consumer's application instance, the
   readiness probe's round trip): when that task ends, the channel is released, with any
   group memberships its owner left behind (a consumer that failed half-way).
2. While Redis is unreachable, unsubscribing raised. A consumer's `disconnect` discards its
   groups first, so the error skipped the rest (the session stayed open for good, a ghost in
   presence), and the channel was subscribed again when the connection came back (as was one
   whose unsubscribe was in flight when Redis went down). Here an unsubscribe that fails on a
   lost connection is complete (the server dropped the connection's subscriptions with it),
   and an unsubscribed channel is forgotten at once, so redis-py's reconnection does not
   subscribe it again.

3. After a Redis restart, the layer's subscriber connection (held by its PubSub, not taken
   from the pool per command, where redis-py replaces dead connections) is dead, and it is
   only read while it holds a subscription: on a worker without sockets nothing noticed, and
   the next sockets' SUBSCRIBEs failed (1011, their sessions left open). And redis-py's
   asyncio `PubSub` reconnects from whichever coroutine notices a lost connection (a
   command, or the receive loop's read, which even connects a disconnected connection by
   itself), so a command's reconnection handshake and the receive loop's read could wait on
   one stream at once (`RuntimeError: readuntil() called while another coroutine is
   already waiting`, the join failing with `SERVICE_UNAVAILABLE`). Here the subscriber
   connection has a pool of its own whose connections never reconnect inside redis-py, and
   this module reconnects it, always under the shard's lock: the receive loop passes that
   lock before each read (reconnecting first if the connection is down), and a SUBSCRIBE
   that finds the connection lost reconnects and is sent once more. A subscriber connection
   left idle (no subscription) is renewed before its next SUBSCRIBE: nothing read it, so
   nothing would have noticed it die. Reconnecting re-subscribes every channel and group the
   worker holds (redis-py's connect callback), then puts a `layer.resubscribed` event in
   every local channel's queue: pub/sub kept nothing of what was published while the worker
   was not subscribed, so each consumer tells its client to catch up (`resync`, protocol
   §15). The stock layer's own reconnect hooks are never called (stack notes #7). Publishes
   use the other pool, where a command that finds its connection lost is sent once more on a
   new one.

4. While Redis is unreachable, `new_channel` raised, before the consumer's `connect` could
   run: a socket opened during an outage got HTTP 500 at the handshake, with nothing to tell
   the client why. Here the channel is made at once and subscribed when it joins its first
   group: during the outage that join fails and the consumer closes the socket 4013 (service
   unavailable, retry), after telling the client so.

5. A channel's queue in the worker (`asyncio.Queue()`, filled by the shard's receive loop
   for every message published to the channel or to one of its groups) had no bound: a
   socket whose consumer fell behind its rooms grew the worker without limit. Here it is a
   `chat.layers.ChannelQueue` of `capacity` (`CHANNEL_LAYER_CAPACITY`), which overflows as
   the in-memory layer's does: queued messages dropped and counted, one `layer.overflow`
   event (serialized as the layer serializes every message) left for the consumer, which
   closes the socket 4009 (protocol §16).

6. Each publish took a pooled connection (with its wait timeout) and a round trip of its
   own: a restarting worker's leave notices and its rejoining sockets' notices, a busy
   room's messages, one at a time. Here the publishes of one event-loop turn go as one
   pipeline (chat.batching.TurnBatcher), in the order they were made, each sender still
   awaiting its own (so one sender's frames keep their order).

7. Each SUBSCRIBE and UNSUBSCRIBE was a command of its own, sent under the shard's lock: a
   join subscribes its own channel and usually its user's group, so a reconnect storm sent
   thousands, one send each. Here the (un)subscriptions asked before the batch takes the
   lock go as one SUBSCRIBE and one UNSUBSCRIBE, the last asked of a channel winning (a
   channel subscribed and released in one turn is not left subscribed); a channel already
   subscribed, with nothing pending for it, costs no wait at all.

After a lost connection, the receive loop reconnects within RECONNECT_DELAY and
re-subscribes every channel and group the worker holds: group memberships come back by
themselves (tests/test_faults.py measures how fast). Messages published while a
worker was not subscribed are not delivered (pub/sub has no backlog): its clients are told
to fetch them (`layer.resubscribed`, 3. above).

This module is the one adapter to the stock layer's private code (channels-redis 4.3.0,
pinned in requirements.txt; re-read these on every upgrade). It relies on:
`pubsub.RedisPubSubChannelLayer._get_layer`, `._layers`, `._args`, `._kwargs`;
`pubsub.RedisPubSubLoopLayer.channels` (channel -> its queue), `.groups` (a group's Redis
channel -> its local member channels), `._shards`, `._get_shard` and
`._subscribe_to_channel`; `pubsub.RedisSingleShardConnection.host`, `.channel_layer`,
`._redis`, `._pubsub`, `._lock`, `._subscribed_to`, `._receive_task`, `._ensure_redis`,
`._ensure_receiver`, `._do_receiving` (its receive loop, replaced here) and
`._receive_message`; `pubsub.decode_hosts`, `utils.create_pool`, `utils._close_redis` and
`utils._wrap_close`; and redis-py's `PubSub.channels`, `PubSub.connection`,
`PubSub._normalize_keys` and `PubSub.on_connect` (its connect callback, extended). No
public API exists for any of it: the channel layer specification (and channels'
`BaseChannelLayer`) covers only `send`, `receive`, `new_channel`,
`group_add`/`group_discard`/`group_send` and `flush`, and this layer (Beta in
channels-redis) takes no capacity, expiry or connection-retry settings and offers no hook
for how a channel's messages are queued or when a channel is released.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable

from channels_redis import pubsub
from channels_redis.utils import _close_redis, _wrap_close, create_pool
from redis import asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from chat.batching import TurnBatcher
from chat.layers import ChannelQueue, overflow_event, resubscribed_event
from chat.shared_state.redis import DRIVER_INFO

logger = logging.getLogger(__name__)

CONNECTION_LOST = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)
# Seconds between the receive loop's attempts to reconnect while Redis is unreachable.
RECONNECT_DELAY = 0.1
# Seconds a receive-loop read waits for a message before checking the connection again.
READ_TIMEOUT = 0.1


class ResubscribingPubSub(PubSub):
    """redis-py's PubSub, saying when it has subscribed again on a new connection (its
    connect callback, which every connection of it runs): whoever reconnected, this module
    or redis-py itself (a read that finds its connection lost reconnects before it raises)."""

    def __init__(self, *args, resubscribed: Callable[[], None], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._resubscribed = resubscribed

    async def on_connect(self, connection) -> None:
        again = bool(self.channels)  # (the first connection is made before any subscription)
        await super().on_connect(connection)
        if again:
            self._resubscribed()


# Seconds a command waits for one of the pool's connections before it fails.
PUBLISH_CONNECTION_WAIT = 10.0


def publishing_pool(host: dict, *, retry: Retry) -> aioredis.ConnectionPool:
    """The pool commands (publishes) are sent on: at most the host's `max_connections`, and
    a command finding them all busy waits for one. (redis-py's default pool opens a new
    connection for every concurrent command, then raises "Too many connections": a restart's
    burst of leave notices lost hundreds.) Hosts given otherwise than by `address`
    (sentinels) keep channels-redis' pool."""
    if "address" not in host:
        return create_pool({"retry": retry, **host})
    options = {key: value for key, value in host.items() if key != "address"}
    return aioredis.BlockingConnectionPool.from_url(
        host["address"],
        retry=retry,
        timeout=PUBLISH_CONNECTION_WAIT,
        driver_info=DRIVER_INFO,
        **options,
    )


async def _publish_all(client: aioredis.Redis, messages: list[tuple[str, bytes]]) -> list[None]:
    """These publishes in one pipeline, in order (not a transaction)."""
    async with client.pipeline(transaction=False) as pipe:
        for channel, message in messages:
            pipe.publish(channel, message)
        await pipe.execute()
    return [None] * len(messages)


class RedisSingleShardConnection(pubsub.RedisSingleShardConnection):
    _subscriber: aioredis.Redis | None = None
    _publishes: TurnBatcher[None, tuple[str, bytes], None]

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # (un)subscriptions asked, not sent yet: channel -> subscribe (7.)
        self._changes: dict[str, bool] = {}
        # their callers' outcomes, by kind (None: nothing asked)
        self._changed: dict[bool, asyncio.Future] | None = None
        self._changing: set[asyncio.Task] = set()

    def _ensure_redis(self) -> None:
        if self._redis is None:
            # Publishing: a command whose connection turns out to be lost is sent once more
            # on a new one (redis-py's default retries three times, with backoff).
            retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
            self._redis = aioredis.Redis(connection_pool=publishing_pool(self.host, retry=retry))
            client = self._redis
            self._publishes = TurnBatcher(run=lambda _, messages: _publish_all(client, messages))
            # Subscribing: never reconnected inside redis-py (3. in the module docstring).
            no_retry = Retry(NoBackoff(), 0)
            self._subscriber = aioredis.Redis(
                connection_pool=create_pool(
                    {"retry": no_retry, "driver_info": DRIVER_INFO, **self.host}
                )
            )
            self._pubsub = ResubscribingPubSub(
                self._subscriber.connection_pool, resubscribed=self.channel_layer.resubscribed
            )

    async def _reconnect(self) -> None:
        """A new subscriber connection, re-subscribed to everything the worker holds (under
        the lock; raises while Redis is unreachable)."""
        connection = self._pubsub.connection
        if connection is not None:
            await connection.disconnect()
        await self._pubsub.connect()

    async def subscribe(self, channel: str) -> None:
        if channel in self._subscribed_to and channel not in self._changes:
            return
        await self._change(channel, subscribe=True)

    async def unsubscribe(self, channel: str) -> None:
        if channel not in self._subscribed_to and channel not in self._changes:
            return
        await self._change(channel, subscribe=False)

    # --- subscription changes, batched per turn (7. in the module docstring) ---------------

    def _change(self, channel: str, *, subscribe: bool) -> Awaitable[None]:
        """Ask for a (un)subscription: those asked before the batch takes the lock go
        together, the last asked of a channel winning; each caller gets the outcome of its
        own kind's command."""
        loop = asyncio.get_running_loop()
        if self._changed is None:
            self._changes = {}
            self._changed = {True: loop.create_future(), False: loop.create_future()}
            for future in self._changed.values():
                # (retrieved here: a caller gone meanwhile leaves no unretrieved error)
                future.add_done_callback(lambda done: done.cancelled() or done.exception())
            task = loop.create_task(self._apply_changes())
            self._changing.add(task)
            task.add_done_callback(self._changing.discard)
        self._changes.pop(channel, None)  # (order kept: the last asked goes last)
        self._changes[channel] = subscribe
        return asyncio.shield(self._changed[subscribe])

    async def _apply_changes(self) -> None:
        async with self._lock:
            changes, changed = self._changes, self._changed
            self._changes, self._changed = {}, None
            assert changed is not None
            wanted = [c for c, sub in changes.items() if sub and c not in self._subscribed_to]
            unwanted = [c for c, sub in changes.items() if not sub and c in self._subscribed_to]
            try:
                await self._subscribe_all(wanted)
            except Exception as exc:
                changed[True].set_exception(exc)
            else:
                changed[True].set_result(None)
            try:
                await self._unsubscribe_all(unwanted)
            except Exception as exc:
                changed[False].set_exception(exc)
            else:
                changed[False].set_result(None)

    async def _subscribe_all(self, channels: list[str]) -> None:
        """Under the lock: one SUBSCRIBE for these channels."""
        if not channels:
            return
        self._ensure_redis()
        self._ensure_receiver()
        if not self._pubsub.subscribed and self._pubsub.connection is not None:
            await self._pubsub.connection.disconnect()  # idle: renewed (3.)
        try:
            await self._pubsub.subscribe(*channels)
        except CONNECTION_LOST as lost:
            logger.info("subscriber connection lost (%r): reconnecting", lost)
            await self._reconnect()
            await self._pubsub.subscribe(*channels)
        self._subscribed_to.update(channels)

    async def _unsubscribe_all(self, channels: list[str]) -> None:
        """Under the lock: one UNSUBSCRIBE for these channels."""
        if not channels:
            return
        self._ensure_redis()
        self._ensure_receiver()
        try:
            await self._pubsub.unsubscribe(*channels)
        except CONNECTION_LOST as lost:
            # No connection, no subscription.
            logger.info("unsubscribed %d with the connection lost (%r)", len(channels), lost)
        # Forget them now, not when Redis confirms: redis-py's PubSub keeps a channel until
        # the confirmation is read, and a reconnection meanwhile (Redis restarted, the
        # connection lost) would subscribe it again, for good. (Their messages, if any
        # still come, are dropped: no local channel or group has those names.)
        for key in self._pubsub._normalize_keys(dict.fromkeys(channels)):
            self._pubsub.channels.pop(key, None)
        self._subscribed_to.difference_update(channels)

    async def _do_receiving(self) -> None:
        """Read what Redis publishes to this worker's subscriptions, reconnecting (under the
        lock) when the connection is lost. Between passing the lock and the read nothing
        yields, so no command's reconnection shares the read's stream."""
        while True:
            try:
                pubsub = self._pubsub
                if pubsub is None or not pubsub.subscribed:
                    await asyncio.sleep(READ_TIMEOUT)
                    continue
                async with self._lock:
                    if pubsub is not self._pubsub or not pubsub.subscribed:  # changed meanwhile
                        continue
                    if pubsub.connection is None or not pubsub.connection.is_connected:
                        await self._reconnect()
                message = await pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=READ_TIMEOUT
                )
                self._receive_message(message)
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except CONNECTION_LOST as lost:
                logger.debug("subscriber connection lost (%r): reconnecting", lost)
                await asyncio.sleep(RECONNECT_DELAY)
            except Exception:
                logger.exception("unexpected exception in the channel layer's receive loop")
                await asyncio.sleep(1)

    async def flush(self) -> None:
        await super().flush()
        if self._subscriber is not None:
            await _close_redis(self._subscriber)
            self._subscriber = None

    async def publish(self, channel: str, message: bytes) -> None:
        """Without the shard's lock, batched per turn (6. in the module docstring): a turn's
        publishes go out as one pipeline on one of the pool's connections while the previous
        turn's may still be in flight on another. (With the lock, every broadcast of a worker
        waited for the previous one's round trip, one step per event-loop turn: a busy worker
        published a few hundred messages per second whatever its CPU.) Each sender still
        awaits its own publish, so one sender's frames keep their order."""
        self._ensure_redis()
        await self._publishes.submit(None, (channel, message))

    def _receive_message(self, message: dict | None) -> None:
        """One pub/sub message to its channel's queue, or to each local member's of its
        group, through the bounded queue (5. in the module docstring)."""
        if message is None:
            return
        name = message["channel"]
        if isinstance(name, bytes):
            name = name.decode()
        queues = self.channel_layer.channels
        if name in queues:
            queues[name].offer(message["data"])
        elif name in self.channel_layer.groups:
            for channel in self.channel_layer.groups[name]:
                queue = queues.get(channel)
                if queue is not None:
                    queue.offer(message["data"])


class RedisPubSubLoopLayer(pubsub.RedisPubSubLoopLayer):
    def __init__(self, hosts=None, *args, capacity: int = 100, **kwargs):
        super().__init__(hosts, *args, **kwargs)
        self.capacity = capacity
        self._shards = [
            RedisSingleShardConnection(host, self) for host in pubsub.decode_hosts(hosts)
        ]
        # channel -> the groups it was added to (released with the channel)
        self._memberships: dict[str, set[str]] = {}
        # channels made while Redis was unreachable, not subscribed yet (4.)
        self._unsubscribed: set[str] = set()
        self._releasing: set[asyncio.Task] = set()
        # channels made by new_channel, released when the task that made them ends (1.)
        self._owned: set[str] = set()
        # False once the worker is stopping: its subscriptions end with its connection.
        self._unsubscribing = True

    async def new_channel(self, prefix: str = "specific.") -> str:
        channel = f"{self.prefix}{prefix}{uuid.uuid4().hex}"
        try:
            await self._subscribe_to_channel(channel)
        except CONNECTION_LOST as lost:
            # See 4. in the module docstring: the channel is made, its subscription waits.
            logger.info("channel %s made with Redis unreachable (%r)", channel, lost)
            self._unsubscribed.add(channel)
        except BaseException:
            self.channels.pop(channel, None)
            raise
        owner = asyncio.current_task()
        if owner is not None:
            self._owned.add(channel)
            owner.add_done_callback(lambda _: self._release_soon(channel))
        return channel

    async def receive(self, channel: str) -> dict:
        """The stock `receive` unsubscribes its channel when it is cancelled, one UNSUBSCRIBE
        per socket, awaited under the shard's lock, in the cancellation itself (a stopping
        worker's thousands of sockets logged a traceback each when that wait was cancelled in
        turn). A channel made by `new_channel` is released with its owner (1. in the module
        docstring); any other, as the stock layer does, when its receive is cancelled."""
        if channel not in self.channels:
            await self._subscribe_to_channel(channel)
        try:
            message = await self.channels[channel].get()
        except (asyncio.CancelledError, GeneratorExit):
            if channel not in self._owned:
                self._release_soon(channel)
            raise
        return self.channel_layer.deserialize(message)

    async def _subscribe_to_channel(self, channel: str) -> None:
        self.channels[channel] = ChannelQueue(channel, self.capacity, self._overflow_item)
        await self._get_shard(channel).subscribe(channel)

    def _overflow_item(self) -> bytes:
        return self.channel_layer.serialize(overflow_event())

    def resubscribed(self) -> None:
        """Tell every local channel's consumer that the layer subscribed again after losing
        its connection (3. in the module docstring)."""
        item = self.channel_layer.serialize(resubscribed_event())
        for queue in list(self.channels.values()):
            queue.offer(item)
        logger.info("channel layer subscribed again: %d sockets told to resync", len(self.channels))

    async def group_add(self, group: str, channel: str) -> None:
        if channel in self._unsubscribed:
            await self._get_shard(channel).subscribe(channel)  # raises while Redis is down
            self._unsubscribed.discard(channel)
        if channel in self.channels:  # (the stock layer refuses any other)
            self._memberships.setdefault(channel, set()).add(group)
        await super().group_add(group, channel)

    async def group_discard(self, group: str, channel: str) -> None:
        self._memberships.get(channel, set()).discard(group)
        await super().group_discard(group, channel)

    def _release_soon(self, channel: str) -> None:
        """The channel's owner has ended: nothing will receive from it again."""
        self.channels.pop(channel, None)
        self._unsubscribed.discard(channel)
        self._owned.discard(channel)
        groups = self._memberships.pop(channel, set())
        if not self._unsubscribing:
            return
        try:
            task = asyncio.get_running_loop().create_task(self._release(channel, groups))
        except RuntimeError:  # the loop is closing: its connections go with it
            return
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _release(self, channel: str, groups: set[str]) -> None:
        try:
            for group in groups:
                await super().group_discard(group, channel)
            await self._get_shard(channel).unsubscribe(channel)
        except Exception:
            logger.warning("could not release channel %s", channel, exc_info=True)


class RedisPubSubChannelLayer(pubsub.RedisPubSubChannelLayer):
    def worker_stopping(self) -> None:
        """This worker is stopping: its sockets' channels are forgotten as they close, not
        unsubscribed one by one (an UNSUBSCRIBE per socket, each waiting for the shard's
        lock, while thousands close at once); the subscriber connection's end ends them."""
        self._get_layer()._unsubscribing = False

    def _get_layer(self) -> RedisPubSubLoopLayer:
        loop = asyncio.get_running_loop()
        try:
            return self._layers[loop]
        except KeyError:
            layer = RedisPubSubLoopLayer(*self._args, **self._kwargs, channel_layer=self)
            self._layers[loop] = layer
            _wrap_close(self, loop)
            return layer
