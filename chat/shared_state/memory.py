"""Shared state in this process's memory: the embedded default (one worker, no Redis).

A dict of `(value, expires_at)` under a lock, so the event loop and threads may use it at
once; every operation is a few dictionary steps, so `acount` runs inline on the event loop.
Expired keys are dropped when read, and all of them at most once per PURGE_INTERVAL on a
write (rate-limit counters are never read again once their window is over).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping

from chat.shared_state.base import SharedState, Value

PURGE_INTERVAL = 60.0


class MemoryState(SharedState):
    shared = False

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[Value, float]] = {}
        self._next_purge = clock() + PURGE_INTERVAL

    def _expires_at(self, ttl: float | None) -> float:
        return math.inf if ttl is None else self.clock() + ttl

    def _live(self, key: str) -> tuple[Value, float] | None:
        """The entry of `key` unless it expired (then dropped); under the lock."""
        entry = self._entries.get(key)
        if entry is not None and entry[1] <= self.clock():
            del self._entries[key]
            return None
        return entry

    def _purge(self) -> None:
        """Drop every expired key, at most once per PURGE_INTERVAL; under the lock."""
        now = self.clock()
        if now < self._next_purge:
            return
        self._next_purge = now + PURGE_INTERVAL
        for key in [key for key, (_, expires_at) in self._entries.items() if expires_at <= now]:
            del self._entries[key]

    def _add(self, key: str, value: Value, ttl: float | None) -> bool:
        """`add` under the lock."""
        if self._live(key) is not None:
            return False
        self._entries[key] = (value, self._expires_at(ttl))
        return True

    def count(
        self, key: str, delta: int, *, ttl: float | None, also_read: str | None = None
    ) -> tuple[int, int]:
        with self._lock:
            self._purge()
            entry = self._live(key)
            value, expires_at = entry if entry is not None else (0, math.inf)
            value = int(value) + delta
            if expires_at == math.inf:
                expires_at = self._expires_at(ttl)
            self._entries[key] = (value, expires_at)
            other = self._live(also_read) if also_read is not None else None
            return value, int(other[0]) if other is not None else 0

    async def acount(
        self, key: str, delta: int, *, ttl: float | None, also_read: str | None = None
    ) -> tuple[int, int]:
        return self.count(key, delta, ttl=ttl, also_read=also_read)

    def add(self, key: str, value: Value, *, ttl: float | None) -> bool:
        with self._lock:
            self._purge()
            return self._add(key, value, ttl)

    def add_many(self, entries: Mapping[str, tuple[Value, float | None]]) -> None:
        with self._lock:
            self._purge()
            for key, (value, ttl) in entries.items():
                self._add(key, value, ttl)

    def get_many(self, keys: Iterable[str]) -> dict[str, Value]:
        with self._lock:
            found = {key: self._live(key) for key in keys}
        return {key: entry[0] for key, entry in found.items() if entry is not None}

    def set(self, key: str, value: Value, *, ttl: float | None) -> None:
        with self._lock:
            self._purge()
            self._entries[key] = (value, self._expires_at(ttl))

    def delete_many(self, keys: Iterable[str]) -> None:
        with self._lock:
            for key in keys:
                self._entries.pop(key, None)

    def expires_in(self, key: str) -> float | None:
        with self._lock:
            entry = self._live(key)
        if entry is None:
            raise KeyError(key)
        return None if entry[1] == math.inf else entry[1] - self.clock()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
