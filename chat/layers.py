"""Bounded channel queues that overflow visibly, and the one-process channel layer (the
embedded default), made cheap on the fan-out path.

A channel (one per socket) queues at most the layer's capacity (`CHANNEL_LAYER_CAPACITY`).
A message that finds the queue full *overflows* the channel: the queued messages are
dropped (their memory freed) and one `layer.overflow` event takes their place, which the
consumer answers with `SLOW_CONSUMER` and close 4009 `Client too slow` (protocol §16; the
client reconnects and asks for `history` after what it has). Until that event is read, every
further message for the channel is dropped too, so the queue never grows past its capacity.
Each overflow is counted (`clarity_layer_overflows_total`) and logged once; each dropped
message is counted (`clarity_layer_dropped_total`).

Sending never fails because a receiver is slow: `send` to a full channel overflows it like
`group_send` does (channels' layers raise `ChannelFull` to the sender from `send`, and
swallow it silently in `group_send`). The sender, whichever consumer or request it is, goes
on; the slow receiver is closed. `ChannelQueue` is that queue, here and in the Redis layer
(chat/pubsub.py).

channels' `InMemoryChannelLayer` also scans every channel and every group membership on each
`receive` and `group_send` (O(connections) per frame), starts one task per member for a
`group_send`, and deep-copies the event for every member. This subclass keeps its semantics
(expiry, group expiry) but expires at most once per `clean_interval` seconds, enqueues group
members in a plain loop and gives each member a shallow copy (room events hold only
immutable values).

With chat/pubsub.py, this module is an adapter to other packages' private code, for want of
a public hook (the channel layer specification covers only send, receive, groups and flush;
it says nothing of how a channel's messages are queued): channels' `InMemoryChannelLayer`
keeps its queues in `channels` and its memberships in `groups`, and its expiry scan in
`_clean_expired` (overridden here); `ChannelQueue` overrides `asyncio.Queue._get`, the hook
the standard library's own `PriorityQueue` and `LifoQueue` override. Re-read them on every
upgrade of channels (pinned in requirements.txt).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from channels.layers import InMemoryChannelLayer as StockInMemoryChannelLayer

from chat.metrics import LAYER_DROPPED, LAYER_OVERFLOWS

logger = logging.getLogger(__name__)

OVERFLOW_EVENT_TYPE = "layer.overflow"
RESUBSCRIBED_EVENT_TYPE = "layer.resubscribed"


def overflow_event() -> dict:
    """The event an overflowed channel's consumer receives (its `layer_overflow` handler)."""
    return {"type": OVERFLOW_EVENT_TYPE}


def resubscribed_event() -> dict:
    """The event each of a worker's consumers receives when the worker's channel layer has
    subscribed again after losing its connection (its `layer_resubscribed` handler): what
    was published meanwhile did not reach it (protocol §15, chat/pubsub.py)."""
    return {"type": RESUBSCRIBED_EVENT_TYPE}


class ChannelQueue(asyncio.Queue):
    """One channel's queue: at most `capacity` items, overflowing when full (see the module
    docstring). `overflow_item` makes the overflow event in the form this layer queues
    (an in-memory layer's `(expires, event)`, the Redis layer's serialized bytes)."""

    def __init__(self, channel: str, capacity: int, overflow_item: Callable[[], Any]) -> None:
        super().__init__(maxsize=capacity)
        self.channel = channel
        self.overflow_item = overflow_item
        self.overflowed = False

    def offer(self, item: Any) -> None:
        """Queue `item`, or overflow the channel. Never blocks, never raises."""
        if self.overflowed:
            LAYER_DROPPED.inc()
            return
        if not self.full():
            self.put_nowait(item)
            return
        dropped = self.qsize() + 1
        while not self.empty():
            self.get_nowait()
        self.put_nowait(self.overflow_item())
        self.overflowed = True
        LAYER_OVERFLOWS.inc()
        LAYER_DROPPED.inc(dropped)
        logger.warning(
            "channel layer: %s full (capacity %d), %d messages dropped; its socket is closed "
            "4009 (Client too slow)",
            self.channel,
            self.maxsize,
            dropped,
        )

    def _get(self) -> Any:
        # Whatever is read from an overflowed queue is its overflow event (nothing is queued
        # after it): from now on the channel takes messages again.
        self.overflowed = False
        return super()._get()


class InMemoryChannelLayer(StockInMemoryChannelLayer):
    def __init__(self, *, clean_interval: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.clean_interval = clean_interval
        self.next_clean = 0.0

    def _clean_expired(self) -> None:
        now = time.monotonic()
        if now < self.next_clean:
            return
        self.next_clean = now + self.clean_interval
        super()._clean_expired()

    def _queue(self, channel: str) -> ChannelQueue:
        queue = self.channels.get(channel)
        if queue is None:
            queue = self.channels[channel] = ChannelQueue(
                channel, self.get_capacity(channel), self._overflow_item
            )
        return queue

    def _overflow_item(self) -> tuple[float, dict]:
        return time.time() + self.expiry, overflow_event()

    async def send(self, channel: str, message: dict) -> None:
        assert isinstance(message, dict), "message is not a dict"
        self.require_valid_channel_name(channel)
        assert "__asgi_channel__" not in message
        self._queue(channel).offer((time.time() + self.expiry, dict(message)))

    async def receive(self, channel: str) -> dict:
        self.require_valid_channel_name(channel)
        self._clean_expired()
        queue = self._queue(channel)
        try:
            _, message = await queue.get()
        finally:
            if queue.empty() and self.channels.get(channel) is queue:
                del self.channels[channel]
        return message

    async def group_send(self, group: str, message: dict) -> None:
        assert isinstance(message, dict), "message is not a dict"
        self.require_valid_group_name(group)
        self._clean_expired()
        expires = time.time() + self.expiry
        for channel in list(self.groups.get(group, ())):
            self._queue(channel).offer((expires, dict(message)))
