"""Shared state in Redis: every worker process sees the same keys (`REDIS_URL` set).

Keys live under `<REDIS_PREFIX>:state:`. Values are stored as JSON (a counter's value is
Redis's own integer, which reads back as JSON too). Expiries are Redis's, in milliseconds.

Two clients over the same server, each with a blocking pool (a burst of callers waits for a
free connection, up to `socket_timeout`, instead of failing with "Too many connections";
redis-py's asyncio pool raises at its limit by default, stack notes #2):
- a `redis.Redis` for the synchronous operations (called from threads);
- a `redis.asyncio.Redis` per event loop for `acount`, the one round trip on every chat
  frame. From the event loop a synchronous call needs a thread, and a thread that must take
  the GIL back from a busy loop waits up to the interpreter's switch interval (5 ms) each
  time, several times per call. The counts of one event-loop turn go as one pipeline
  (chat.batching.TurnBatcher): a reconnect storm counts three per join (connection attempts
  by address and by user, the history page's bytes), and each lone call took a pooled
  connection, its timeout and its reply parsing (a seventh of a restarting worker's time).
A pooled connection found dead (Redis restarted while it sat idle) is retried once on a new
one; a timeout is not retried (the command may have run). Other failures reach the caller
(redis-py's exceptions): the rate limiter, the reaper and the breaker each say what they do
then.

Only redis-py's public API is used.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import weakref
from collections.abc import Iterable, Mapping

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.driver_info import DriverInfo
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.retry import Retry

from chat.batching import TurnBatcher
from chat.shared_state.base import SharedState, Value

# Add to the counter, give it its TTL if it has none (so a counter expires ttl after its
# creation however often it is counted), and read the other counter: one command.
COUNT_SCRIPT = """
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
if tonumber(ARGV[2]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2], 'NX') end
local other = 0
if #KEYS > 1 then other = tonumber(redis.call('GET', KEYS[2]) or 0) or 0 end
return {value, other}
"""
COUNT_SHA = hashlib.sha1(COUNT_SCRIPT.encode()).hexdigest()

# What a count is: the script's keys and arguments.
CountCall = tuple[list[str], list[int]]

# What every connection tells Redis it is (CLIENT SETINFO), made once: redis-py otherwise
# looks its own version up in the installed package's metadata for every new connection
# (milliseconds each, a burst of them when a restarted worker fills its pools).
DRIVER_INFO = DriverInfo()

# Per event loop and process: at most this many connections (callers wait for one).
MAX_CONNECTIONS = 50
# Seconds: fail fast rather than stall a worker when Redis is unreachable.
SOCKET_TIMEOUT = 5.0
CONNECT_TIMEOUT = 2.0


def _millis(ttl: float | None) -> int | None:
    return None if ttl is None else max(1, math.ceil(ttl * 1000))


async def _counts(
    client: redis.asyncio.Redis, calls: list[CountCall]
) -> list[tuple[int, int] | Exception]:
    """Run these counts in one pipeline (not a transaction: each is atomic on its own); the
    script is loaded once if Redis does not have it (restarted, or flushed), and the counts
    it refused run again (a refused EVALSHA did nothing)."""
    outcomes: list[tuple[int, int] | Exception | None] = [None] * len(calls)
    todo = list(range(len(calls)))
    for attempt in range(2):
        async with client.pipeline(transaction=False) as pipe:
            for index in todo:
                keys, args = calls[index]
                pipe.evalsha(COUNT_SHA, len(keys), *keys, *args)
            replies = await pipe.execute(raise_on_error=False)
        missing = []
        for index, reply in zip(todo, replies, strict=True):
            if isinstance(reply, NoScriptError) and attempt == 0:
                missing.append(index)
            elif isinstance(reply, Exception):
                outcomes[index] = reply
            else:
                outcomes[index] = (int(reply[0]), int(reply[1]))
        if not missing:
            break
        await client.script_load(COUNT_SCRIPT)
        todo = missing
    return outcomes  # type: ignore[return-value]


class RedisState(SharedState):
    shared = True

    def __init__(self, *, url: str, prefix: str) -> None:
        self.url = url
        self.prefix = f"{prefix}:state:"
        self.options = {
            "max_connections": MAX_CONNECTIONS,
            "timeout": SOCKET_TIMEOUT,
            "socket_timeout": SOCKET_TIMEOUT,
            "socket_connect_timeout": CONNECT_TIMEOUT,
            "driver_info": DRIVER_INFO,
        }
        self.client = redis.Redis(
            connection_pool=redis.BlockingConnectionPool.from_url(
                url,
                retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
                **self.options,
            )
        )
        self.count_script = self.client.register_script(COUNT_SCRIPT)
        # One asyncio client and its batcher of counts per event loop (they die with it).
        self.loop_counts: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, TurnBatcher[None, CountCall, tuple[int, int]]
        ] = weakref.WeakKeyDictionary()

    def key(self, key: str) -> str:
        return self.prefix + key

    def _loop_counts(self) -> TurnBatcher[None, CountCall, tuple[int, int]]:
        """The running loop's batcher of counts, on its own client."""
        loop = asyncio.get_running_loop()
        found = self.loop_counts.get(loop)
        if found is None:
            client = redis.asyncio.Redis(
                connection_pool=redis.asyncio.BlockingConnectionPool.from_url(
                    self.url,
                    retry=AsyncRetry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
                    **self.options,
                )
            )

            async def run(_: None, calls: list[CountCall]) -> list[tuple[int, int] | Exception]:
                return await _counts(client, calls)

            found = self.loop_counts[loop] = TurnBatcher(run=run)
        return found

    def _count_args(
        self, key: str, delta: int, ttl: float | None, also_read: str | None
    ) -> tuple[list[str], list[int]]:
        keys = [self.key(key)] if also_read is None else [self.key(key), self.key(also_read)]
        return keys, [delta, _millis(ttl) or 0]

    def count(
        self, key: str, delta: int, *, ttl: float | None, also_read: str | None = None
    ) -> tuple[int, int]:
        keys, args = self._count_args(key, delta, ttl, also_read)
        value, other = self.count_script(keys=keys, args=args)
        return int(value), int(other)

    async def acount(
        self, key: str, delta: int, *, ttl: float | None, also_read: str | None = None
    ) -> tuple[int, int]:
        return await self._loop_counts().submit(None, self._count_args(key, delta, ttl, also_read))

    def add(self, key: str, value: Value, *, ttl: float | None) -> bool:
        return bool(self.client.set(self.key(key), json.dumps(value), px=_millis(ttl), nx=True))

    def add_many(self, entries: Mapping[str, tuple[Value, float | None]]) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            for key, (value, ttl) in entries.items():
                pipe.set(self.key(key), json.dumps(value), px=_millis(ttl), nx=True)
            pipe.execute()

    def get_many(self, keys: Iterable[str]) -> dict[str, Value]:
        keys = list(keys)
        if not keys:
            return {}
        values = self.client.mget([self.key(key) for key in keys])
        return {
            key: json.loads(value)
            for key, value in zip(keys, values, strict=True)
            if value is not None
        }

    def set(self, key: str, value: Value, *, ttl: float | None) -> None:
        self.client.set(self.key(key), json.dumps(value), px=_millis(ttl))

    def delete_many(self, keys: Iterable[str]) -> None:
        names = [self.key(key) for key in keys]
        if names:
            self.client.delete(*names)

    def expires_in(self, key: str) -> float | None:
        millis = self.client.pttl(self.key(key))
        if millis == -2:
            raise KeyError(key)
        return None if millis == -1 else millis / 1000

    def clear(self) -> None:
        names = list(self.client.scan_iter(match=self.prefix + "*", count=1000))
        for start in range(0, len(names), 1000):
            self.client.delete(*names[start : start + 1000])
