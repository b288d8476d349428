"""Structured logs: one JSON object per line, carrying the socket's session, user and room; and
no credential or query string in any log line, whatever the format.

`LOG_FORMAT=json` (settings) formats every record with `JsonFormatter`:

    {"time": "2026-01-01T00:00:00.000Z", "level": "INFO", "logger": "chat.consumers",
     "message": "session opened ...", "worker_id": "host:1234:ab12cd34",
     "session_id": "...", "user_id": "...", "room_id": "..."}

`session_id`, `user_id` and `room_id` come from `bind_log_context`, which a consumer calls
once it knows them: they are kept in a context variable, so they follow the socket's task and
whatever it starts afterwards (tasks, `database_sync_to_async` and `asyncio.to_thread` calls
copy the context). Fields given with `extra={...}` on one call are added too and win over the
context. Tokens and health payloads must never be passed to either.

**Redaction.** Every handler (settings' LOGGING, and the test suite's own log file) has a
`RedactingFilter`, which rewrites each record it lets through before any formatter sees it,
so both formats (and any handler added later with the filter) write the same safe text:

- the `request` that Django attaches to the records of `django.request`, `django.security.*`
  and `django.server` (its repr holds the whole URL, query string included) becomes a summary,
  method and path: `"GET /api/v1/ws/lobby"`;
- in the message (formatted with its arguments, which are then dropped), in every `extra`
  field, in the traceback (`exc_info`, formatted here into `exc_text`) and in `stack_info`,
  `redact` removes query strings (`/path?a=b` → `/path`) and replaces with `[redacted]`:
  JWT-shaped strings (`eyJ...`: Firebase ID tokens and the emulator's), the credential of
  `Bearer ...`, the value of an `Authorization`/`Cookie` header or an ASGI `query_string`, and
  of `token=`, `password=`, `secret=`, `api_key=`, `sessionid=` parameters (also where a
  client put `&token=` in the path).

`extra` fields keep their type when they are numbers, booleans or None; anything else becomes
its redacted text. The cost is one pass of one regular expression over the record's texts,
on records that a handler is about to write anyway. The server's access log names paths only
in the first place (clarity_project/serve.py).
"""

from __future__ import annotations

import json
import logging
import re
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

REDACTED = "[redacted]"

# Everything `redact` hides, as one pattern scanned once (leftmost match first; the lookahead
# skips at once every position where no branch can start). A branch's named group is what
# stays (`Bearer `, `token=`); the text matched after it is the credential.
_CREDENTIALS = re.compile(
    r"""
    (?=[ebacsqtp?])
    (?:
      # a JWT or one of its segments: base64url JSON (`{"` encodes as `eyJ`)
      (?P<jwt>(?-i:eyJ)[\w-]{10,}(?:\.[\w-]*){0,2})
      # an Authorization scheme's credential
      | (?P<bearer>bearer\s+)[^\s"',;)\]}]+
      # a header (HTTP line, dict, ASGI (name, value) pair) whose whole value is a credential
      | (?P<header>(?:authorization|cookie|set-cookie)["']?\s*[:=,]\s*(?-i:b)?["']?)[^"'\n]+
      # an ASGI scope's query string
      | (?P<scope>query_string["']?\s*[:=]\s*(?-i:b)?["'])[^"']+
      # a credential parameter, in a query string or anywhere else (`id_token=`, `csrftoken=`)
      | (?P<param>(?:token|passw(?:or)?d|secret|api_?key|sessionid)[\w-]*=)[^\s&;"'<>]+
      # a query string: a `?` after a path and before a parameter, to the next space or
      # quote (so "flushed?)", "why? " and "(?P<name>" are prose, left alone)
      | (?P<query>\?)(?<=[^\s(?"']\?)[\w%&=.~+-][^\s"'<>]*
    )
    """,
    re.IGNORECASE | re.ASCII | re.VERBOSE,
)


def _redact_match(match: re.Match) -> str:
    kind = match.lastgroup
    if kind == "query":
        return ""
    if kind == "jwt":
        return REDACTED
    return match.group(kind) + REDACTED


def redact(text: str) -> str:
    """`text` without query strings or credential-looking values (module docstring)."""
    return _CREDENTIALS.sub(_redact_match, text)


def _text(value: Any) -> str:
    try:
        return str(value)
    except Exception:
        return f"<{type(value).__name__} not printable>"


def request_summary(request: Any) -> str:
    """Method and path of a Django request (never its query string), its control characters
    escaped as Django escapes the path in its messages; the redacted text of anything else
    logged as `request` (runserver's socket)."""
    method, path = getattr(request, "method", None), getattr(request, "path", None)
    if isinstance(method, str) and isinstance(path, str):
        return redact(f"{method} {path.encode('unicode_escape').decode('ascii')}")
    return redact(_text(request))


# Formats tracebacks as both formatters do (they inherit logging.Formatter's).
_traceback_formatter = logging.Formatter()


class RedactingFilter(logging.Filter):
    """Rewrites each record without query strings or credentials (module docstring). On every
    handler: a handler's filter sees every record it writes, whichever logger made it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            # logging would report the failure with the raw arguments: never show them
            message = f"{_text(record.msg)} (arguments not shown: they did not format)"
        record.msg, record.args = redact(message), ()
        for key, value in list(record.__dict__.items()):
            if key in _RECORD_ATTRIBUTES or key.startswith("_"):
                continue
            if key == "request":
                record.request = request_summary(value)
            elif value is not None and not isinstance(value, int | float):  # bool is an int
                setattr(record, key, redact(_text(value)))
        if record.exc_info and not record.exc_text:
            record.exc_text = _traceback_formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


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
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)
