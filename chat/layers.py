"""The one-process channel layer (the embedded default), made cheap on the fan-out path and
loud when it drops.

channels' `InMemoryChannelLayer` scans every channel and every group membership on each
`receive` and `group_send` (O(connections) per frame), starts one task per member for a
`group_send`, deep-copies the event for every member, and swallows `ChannelFull` silently.
This subclass keeps its semantics (capacity, expiry, group expiry) but expires at most once
per `clean_interval` seconds, enqueues group members in a plain loop, gives each member a
shallow copy (room events hold only immutable values), and counts and logs every message it
drops for a full channel (`clarity_layer_dropped_total`).
"""

from __future__ import annotations

import asyncio
import logging
import time

from channels.exceptions import ChannelFull
from channels.layers import InMemoryChannelLayer as StockInMemoryChannelLayer

from chat.metrics import LAYER_DROPPED

logger = logging.getLogger(__name__)


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

    def _enqueue(self, channel: str, message: dict) -> None:
        queue = self.channels.get(channel)
        if queue is None:
            queue = self.channels[channel] = asyncio.Queue(maxsize=self.get_capacity(channel))
        try:
            queue.put_nowait((time.time() + self.expiry, dict(message)))
        except asyncio.QueueFull:
            raise ChannelFull(channel) from None

    async def send(self, channel: str, message: dict) -> None:
        assert isinstance(message, dict), "message is not a dict"
        self.require_valid_channel_name(channel)
        assert "__asgi_channel__" not in message
        self._enqueue(channel, message)

    async def group_send(self, group: str, message: dict) -> None:
        assert isinstance(message, dict), "message is not a dict"
        self.require_valid_group_name(group)
        self._clean_expired()
        dropped = 0
        for channel in list(self.groups.get(group, ())):
            try:
                self._enqueue(channel, message)
            except ChannelFull:
                dropped += 1
        if dropped:
            LAYER_DROPPED.inc(dropped)
            logger.warning(
                "channel layer full: %d of group %s's members missed a %s event (capacity %d)",
                dropped,
                group,
                message.get("type"),
                self.capacity,
            )
