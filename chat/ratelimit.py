"""Per-user frame rate limiting shared by every socket and worker, through the Django cache.

In the manner of Zulip's rate limiter: the rule is data, the answer is `(limited,
retry_after)`. The window is rolling, estimated from two fixed windows (the current count
plus the previous window's count weighted by how much of it still overlaps), so each frame
costs one atomic increment. Frames refused by the limit are not counted against it (as the
original), but they are counted towards the abuse threshold that closes the socket.

On Redis (the workers' shared cache) that increment is one script round trip made on the
event loop, with no thread (chat/cache.py says why); on local memory it runs inline.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from dataclasses import dataclass

from django.core.cache import caches
from django.core.cache.backends.base import BaseCache
from django.core.cache.backends.locmem import LocMemCache
from redis.exceptions import NoScriptError

from chat.cache import RedisCache

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rule:
    seconds: int
    max_requests: int
    # More than max_requests * close_factor frames in one window is abuse: close the socket.
    close_factor: int = 3


@dataclass(frozen=True)
class Verdict:
    limited: bool
    retry_after: int = 0
    abusive: bool = False


# One round trip, one command: add to the counter, give it its TTL if it has none (so a
# counter always expires ttl seconds after its creation), and read the other counter.
_INCR_SCRIPT = """
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2], 'NX')
local other = 0
if #KEYS > 1 then other = tonumber(redis.call('GET', KEYS[2]) or 0) or 0 end
return {value, other}
"""
_INCR_SHA = hashlib.sha1(_INCR_SCRIPT.encode()).hexdigest()


async def _incr(key: str, delta: int, ttl: int, *, also_read: str | None = None) -> tuple[int, int]:
    """Atomically add delta to a counter that expires ttl seconds after its creation; also
    read the counter `also_read` (0 if absent) in the same round trip."""
    cache = caches["default"]
    if isinstance(cache, RedisCache):
        keys = [cache.make_and_validate_key(key)]
        if also_read is not None:
            keys.append(cache.make_and_validate_key(also_read))
        client = cache.async_client()
        try:
            value, other = await client.evalsha(_INCR_SHA, len(keys), *keys, delta, ttl)
        except NoScriptError:  # a new or flushed Redis: load it once
            value, other = await client.eval(_INCR_SCRIPT, len(keys), *keys, delta, ttl)
        return int(value), int(other)
    if isinstance(cache, LocMemCache):  # in-process, no I/O: a few microseconds inline
        return _incr_django(cache, key, delta, ttl, also_read=also_read)
    return await asyncio.to_thread(_incr_django, cache, key, delta, ttl, also_read=also_read)


def _incr_django(
    cache: BaseCache, key: str, delta: int, ttl: int, *, also_read: str | None
) -> tuple[int, int]:
    """`_incr` on any Django cache (atomic where its `add` and `incr` are)."""
    cache.add(key, 0, ttl)
    try:
        value = cache.incr(key, delta)
    except ValueError:  # expired between add and incr
        cache.add(key, 0, ttl)
        value = cache.incr(key, delta)
    return value, (cache.get(also_read) or 0) if also_read is not None else 0


def _retry_after(*, rule: Rule, previous: int, current: int, elapsed: float) -> int:
    """Seconds until one more frame would fit under the rolling estimate."""
    seconds, limit = rule.seconds, rule.max_requests
    if current + 1 <= limit and previous > 0:
        wait = seconds * (1 - (limit - current - 1) / previous) - elapsed
    else:
        # Only once this window is over, and its own weight has decayed enough.
        decay = seconds * (1 - (limit - 1) / current) if current > 0 else 0.0
        wait = (seconds - elapsed) + max(decay, 0.0)
    return max(1, math.ceil(wait))


async def rate_limit_hit(*, key: str, rule: Rule, now: float | None = None) -> Verdict:
    """Count one frame for `key` and say whether it is over the rule."""
    now = time.time() if now is None else now
    window = int(now // rule.seconds)
    elapsed = now - window * rule.seconds
    ttl = rule.seconds * 2 + 1
    accepted_key = f"rl:{key}:{window}"
    current, previous = await _incr(accepted_key, 1, ttl, also_read=f"rl:{key}:{window - 1}")
    estimate = previous * (1 - elapsed / rule.seconds) + current
    if estimate <= rule.max_requests:
        return Verdict(limited=False)
    current, _ = await _incr(accepted_key, -1, ttl)
    refused, _ = await _incr(f"rl:{key}:{window}:refused", 1, ttl)
    return Verdict(
        limited=True,
        retry_after=_retry_after(rule=rule, previous=previous, current=current, elapsed=elapsed),
        abusive=current + refused > rule.max_requests * rule.close_factor,
    )
