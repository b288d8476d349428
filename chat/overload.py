"""Overload made visible: a worker that cannot keep up says so in its metrics and its log.

Three symptoms cover the ways a worker falls behind: its event loop runs late (CPU: frames,
deliveries and joins queue up behind each other), messages wait to be stored (the
database: each is broadcast only once committed), or room frames reach its sockets late
(queueing anywhere on the way: the sender's pipeline, the channel layer, Redis). Neither
loses anything by itself, so without this an overloaded worker would only be slow,
silently.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

from django.conf import settings

from chat.metrics import DELIVERY_DELAY, LOOP_LAG, LOOP_LAG_MAX, OVERLOADED, WRITER_BACKLOG

logger = logging.getLogger(__name__)

# At most one warning per this many seconds while the overload lasts.
WARNING_EVERY = 10.0


class DeliveryDelays:
    """The longest delay, since the last look, between a room frame's broadcast and its
    delivery to a socket of this worker: queueing anywhere between two sockets (the sender's
    pipeline, the channel layer, Redis, the receiving worker) shows here."""

    def __init__(self) -> None:
        self.longest = 0.0

    def delivered(self, *, sent_at: float) -> None:
        delay = time.time() - sent_at
        if delay > self.longest:
            self.longest = delay

    def take(self) -> float:
        longest, self.longest = self.longest, 0.0
        return longest


class OverloadWatch:
    """One worker's overload check, one look per tick, given how late the tick is and when
    it is (`watch_overload` ticks it on the running loop): the decision without the timing."""

    def __init__(self, *, store_backlog: Callable[[], int], delays: DeliveryDelays) -> None:
        self.store_backlog = store_backlog
        self.delays = delays
        self.warned_at = -math.inf
        self.longest_lag = 0.0

    def tick(self, *, lag: float, now: float) -> bool:
        """One look: `lag` is how late this tick's timer woke, `now` the monotonic time.
        Records the metrics; whether the worker is overloaded."""
        backlog = self.store_backlog()
        delay = self.delays.take()
        LOOP_LAG.observe(lag)
        if lag > self.longest_lag:
            self.longest_lag = lag
            LOOP_LAG_MAX.set(lag)
        WRITER_BACKLOG.set(backlog)
        DELIVERY_DELAY.observe(delay)
        limit = settings.CHAT_OVERLOAD_LAG
        if lag <= limit and delay <= limit and backlog <= settings.CHAT_OVERLOAD_BACKLOG:
            return False
        OVERLOADED.inc()
        if now - self.warned_at >= WARNING_EVERY:
            self.warned_at = now
            logger.warning(
                "worker overloaded: event loop %.0f ms late, room frames delivered up to "
                "%.0f ms late, %d messages waiting to be stored",
                lag * 1000,
                delay * 1000,
                backlog,
            )
        return True


async def watch_overload(
    *, store_backlog: Callable[[], int], delays: DeliveryDelays, interval: float = 0.5
) -> None:
    """Every `interval`: how late the loop woke, how many messages wait to be stored, how
    late room frames were delivered."""
    watch = OverloadWatch(store_backlog=store_backlog, delays=delays)
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        await asyncio.sleep(interval)
        now = loop.time()
        watch.tick(lag=max(now - started - interval, 0.0), now=now)
