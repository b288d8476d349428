"""Calls batched per event loop.

`Batcher`: database calls; the calls that arrive while the previous batch is in the
database thread go together into the next one.

A worker has a single database thread (Channels' `database_sync_to_async`), so under load
its calls queue behind each other; each one costs a thread round trip and, if it writes, a
commit. A `Batcher` turns the queue into batches: under light load a batch is one call (no
added wait), under load the batch grows and the cost per call falls (one thread round trip,
one transaction, and whatever reads the calls share). Used for message storage
(`chat.writer`) and socket joins (`chat.joins`). One batcher per event loop.

`TurnBatcher`: calls made during one turn of the event loop, run together on the next
(per key): a group's events (`chat.rooms.GroupEvents`: join and leave notices), the rate
limiter's counts on Redis (one pipeline per turn, `chat.shared_state.redis`). Under light
load a batch is one call, a turn later; in a burst (a reconnect storm wakes hundreds of
sockets in one turn) one round trip serves them all.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from channels.db import database_sync_to_async

logger = logging.getLogger(__name__)

Call = TypeVar("Call")
Result = TypeVar("Result")
Key = TypeVar("Key", bound=Hashable)


class Batcher(Generic[Call, Result]):
    """`run` (blocking, run in the database thread) takes a batch of calls and returns one
    outcome per call, in order: a result, or an exception that call's caller gets raised.
    If `run` itself raises, a batch of several is run again one call at a time (one bad
    call must not fail the others) and a lone call gets the exception."""

    def __init__(
        self,
        *,
        run: Callable[[list[Call]], list[Result | Exception]],
        what: str,
        max_batch: int,
    ) -> None:
        self.run = run
        self.what = what
        self.max_batch = max_batch
        self.pending: list[tuple[Call, asyncio.Future]] = []
        self.task: asyncio.Task | None = None

    async def submit(self, call: Call) -> Result:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((call, future))
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self.drain())
        return await future

    async def drain(self) -> None:
        while self.pending:
            batch, self.pending = self.pending[: self.max_batch], self.pending[self.max_batch :]
            if not await self.attempt(batch) and len(batch) > 1:
                for one in batch:
                    await self.attempt([one])

    async def attempt(self, batch: list[tuple[Call, asyncio.Future]]) -> bool:
        """Run one batch and settle its futures; False if `run` raised (a lone call's
        future then holds the exception, a batch's futures are left for the retry)."""
        try:
            outcomes = await database_sync_to_async(self.run)([call for call, _ in batch])
        except Exception as exc:
            logger.exception("%s batch of %d failed", self.what, len(batch))
            if len(batch) == 1 and not batch[0][1].done():
                batch[0][1].set_exception(exc)
            return False
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():
                continue  # its caller is gone (the socket closed meanwhile)
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
        return True


class TurnBatcher(Generic[Key, Call, Result]):
    """`run(key, calls)` (a coroutine) takes the calls submitted under one key during one
    event-loop turn and returns one outcome per call, in order: a result, or an exception
    that call's caller gets raised; if `run` raises, every caller of the batch gets it. The
    batch runs in a task of its own, so a caller cancelled meanwhile (its socket gone) takes
    no other call with it, and its own call still runs. One batcher per event loop."""

    def __init__(
        self, *, run: Callable[[Key, list[Call]], Awaitable[list[Result | Exception]]]
    ) -> None:
        self.run = run
        self.pending: dict[Key, list[tuple[Call, asyncio.Future]]] = {}
        self.tasks: set[asyncio.Task] = set()

    async def submit(self, key: Key, call: Call) -> Result:
        loop = asyncio.get_running_loop()
        batch = self.pending.get(key)
        if batch is None:
            batch = self.pending[key] = []
            # (a task's first step runs on the next turn: every call of this one is in)
            task = loop.create_task(self._run(key))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        future = loop.create_future()
        # (retrieved here, so an error whose caller is gone is not logged as unretrieved)
        future.add_done_callback(lambda done: done.cancelled() or done.exception())
        batch.append((call, future))
        return await asyncio.shield(future)

    async def _run(self, key: Key) -> None:
        batch = self.pending.pop(key)
        try:
            outcomes = await self.run(key, [call for call, _ in batch])
        except Exception as exc:
            outcomes = [exc] * len(batch)
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
