"""Structured logs: one JSON object per line, carrying the socket's session, user and room.

`LOG_FORMAT=json` (settings) formats every record with `JsonFormatter`:

    {"time": "2026-01-01T00:00:00.000Z", "level": "INFO", "logger": "chat.consumers",
     "message": "session opened ...", "worker_id": "host:1234:ab12cd34",
     "session_id": "...", "user_id": "...", "room_id": "..."}

`session_id`, `user_id` and `room_id` come from `bind_log_context`, which a consumer calls
once it knows them: they are kept in a context variable, so they follow the socket's task and
whatever it starts afterwards (tasks, `database_sync_to_async` and `asyncio.to_thread` calls
copy the context). Fields given with `extra={...}` on one call are added too and win over the
context. Tokens and health payloads must never be passed to either.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

_context: ContextVar[MappingProxyType] = ContextVar(
    "clarity_log_context", default=MappingProxyType({})
)

# Attributes every LogRecord has; anything else on a record came from `extra`.
_RECORD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


def bind_log_context(**fields: str | None) -> None:
    """Add these fields (e.g. session_id, user_id, room_id) to every record this task logs
    from now on, and to the tasks and threads it starts afterwards; None removes a field."""
    merged = {**_context.get(), **fields}
    _context.set(MappingProxyType({k: v for k, v in merged.items() if v is not None}))


def _worker_id() -> str | None:
    # chat.worker needs the app registry, so it is not imported here; the ASGI application
    # imports it before serving anything, so every record of a serving worker has the id.
    return getattr(sys.modules.get("chat.worker"), "WORKER_ID", None)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (tracebacks included, as `exc_info`)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        worker_id = _worker_id()
        if worker_id is not None:
            entry["worker_id"] = worker_id
        entry.update(_context.get())
        entry.update(
            (key, value)
            for key, value in record.__dict__.items()
            if key not in _RECORD_ATTRIBUTES and not key.startswith("_")
        )
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)
