"""Django's Redis cache with one connection pool per process.

`caches["default"]` is a separate cache object in every thread and async context (Django's
cache handler is context-local), and Django's Redis client keeps its connection pool on that
object, so each socket's context opened Redis connections of its own: a TCP connect and a
health check for nearly every rate-limit check (a fifth of a worker's time under load). Here
every cache object of the process draws on the same pool per server and options.
"""

from __future__ import annotations

import threading
from typing import Any, ClassVar

from django.core.cache.backends.redis import RedisCache as DjangoRedisCache
from django.core.cache.backends.redis import RedisCacheClient


class SharedPoolRedisCacheClient(RedisCacheClient):
    pools: ClassVar[dict[tuple[str, str], Any]] = {}
    pools_lock: ClassVar[threading.Lock] = threading.Lock()

    def _get_connection_pool(self, write: bool) -> Any:
        server = self._servers[self._get_connection_pool_index(write)]
        key = (server, repr(sorted(self._pool_options.items(), key=lambda item: item[0])))
        with self.pools_lock:
            pool = self.pools.get(key)
            if pool is None:
                pool = self.pools[key] = self._pool_class.from_url(server, **self._pool_options)
        return pool


class RedisCache(DjangoRedisCache):
    def __init__(self, server: str, params: dict[str, Any]) -> None:
        super().__init__(server, params)
        self._class = SharedPoolRedisCacheClient
