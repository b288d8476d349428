"""Chat messages stored in batches: one transaction for all the messages that arrive while
the previous batch is being written (chat.batching).

A message is broadcast only once it is stored (protocol: nothing acknowledged is lost), so
the database's commit is on every message's path. On PostgreSQL each commit waits for its
WAL flush (0.5-3 ms measured here, more under load) and the worker has a single database
thread, which capped a worker at a few hundred messages per second whatever the CPU.
Batching makes it one flush per batch: under light load a batch is one message (no added
wait; its seq taken and its row inserted in one transaction, `history.messages_store`);
under load the batch grows and the cost per message falls. One writer per event loop (per
worker process).
"""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings

from chat.batching import Batcher
from chat.history import Stored, messages_store
from chat.push import pushes_queue

logger = logging.getLogger(__name__)


def messages_store_and_push(*, messages: list[dict[str, Any]]) -> list[Stored]:
    """Store the batch; once it is committed, queue the pushes its new messages owe
    (CHAT_PUSH, chat.push). A push that cannot be queued never costs a message."""
    stored = messages_store(messages=messages)
    if settings.CHAT_PUSH:
        new = [
            (s.frame["room_id"], s.frame["user_id"], int(s.frame["message_id"]))
            for s in stored
            if s.new
        ]
        try:
            pushes_queue(messages=new)
        except Exception:
            logger.exception("queueing pushes failed (the messages are stored)")
    return stored


class MessageWriter(Batcher[dict[str, Any], Stored]):
    def __init__(self, *, max_batch: int = 500) -> None:
        super().__init__(
            run=lambda batch: messages_store_and_push(messages=batch),
            what="message",
            max_batch=max_batch,
        )

    async def store(self, **fields: Any) -> Stored:
        """Store one message (the fields of `history.message_store`), once committed: its
        `message` frame, and whether it is new (not a repeated send, protocol §15)."""
        return await self.submit(fields)
