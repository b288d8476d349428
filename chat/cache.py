"""Django's Redis cache with one connection pool per process, and an asyncio client for the
round trips made from the event loop.

`caches["default"]` is a separate cache object in every thread and async context (Django's
cache handler is context-local), and Django's Redis client keeps its connection pool on that
object, so each socket's context opened Redis connections of its own: a TCP connect and a
health check for nearly every rate-limit check (a fifth of a worker's time under load). Here
every cache object of the process draws on the same pool per server and options.

Django's cache API is synchronous: from the event loop each call needs a thread, and a thread
that must take the GIL back from a busy event loop waits up to the interpreter's switch
interval (5 ms) each time it does, several times per call. `async_client()` gives a
`redis.asyncio` client on the running loop instead (one pool per event loop and server), for
the one round trip on every chat frame (chat/ratelimit.py).
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from functools import cached_property
from typing import Any, ClassVar

import redis.asyncio
from django.core.cache.backends.redis import RedisCache as DjangoRedisCache
from django.core.cache.backends.redis import RedisCacheClient
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError


def _pool_key(server: str, options: dict[str, Any]) -> tuple[str, str]:
    return server, repr(sorted(options.items(), key=lambda item: item[0]))


class SharedPoolRedisCacheClient(RedisCacheClient):
    pools: ClassVar[dict[tuple[str, str], Any]] = {}
    pools_lock: ClassVar[threading.Lock] = threading.Lock()
    # Per event loop (they die with it): redis.asyncio clients, each with its pool.
    async_clients: ClassVar[weakref.WeakKeyDictionary] = weakref.WeakKeyDictionary()

    def _get_connection_pool(self, write: bool) -> Any:
        server = self._servers[self._get_connection_pool_index(write)]
        key = _pool_key(server, self._pool_options)
        with self.pools_lock:
            pool = self.pools.get(key)
            if pool is None:
                pool = self.pools[key] = self._pool_class.from_url(server, **self._pool_options)
        return pool

    @cached_property
    def _async_target(self) -> tuple[tuple[str, str], str, dict[str, Any]]:
        """(key, server, options) of the asyncio clients: worked out once per cache object,
        not on every frame."""
        server = self._servers[self._get_connection_pool_index(True)]
        # The sync parser class does not apply; redis.asyncio picks its own.
        options = {k: v for k, v in self._pool_options.items() if k != "parser_class"}
        return _pool_key(server, options), server, options

    def async_client(self) -> redis.asyncio.Redis:
        """A client on the running event loop for the server the cache writes to (one per
        loop and server: building a client copies redis-py's table of reply callbacks)."""
        key, server, options = self._async_target
        clients = self.async_clients.setdefault(asyncio.get_running_loop(), {})
        client = clients.get(key)
        if client is None:
            # Blocking: a burst of frames waits for a connection (up to socket_timeout)
            # instead of failing with "Too many connections" at max_connections. A pooled
            # connection found dead (Redis restarted while it sat idle) is retried once on a
            # new one; a timeout is not retried (the command may have run).
            pool = redis.asyncio.BlockingConnectionPool.from_url(
                server,
                timeout=options.get("socket_timeout", 5),
                retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
                **options,
            )
            client = clients[key] = redis.asyncio.Redis(connection_pool=pool)
        return client


class RedisCache(DjangoRedisCache):
    def __init__(self, server: str, params: dict[str, Any]) -> None:
        super().__init__(server, params)
        self._class = SharedPoolRedisCacheClient

    def async_client(self) -> redis.asyncio.Redis:
        """A `redis.asyncio` client on the running event loop (keys: `make_and_validate_key`)."""
        return self._cache.async_client()
