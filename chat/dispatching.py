"""A socket's events, from its WebSocket and its channel-layer channel, handed to the
consumer one at a time: Channels' `await_many_dispatch`, cheaper per event.

Channels waits for its two receive tasks with `asyncio.wait` on every event: a waiter, a
callback added to and removed from each task, a set built and scanned, every time (~15 % of
a worker's event loop in a reconnect storm, where each join delivers an event to each
member of the room). Here each receive task tells a queue of finished sources once, when it
finishes, and the loop waits only when nothing has finished. Same contract: events of one
source in order, one dispatch at a time, a source's exception raised to the consumer, both
receive tasks cancelled when the loop ends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any


async def dispatch_events(
    sources: list[Callable[[], Awaitable[Any]]], dispatch: Callable[[Any], Awaitable[None]]
) -> None:
    loop = asyncio.get_running_loop()
    finished: deque[int] = deque()
    waiter: list[asyncio.Future | None] = [None]
    tasks: list[asyncio.Task] = []

    def on_done(index: int) -> Callable[[asyncio.Task], None]:
        def done(_: asyncio.Task) -> None:
            finished.append(index)
            if waiter[0] is not None and not waiter[0].done():
                waiter[0].set_result(None)

        return done

    callbacks = [on_done(index) for index in range(len(sources))]

    def start(index: int) -> asyncio.Task:
        task = loop.create_task(sources[index]())
        task.add_done_callback(callbacks[index])
        return task

    tasks.extend(start(index) for index in range(len(sources)))
    try:
        while True:
            while not finished:
                waiter[0] = loop.create_future()
                await waiter[0]
                waiter[0] = None
            index = finished.popleft()
            result = tasks[index].result()
            await dispatch(result)
            tasks[index] = start(index)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
