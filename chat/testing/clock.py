"""A clock that moves only when told to: the socket timers' deadlines (chat/timers.py) in
tests, without waiting for them."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta


class ManualHandle:
    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualClock:
    """`chat.timers.Clock` whose time moves on `advance`; wall time moves with it."""

    def __init__(self, *, start: datetime | None = None) -> None:
        self.elapsed = 0.0
        self.start = start or datetime.now(UTC)
        self.pending: list[tuple[float, int, ManualHandle, Callable[[], None]]] = []
        self.order = itertools.count()

    def monotonic(self) -> float:
        return self.elapsed

    def now(self) -> datetime:
        return self.start + timedelta(seconds=self.elapsed)

    def call_at(self, when: float, callback: Callable[[], None]) -> ManualHandle:
        handle = ManualHandle()
        heapq.heappush(self.pending, (when, next(self.order), handle, callback))
        return handle

    async def advance(self, seconds: float) -> None:
        """Move time on by `seconds`, running every callback that falls due on the way, in
        order, and letting the tasks they start run (so their frames are on their way)."""
        target = self.elapsed + seconds
        while self.pending and self.pending[0][0] <= target:
            when, _, handle, callback = heapq.heappop(self.pending)
            if handle.cancelled:
                continue
            self.elapsed = max(self.elapsed, when)
            callback()
            for _ in range(5):  # the task it started, and the awaits within it
                await asyncio.sleep(0)
        self.elapsed = target
