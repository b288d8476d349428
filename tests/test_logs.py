"""Structured logs (chat/logs.py): one JSON object per line, with the socket's session, user
and room when known, and the worker's id; LOG_FORMAT chooses it. No token, credential or
query string in any line, in either format, whoever logs it: Django's records of refused
requests (in-process, as Django makes them) and a real worker's logs after hostile requests."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import subprocess
import sys
import time
from contextvars import copy_context

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import HttpResponseServerError
from django.test import AsyncClient, RequestFactory
from django.utils.log import log_response
from websockets.exceptions import InvalidStatus

from chat import worker
from chat.logs import REDACTED, JsonFormatter, RedactingFilter, bind_log_context, redact
from chat.testing.client import ChatSocket, token_for
from chat.testing.processes import HOST, ROOT, Worker
from tests.logscan import scan_line
from tests.servers import run_workers, server_env


class Records(logging.Handler):
    """Every record of the `chat` loggers, redacted and formatted as JSON as a server's handler
    does it, and decoded again."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.addFilter(RedactingFilter())
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


# --- No token, credential or query string in any line ---------------------------------------

TOKEN = token_for("log-redaction")
# Refused by the token check itself (401), yet its text is still a token to keep out of logs.
EXPIRED = token_for("log-redaction", issued_at=int(time.time()) - 7200, lifetime=3600)


def assert_no_token(lines: list[str], *tokens: str) -> None:
    """None of these tokens (nor a segment of one), no JWT-shaped text the suite's log scan
    would find, and no `?token=` in any of these lines."""
    for line in lines:
        assert not list(scan_line(line, set())), line
        assert "?token" not in line, line
        for token in tokens:
            for part in [token, *(p for p in token.split(".") if len(p) >= 16)]:
                assert part not in line, line


