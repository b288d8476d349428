"""Chat messages stored in batches: one transaction for all the messages that arrive while
the previous batch is being written.

A message is broadcast only once it is stored (protocol: nothing acknowledged is lost), so
the database's commit is on every message's path. On PostgreSQL each commit waits for its
WAL flush (0.5-3 ms measured here, more under load) and the worker has a single database
thread, which capped a worker at a few hundred messages per second whatever the CPU.
Batching makes it one flush per batch: under light load a batch is one message (no added
wait; stored by one INSERT in autocommit, `history.messages_store`); under load the batch
grows and the cost per message falls. One writer per event loop (per worker process).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from channels.db import database_sync_to_async

from chat.history import Stored, messages_store

logger = logging.getLogger(__name__)


class MessageWriter:
    def __init__(self, *, max_batch: int = 500) -> None:
        self.max_batch = max_batch
        self.pending: list[tuple[dict[str, Any], asyncio.Future]] = []
        self.task: asyncio.Task | None = None

    async def store(self, **fields: Any) -> Stored:
        """Store one message (the fields of `history.message_store`), once committed: its
        `message` frame, and whether it is new (not a repeated send, protocol §15)."""
        future = asyncio.get_running_loop().create_future()
        self.pending.append((fields, future))
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self.drain())
        return await future

    async def drain(self) -> None:
        while self.pending:
            batch, self.pending = self.pending[: self.max_batch], self.pending[self.max_batch :]
            try:
                await self.write(batch)
            except Exception:
                if len(batch) == 1:
                    continue
                # One bad message must not fail the others: store them one by one.
                for one in batch:
                    with contextlib.suppress(Exception):
                        await self.write([one])

    async def write(self, batch: list[tuple[dict[str, Any], asyncio.Future]]) -> None:
        try:
            stored = await database_sync_to_async(messages_store)(
                messages=[fields for fields, _ in batch]
            )
        except Exception as exc:
            logger.exception("storing %d message(s) failed", len(batch))
            if len(batch) == 1 and not batch[0][1].done():
                batch[0][1].set_exception(exc)
            raise
        for (_, future), one in zip(batch, stored, strict=True):
            if not future.done():
                future.set_result(one)
