"""Session liveness written in batches: one UPDATE per worker per second, not one per socket.

Every socket reports its `last_seen` and message count once per heartbeat interval. Written
one socket at a time, that is a transaction (a WAL flush on PostgreSQL) per socket per
interval: 5,000 sockets cost a worker's database thread more than half its time, and
sockets that joined together flush together, stalling the chat messages queued behind them.
Here sockets only note their values; once a second the worker writes everything noted in
one statement. One per event loop (per worker process).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime

from channels.db import database_sync_to_async

from chat.sessions import SessionLiveness, sessions_touch

logger = logging.getLogger(__name__)


class SessionToucher:
    def __init__(self, *, every: float = 1.0) -> None:
        self.every = every
        self.noted: dict[str, SessionLiveness] = {}
        self.task: asyncio.Task | None = None

    def note(self, *, session_id: str, last_seen: datetime, messages_sent: int) -> None:
        """Record a session's liveness, written within `every` seconds (the latest wins)."""
        self.noted[session_id] = SessionLiveness(
            session_id=session_id, last_seen=last_seen, messages_sent=messages_sent
        )
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self.flush_soon())

    def forget(self, *, session_id: str) -> None:
        """The session is ending: its final values are written by `sessions_close`."""
        self.noted.pop(session_id, None)

    async def flush_soon(self) -> None:
        await asyncio.sleep(self.every)
        batch, self.noted = list(self.noted.values()), {}
        try:
            await database_sync_to_async(sessions_touch)(sessions=batch)
        except Exception:
            logger.exception("writing the liveness of %d sessions failed", len(batch))