class Lines(logging.Handler):
    """What a server's handler writes for each record, in both formats: redacted as every
    handler of settings' LOGGING redacts, then formatted as JSON (kept decoded too) and as
    plain text."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.addFilter(RedactingFilter())
        self.json = JsonFormatter()
        self.plain = logging.Formatter(settings.LOGGING["formatters"]["plain"]["format"])
        self.entries: list[dict] = []
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = self.json.format(record)
        self.entries.append(json.loads(line))
        self.texts += [line, self.plain.format(record)]


@pytest.fixture
def lines():
    """Every record of Django's loggers and ours, as a server's handler writes it."""
    handler = Lines()
    loggers = [logging.getLogger(name) for name in ("django", "chat")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler
    for logger in loggers:
        logger.removeHandler(handler)


def test_every_handler_of_the_settings_and_of_this_run_redacts():
    from tests.bootstrap import LOG_FILE

    config = settings.LOGGING
    redacting = {
        name
        for name, spec in config["filters"].items()
        if spec.get("()") == "chat.logs.RedactingFilter"
    }
    for name, handler in config["handlers"].items():
        assert redacting & set(handler.get("filters", ())), f"handler {name} does not redact"
    root = logging.getLogger()
    console = [h for h in root.handlers if h.name == "console"]
    log_file = [h for h in root.handlers if getattr(h, "baseFilename", "").endswith(LOG_FILE)]
    assert len(console) == 1 and len(log_file) == 1
    for handler in console + log_file:
        assert any(isinstance(f, RedactingFilter) for f in handler.filters), handler


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        (f"<ASGIRequest: GET '/api/v1/ws/x?token={TOKEN}'>", "<ASGIRequest: GET '/api/v1/ws/x'>"),
        (f"GET /api/v1/ws/lobby?room=a&token={TOKEN} HTTP/1.1", "GET /api/v1/ws/lobby HTTP/1.1"),
        (f"https://example.com/path?id_token={TOKEN}#top", "https://example.com/path"),
        (f"Authorization: Bearer {TOKEN}", f"Authorization: {REDACTED}"),
        (f"sent Bearer {TOKEN}, refused", f"sent Bearer {REDACTED}, refused"),
        (
            f"{{'HTTP_AUTHORIZATION': 'Bearer {TOKEN}', 'HTTP_COOKIE': 'sessionid=a;csrftoken=b'}}",
            f"{{'HTTP_AUTHORIZATION': '{REDACTED}', 'HTTP_COOKIE': '{REDACTED}'}}",
        ),
        (
            f"[(b'authorization', b'Bearer {TOKEN}'), (b'host', b'example.com')]",
            f"[(b'authorization', b'{REDACTED}'), (b'host', b'example.com')]",
        ),
        (
            f"{{'path': '/api/v1/ws/lobby', 'query_string': b'room=a&token={TOKEN}'}}",
            f"{{'path': '/api/v1/ws/lobby', 'query_string': b'{REDACTED}'}}",
        ),
        (
            f"No route found for path 'elsewhere&token={TOKEN}'.",
            f"No route found for path 'elsewhere&token={REDACTED}'.",
        ),
        (f"TOKEN={TOKEN}; password=hunter2", f"TOKEN={REDACTED}; password={REDACTED}"),
        (f"a segment: {TOKEN.split('.')[1]}", f"a segment: {REDACTED}"),
        # prose, ids and paths stay as they are
        ("liveness epoch missing (Redis restarted or flushed?): new epoch", None),
        ("session opened session=s-1 user=alice room=lobby", None),
        ("127.0.0.1:5 GET /api/v1/ws/chat/stats 401", None),
        ("Forbidden (CSRF cookie not set.): /dev/token", None),
        ("route (?P<room_id>.*) matched; why? because", None),
    ],
    ids=lambda value: None if value is None else value[:24].replace(TOKEN[:10], "TOKEN"),
)
def test_redact_hides_credentials_and_query_strings_and_keeps_the_rest(text, redacted):
    assert redact(text) == (text if redacted is None else redacted)


# (method, URL, headers, status, logger, message): requests Django refuses, and what it logs.
REFUSED = {
    "socket URL over plain HTTP": (
        "get", "/api/v1/ws/lobby?token={token}", {}, 404,
        "django.request", "Not Found: /api/v1/ws/lobby",
    ),
    "token after & instead of ?": (
        "get", "/api/v1/ws/lobby&token={token}", {}, 404,
        "django.request", f"Not Found: /api/v1/ws/lobby&token={REDACTED}",
    ),
    "stats, expired Bearer token": (
        "get", "/api/v1/ws/chat/stats", {"Authorization": "Bearer {expired}"}, 401,
        "django.request", "Unauthorized: /api/v1/ws/chat/stats",
    ),
    "stats, token in the query string": (
        "get", "/api/v1/ws/chat/stats?token={token}", {}, 401,
        "django.request", "Unauthorized: /api/v1/ws/chat/stats",
    ),
    "stats, not an operator": (
        "get", "/api/v1/ws/chat/stats?token={token}", {"Authorization": "Bearer {token}"}, 403,
        "django.request", "Forbidden: /api/v1/ws/chat/stats",
    ),
    "dev sign-in without CSRF token": (
        "post", "/dev/token?token={token}", {}, 403,
        "django.security.csrf", "Forbidden (CSRF cookie not set.): /dev/token",
    ),
    "admin POST without CSRF token": (
        "post", "/admin/login/?token={token}", {}, 403,
        "django.security.csrf", "Forbidden (CSRF cookie not set.): /admin/login/",
    ),
    "unknown path": (
        "get", "/nothing?token={token}", {}, 404, "django.request", "Not Found: /nothing",
    ),
    "invalid Host": (
        "get", "/?token={token}", {"Host": "bad host"}, 400,
        "django.security.DisallowedHost", "Invalid HTTP_HOST header: '",
    ),
}  # fmt: skip


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("case", list(REFUSED))
async def test_django_logs_a_refused_request_by_its_method_and_path_only(lines, case):
    method, url, headers, status, logger, message = REFUSED[case]
    url = url.format(token=TOKEN)
    headers = {name: value.format(token=TOKEN, expired=EXPIRED) for name, value in headers.items()}
    client = AsyncClient(enforce_csrf_checks=True)
    body = {"name": "mallory"} if method == "post" else None
    response = await getattr(client, method)(url, body, headers=headers)
    assert response.status_code == status

    [entry] = [entry for entry in lines.entries if entry["logger"] == logger]
    assert entry["message"].startswith(message) and entry["status_code"] == status
    path = redact(url.partition("?")[0])
    assert entry["request"] == f"{method.upper()} {path}"
    assert_no_token(lines.texts, TOKEN, EXPIRED)


def test_a_server_error_keeps_its_traceback_without_the_url_or_credentials(lines):
    """A 5xx as Django's handler logs it (`log_response`, with the exception): the URL and the
    headers in the exception's text are redacted in the traceback of both formats."""
    request = RequestFactory().get(
        f"/api/v1/rooms?token={TOKEN}", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    try:
        raise RuntimeError(f"cannot answer {request.get_full_path()} for {dict(request.headers)}")
    except RuntimeError as error:
        log_response(
            "Internal Server Error: %s",
            request.path,
            response=HttpResponseServerError(),
            request=request,
            exception=error,
        )
    [entry] = lines.entries
    assert (entry["level"], entry["logger"]) == ("ERROR", "django.request")
    assert entry["status_code"] == 500
    assert entry["message"] == "Internal Server Error: /api/v1/rooms"
    assert entry["request"] == "GET /api/v1/rooms"
    assert entry["exc_info"].startswith("Traceback")
    assert "RuntimeError: cannot answer /api/v1/rooms for {" in entry["exc_info"]
    assert f"'Authorization': '{REDACTED}'" in entry["exc_info"]
    plain = lines.texts[1]
    assert "ERROR django.request Internal Server Error: /api/v1/rooms\nTraceback" in plain
    assert "RuntimeError: cannot answer /api/v1/rooms for {" in plain
    assert_no_token(lines.texts, TOKEN)


def test_the_development_servers_access_line_names_the_path_only(lines):
    """`manage.py runserver` (daphne's) logs each response with its whole path."""
    from daphne.management.commands.runserver import Command

    details = {
        "method": "GET",
        "path": f"/api/v1/ws/lobby?token={TOKEN}",
        "status": 404,
        "time_taken": 0.01,
        "client": "127.0.0.1:5000",
    }
    Command(no_color=True).log_action("http", "complete", details)
    [entry] = lines.entries
    assert entry["logger"] == "django.channels.server"
    assert entry["message"] == "HTTP GET /api/v1/ws/lobby 404 [0.01, 127.0.0.1:5000]"
    assert_no_token(lines.texts, TOKEN)


def test_arguments_and_extra_fields_are_redacted_and_numbers_kept(lines):
    scope = {
        "type": "websocket",
        "path": "/api/v1/ws/lobby",
        "query_string": f"room=a&token={TOKEN}".encode(),
        "headers": [(b"authorization", f"Bearer {TOKEN}".encode())],
    }
    extra = {"url": f"/api/v1/ws/lobby?token={TOKEN}", "auth": f"Bearer {TOKEN}"}
    log.warning("refused %r", scope, extra={**extra, "status": 403, "ok": False, "none": None})
    [entry] = lines.entries
    assert f"'query_string': b'{REDACTED}'" in entry["message"]
    assert f"(b'authorization', b'{REDACTED}')" in entry["message"]
    assert "'path': '/api/v1/ws/lobby'" in entry["message"]
    assert (entry["url"], entry["auth"]) == ("/api/v1/ws/lobby", f"Bearer {REDACTED}")
    assert (entry["status"], entry["ok"], entry["none"]) == (403, False, None)
    assert_no_token(lines.texts, TOKEN)


def test_arguments_that_do_not_format_are_not_shown(lines):
    log.warning("%d refused", TOKEN)  # logging would print the arguments of a failed format
    [entry] = lines.entries
    assert entry["message"] == "%d refused (arguments not shown: they did not format)"
    assert_no_token(lines.texts, TOKEN)


def http_status(worker: Worker, method: str, target: str, headers: dict | None = None) -> int:
    """The status of one request, sent as written (no normalisation of the target)."""
    connection = http.client.HTTPConnection(HOST, worker.port, timeout=10)
    try:
        body = "name=mallory" if method == "POST" else None
        form = {"Content-Type": "application/x-www-form-urlencoded"} if body else {}
        connection.request(method, target, body=body, headers={**form, **(headers or {})})
        return connection.getresponse().status
    finally:
        connection.close()


async def handshake_status(worker: Worker, path: str, **kwargs) -> int:
    """The HTTP status of a refused WebSocket handshake."""
    with pytest.raises(InvalidStatus) as refused:
        await ChatSocket.open(worker.url, path, **kwargs)
    return refused.value.response.status_code


@pytest.mark.parametrize("log_format", ["json", "plain"])
async def test_a_workers_logs_hold_no_token_after_hostile_requests(tmp_path, log_format):
    """A real worker, each refusal that made Django or daphne log a request, with a real
    token in the URL or header: HTTP (4xx, and a 5xx of DEBUG's static files handler) and
    WebSocket handshakes. Its log files (also read by the suite's log scan) hold no token,
    yet every refusal is there, by method and path."""
    with run_workers(tmp_path, env={"LOG_FORMAT": log_format}) as (worker,):
        statuses = {
            case: http_status(
                worker,
                method.upper(),
                url.format(token=TOKEN),
                {name: value.format(token=TOKEN, expired=EXPIRED) for name, value in h.items()},
            )
            for case, (method, url, h, _, _, _) in REFUSED.items()
        }
        statuses["static file outside its directory"] = http_status(
            worker, "GET", f"/static/..%2f..%2fetc?token={TOKEN}"
        )
        statuses["socket, origin not allowed"] = await handshake_status(
            worker, "/api/v1/ws/lobby", token=TOKEN, origin="http://evil.example"
        )
        # An unrouted path (protocol §16): accepted, INVALID_ROOM, 4004; never a 500.
        unrouted = await ChatSocket.open(worker.url, f"/elsewhere&token={TOKEN}")
        await unrouted.expect_error("INVALID_ROOM")
        await unrouted.expect_close(4004)
        accepted = await ChatSocket.open(worker.url, "/api/v1/ws/log-redaction", token=TOKEN)
        await accepted.expect("connection_ack")
        await accepted.close()
        expired = await ChatSocket.open(worker.url, "/api/v1/ws/log-redaction", token=EXPIRED)
        await expired.expect_error("AUTH_INVALID")
        await expired.expect_close(4003)
    # the worker has stopped: its logs are complete

    expected = {case: spec[3] for case, spec in REFUSED.items()}
    expected |= {
        "static file outside its directory": 500,
        "socket, origin not allowed": 403,
    }
    assert statuses == expected
    logged = worker.log_lines()
    assert_no_token(logged, TOKEN, EXPIRED)
    for fragment in [
        *(spec[5] for spec in REFUSED.values()),
        "Exception inside application: The joined path",
        "GET /api/v1/ws/lobby 404",
        f"WSCONNECTING /elsewhere&token={REDACTED}",
        "WSCONNECT /api/v1/ws/log-redaction",
    ]:
        assert any(fragment in line for line in logged), fragment
    if log_format == "json":
        summaries = {(r["logger"], r.get("request")) for r in worker.log_records()}
        assert {
            ("django.request", "GET /api/v1/ws/lobby"),
            ("django.request", f"GET /api/v1/ws/lobby&token={REDACTED}"),
            ("django.request", "GET /api/v1/ws/chat/stats"),
            ("django.security.csrf", "POST /dev/token"),
            ("django.security.csrf", "POST /admin/login/"),
            ("django.security.DisallowedHost", "GET /"),
        } <= summaries
