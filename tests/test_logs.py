"""Structured logs (chat/logs.py): one JSON object per line, with the socket's session, user
and room when known, and the worker's id; LOG_FORMAT chooses it."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from contextvars import copy_context

import pytest
from asgiref.sync import sync_to_async

from chat import worker
from chat.logs import JsonFormatter, bind_log_context
from chat.testing.processes import ROOT
from tests.servers import server_env


class Records(logging.Handler):
    """Every record of the `chat` loggers, formatted as JSON and decoded again."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.entries: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record)
        assert "\n" not in line
        self.entries.append(json.loads(line))


@pytest.fixture
def records():
    handler = Records()
    logger = logging.getLogger("chat")
    logger.addHandler(handler)
    yield handler.entries
    logger.removeHandler(handler)


log = logging.getLogger("chat.test")


def test_one_object_per_line_with_the_worker_id(records):
    log.info("hello %s", "world")
    [entry] = records
    assert entry.keys() == {"time", "level", "logger", "message", "worker_id"}
    assert entry["message"] == "hello world" and entry["level"] == "INFO"
    assert entry["logger"] == "chat.test" and entry["worker_id"] == worker.WORKER_ID
    assert entry["time"].endswith("Z") and len(entry["time"]) == len("2026-01-01T00:00:00.000Z")


def test_a_traceback_stays_on_its_line(records):
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    [entry] = records
    assert entry["message"] == "failed"
    assert entry["exc_info"].startswith("Traceback") and "ValueError: boom" in entry["exc_info"]


def test_extra_fields_are_added_and_win_over_the_context(records):
    def run():
        bind_log_context(session_id="s-1", user_id="alice")
        log.info("session opened", extra={"session_id": "s-2", "points": 1440})

    copy_context().run(run)
    [entry] = records
    assert (entry["session_id"], entry["user_id"], entry["points"]) == ("s-2", "alice", 1440)


async def test_the_context_follows_the_socket_task_and_what_it_starts(records):
    async def socket_task(session_id: str, started: asyncio.Event, other_done: asyncio.Event):
        bind_log_context(user_id=f"user-{session_id}")
        bind_log_context(session_id=session_id, room_id="lobby")
        started.set()
        await other_done.wait()
        log.info("in the task")
        await asyncio.create_task(asyncio.to_thread(log.info, "in a thread"))
        await sync_to_async(log.info)("in the database thread")
        bind_log_context(room_id=None)
        log.info("room forgotten")

    first, second = asyncio.Event(), asyncio.Event()
    one = asyncio.create_task(socket_task("one", first, second))
    await first.wait()
    two = asyncio.create_task(socket_task("two", second, asyncio.Event()))
    await second.wait()
    await one
    two.cancel()
    log.info("outside")

    by_message = {entry["message"]: entry for entry in records}
    for message in ("in the task", "in a thread", "in the database thread"):
        entry = by_message[message]
        assert (entry["session_id"], entry["user_id"], entry["room_id"]) == (
            "one",
            "user-one",
            "lobby",
        ), message
    assert "room_id" not in by_message["room forgotten"]
    assert by_message["room forgotten"]["session_id"] == "one"
    assert "session_id" not in by_message["outside"]


@pytest.mark.django_db(transaction=True)
async def test_a_sockets_records_carry_its_session_user_and_room(records, clients):
    client = await clients.join("lobby", "alice")
    await client.send({"type": "message", "content": "hi"})
    await client.recv_type("message")
    await client.close()
    session_id = client.ack["session_id"]
    mine = [entry for entry in records if entry.get("session_id") == session_id]
    assert {entry["message"].split(" session=")[0] for entry in mine} >= {
        "session opened",
        "session closed",
    }
    assert all((e["user_id"], e["room_id"]) == ("alice", "lobby") for e in mine)


def setting(name: str, env: dict[str, str | None]) -> subprocess.CompletedProcess:
    code = f"from django.conf import settings; print(settings.{name})"
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=server_env(env),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"DEBUG": "1", "LOG_FORMAT": None}, "plain"),
        ({"DEBUG": "0", "LOG_FORMAT": None}, "json"),
        ({"DEBUG": "1", "LOG_FORMAT": "json"}, "json"),
        ({"DEBUG": "0", "LOG_FORMAT": "plain"}, "plain"),
    ],
)
def test_log_format_defaults_to_plain_in_development_and_json_otherwise(env, expected):
    result = setting("LOG_FORMAT", {"FIREBASE_AUTH_EMULATOR_HOST": None, **env})
    assert result.stdout.strip() == expected, result.stderr


def test_an_unknown_log_format_is_refused():
    result = setting("LOG_FORMAT", {"LOG_FORMAT": "xml"})
    assert result.returncode != 0 and "LOG_FORMAT must be json or plain" in result.stderr
