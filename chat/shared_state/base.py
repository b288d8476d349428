"""The state every worker process must see alike, as a few primitive operations.

Worker liveness and the cache epoch (chat/liveness.py), the per-user rate-limit counters
(chat/ratelimit.py) and the assistant's circuit breaker (chat/assistant/breaker.py) need
nothing more than these. A backend is Redis (chat/shared_state/redis.py: every worker sees
the same keys) or this process's memory (chat/shared_state/memory.py: one process only).

Values are small JSON scalars. Expiries (`ttl`) are in seconds, fractions allowed; None: the
key never expires. The counter is async because the event loop calls it on every chat frame
(one round trip, no thread); every other operation is synchronous, for callers that already
run in a thread (asyncio.to_thread, database_sync_to_async, management commands).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping

Value = int | float | str


class SharedState(ABC):
    # Whether other processes see these keys (Redis) or only this one (memory).
    shared: bool

    @abstractmethod
    def count(
        self, key: str, delta: int, *, ttl: float | None, also_read: str | None = None
    ) -> tuple[int, int]:
        """Atomically add `delta` to the counter `key` (created at 0) and return its new
        value, with the value of the counter `also_read` (0 if absent or not asked for) read
        in the same step. A counter gets its `ttl` when it has no expiry yet, so it expires
        `ttl` seconds after its creation however often it is counted."""

    @abstractmethod
    async def acount(
        self, key: str, delta: int, *, ttl: float | None, also_read: str | None = None
    ) -> tuple[int, int]:
        """`count` for the event loop: one round trip, without a thread."""

    @abstractmethod
    def add(self, key: str, value: Value, *, ttl: float | None) -> bool:
        """Set `key` only if it is absent; whether it was."""

    @abstractmethod
    def add_many(self, entries: Mapping[str, tuple[Value, float | None]]) -> None:
        """Set each key to its `(value, ttl)` only if it is absent, all in one step: no reader
        sees some of these keys written by this call and not the others."""

    @abstractmethod
    def get_many(self, keys: Iterable[str]) -> dict[str, Value]:
        """The values of those keys that are present."""

    @abstractmethod
    def set(self, key: str, value: Value, *, ttl: float | None) -> None: ...

    @abstractmethod
    def delete_many(self, keys: Iterable[str]) -> None: ...

    @abstractmethod
    def expires_in(self, key: str) -> float | None:
        """Seconds until `key` expires (None: never); KeyError if it is absent."""

    @abstractmethod
    def clear(self) -> None:
        """Delete every key of this backend (tests; a deliberate reset)."""
