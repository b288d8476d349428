"""Overload made visible: a worker that cannot keep up says so in its metrics and its log.

Two symptoms cover the ways a worker falls behind: its event loop runs late (CPU: frames,
deliveries and joins queue up behind each other), or messages wait to be stored (the
database: each is broadcast only once committed). Neither loses anything by itself, so
without this an overloaded worker would only be slow, silently.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable

from django.conf import settings

from chat.metrics import LOOP_LAG, OVERLOADED, WRITER_BACKLOG

logger = logging.getLogger(__name__)

# At most one warning per this many seconds while the overload lasts.
WARNING_EVERY = 10.0


async def watch_overload(*, store_backlog: Callable[[], int], interval: float = 0.5) -> None:
    """Every `interval`: how late the loop woke, how many messages wait to be stored."""
    loop = asyncio.get_running_loop()
    warned_at = -math.inf
    while True:
        started = loop.time()
        await asyncio.sleep(interval)
        lag = max(loop.time() - started - interval, 0.0)
        backlog = store_backlog()
        LOOP_LAG.observe(lag)
        WRITER_BACKLOG.set(backlog)
        if lag <= settings.CHAT_OVERLOAD_LAG and backlog <= settings.CHAT_OVERLOAD_BACKLOG:
            continue
        OVERLOADED.inc()
        if loop.time() - warned_at >= WARNING_EVERY:
            warned_at = loop.time()
            logger.warning(
                "worker overloaded: event loop %.0f ms late, %d messages waiting to be stored",
                lag * 1000,
                backlog,
            )
