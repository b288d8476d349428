"""The state every worker process must see alike (worker liveness and the cache epoch, rate
limit counters, the assistant's circuit breaker), behind one small API (base.py) with two
backends: Redis when `REDIS_URL` is set (redis.py), this process's memory otherwise
(memory.py).

`shared_state()` is the process's backend for the current settings: one per process, like
Django's database connections, so its connection pools are shared by every thread and event
loop of the process. Tests that change `REDIS_URL` or `REDIS_PREFIX` get the backend of the
new settings.
"""

from __future__ import annotations

import threading

from django.conf import settings

from chat.shared_state.base import SharedState, Value
from chat.shared_state.memory import MemoryState
from chat.shared_state.redis import RedisState

__all__ = ["MemoryState", "RedisState", "SharedState", "Value", "backend_for", "shared_state"]


def backend_for(*, redis_url: str | None, prefix: str) -> SharedState:
    """A new backend: Redis at `redis_url` under `prefix`, or memory without a URL."""
    if redis_url:
        return RedisState(url=redis_url, prefix=prefix)
    return MemoryState()


class _Current:
    """The process's backend and the settings it was made for."""

    lock = threading.Lock()
    made_for: tuple[str | None, str] | None = None
    backend: SharedState | None = None


def shared_state() -> SharedState:
    """This process's backend for the current settings."""
    wanted = (settings.REDIS_URL, settings.REDIS_PREFIX)
    backend = _Current.backend
    if _Current.made_for == wanted and backend is not None:
        return backend
    with _Current.lock:  # threads asking at once must share one memory backend
        if _Current.made_for != wanted or _Current.backend is None:
            _Current.backend = backend_for(redis_url=wanted[0], prefix=wanted[1])
            _Current.made_for = wanted
        return _Current.backend
