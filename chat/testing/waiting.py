"""Waiting for something to become true, never for a fixed time: poll a condition until a
deadline. The polling loop of chat/testing, for blocking callers (`wait_until`), for
coroutines with a blocking check (`eventually`: the same loop in a thread, so the event loop
runs on meanwhile), and for coroutines whose check is itself a coroutine (`until`).

An in-process test that polls the database uses `until` with `database_sync_to_async`: the
application's own database calls run in that one thread too, and a query from a thread of
the test's own could hold a table lock of SQLite's shared in-memory test database just when
the application writes ("database table is locked": SQLite's shared cache does not wait).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(check: Callable[[], T], *, timeout: float, what: str, step: float = 0.02) -> T:
    """Call `check` until it returns a truthy value, which is returned; AssertionError naming
    `what` once `timeout` seconds have passed. An exception from `check` ends the wait."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(step)


async def eventually(
    check: Callable[[], T], *, timeout: float = 5.0, what: str, step: float = 0.02
) -> T:
    """`wait_until` from a coroutine: `check` may block (a database query, a Redis call)."""
    return await asyncio.to_thread(wait_until, check, timeout=timeout, what=what, step=step)


async def until(
    check: Callable[[], Awaitable[T]], *, timeout: float = 5.0, what: str, step: float = 0.02
) -> T:
    """Await `check()` until it gives a truthy value, which is returned; AssertionError naming
    `what` once `timeout` seconds have passed. `step` 0 checks at every turn of the loop."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = await check()
        if result:
            return result
        if loop.time() >= deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(step)
