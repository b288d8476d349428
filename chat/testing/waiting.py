"""Waiting for something to become true, never for a fixed time: poll a condition until a
deadline. The one polling loop of chat/testing, for blocking callers (`wait_until`) and for
coroutines (`eventually`, the same loop in a thread, so the event loop runs on meanwhile)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
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
