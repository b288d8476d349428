"""The worker launcher (clarity_project/serve.py) against a real daphne worker: daphne's own
message limit (CHAT_WS_MAX_FRAME_SIZE, close 1009) above the application's (typed errors), and
an access log through `logging` that names paths, never query strings."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator

import pytest
from websockets.exceptions import ConnectionClosed

from chat.testing.client import ChatSocket, token_for
from chat.testing.processes import ROOT, Worker
from clarity_project.serve import daphne_arguments
from tests.servers import run_workers, server_env

# Not the default, so the test shows that the launcher passes the setting to daphne.
LIMIT = 1_200_000
HEALTH_LIMIT = 1_000_000
MESSAGE_LIMIT = 65_536


@pytest.fixture(scope="module")
def worker(tmp_path_factory) -> Iterator[Worker]:
    env = {
        "CHAT_WS_MAX_FRAME_SIZE": str(LIMIT),
        "CHAT_MAX_HEALTH_PAYLOAD_SIZE": str(HEALTH_LIMIT),
        "CHAT_MAX_MESSAGE_SIZE": str(MESSAGE_LIMIT),
    }
    with run_workers(tmp_path_factory.mktemp("serve"), env=env) as workers:
        yield workers[0]


@pytest.fixture
async def client(worker: Worker, request) -> AsyncIterator[ChatSocket]:
    """A socket in room `limits` (a user of its own per test); the worker's logs are printed
    at teardown, which pytest shows for a failed test only."""
    opened = await ChatSocket.join(worker.url, "limits", request.node.name[:40])
    yield opened
    await opened.close()
    print(worker.logs())


def frame_of(size: int, type_: str) -> str:
    """A text frame of exactly `size` UTF-8 bytes, of this type."""
    head = json.dumps({"type": type_, "content": {}})[:-1] + ', "pad": "'
    return head + "x" * (size - len(head) - 2) + '"}'


def test_the_limit_is_passed_to_daphne_and_the_application_is_named(settings):
    settings.CHAT_WS_MAX_FRAME_SIZE = 1234
    arguments = daphne_arguments(["-e", "tcp:port=8001", "-v", "1"])
    assert arguments[:4] == ["-e", "tcp:port=8001", "-v", "1"]
    assert arguments[4:] == [
        "--websocket-max-message-size",
        "1234",
        "--websocket-max-frame-size",
        "1234",
        "clarity_project.asgi:application",
    ]


@pytest.mark.parametrize(
    ("size", "type_", "max_size"),
    [
        (LIMIT, "health_insight", HEALTH_LIMIT),
        (LIMIT, "message", HEALTH_LIMIT),  # over every application limit: the absolute one
        (HEALTH_LIMIT, "message", MESSAGE_LIMIT),
    ],
)
async def test_a_frame_up_to_the_limit_gets_a_typed_error_and_the_socket_stays(
    client, size, type_, max_size
):
    await client.send_raw(frame_of(size, type_))
    error = await client.expect_error("MESSAGE_TOO_LARGE", timeout=10)
    assert error["details"] == {"max_size": max_size}
    await client.send({"type": "heartbeat"})
    await client.expect("heartbeat_ack")
    await client.send({"type": "message", "content": "still here"})
    assert (await client.expect("message"))["content"] == "still here"


async def test_a_frame_over_the_limit_is_closed_1009_by_daphne(client, worker):
    with contextlib.suppress(ConnectionClosed):  # the close may overtake the send
        await client.send_raw(frame_of(LIMIT + 1, "health_insight"))
    closed = await client.expect_close(1009, timeout=10)
    assert "exceeds payload limit" in closed.rcvd.reason
    # the application never saw the frame, only the socket's end
    again = await ChatSocket.join(worker.url, "limits", "after-1009")
    await again.close()


def access_records(worker: Worker) -> list[dict]:
    return [entry for entry in worker.log_records() if entry["logger"] == "daphne.access"]


async def test_the_access_log_names_paths_never_query_strings(worker):
    token = token_for("query-string-user")
    with urllib.request.urlopen(f"{worker.http_url}/healthz?token={token}", timeout=5) as reply:
        assert reply.status == 200
    client = await ChatSocket.open(worker.url, "/api/v1/ws/access-log", token=token)
    await client.expect("connection_ack")
    await client.close()

    log = worker.stderr_path.read_text()
    assert token not in log and "?token" not in log
    records = access_records(worker)
    http = [r for r in records if r.get("path") == "/healthz"]
    assert http and http[-1]["status"] == 200 and http[-1]["method"] == "GET"
    events = [r["event"] for r in records if r.get("path") == "/api/v1/ws/access-log"]
    assert events[:2] == ["WSCONNECTING", "WSCONNECT"]


async def test_every_line_a_worker_logs_is_one_json_object(client, worker):
    await client.close()
    entries = worker.log_records()
    assert all({"time", "level", "logger", "message"} <= entry.keys() for entry in entries)
    assert len({entry["worker_id"] for entry in entries}) == 1
    assert {"daphne.cli", "daphne.access", "chat.consumers"} <= {e["logger"] for e in entries}


def test_a_limit_below_the_applications_is_refused():
    result = subprocess.run(
        [sys.executable, "-c", "import django.conf; django.conf.settings.DEBUG"],
        cwd=ROOT,
        env=server_env({"CHAT_WS_MAX_FRAME_SIZE": str(HEALTH_LIMIT - 1)}),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    assert "CHAT_WS_MAX_FRAME_SIZE must be at least" in result.stderr


def test_the_application_module_freezes_what_it_loaded():
    """Full garbage collections would scan Django and every library on each pass (tens of
    milliseconds of stall per collection on a busy worker): asgi.py freezes them."""
    import gc

    import clarity_project.asgi  # noqa: F401

    assert gc.get_freeze_count() > 10_000


def test_a_worker_never_loads_its_assistant_sdk():
    """google-genai costs ~450 µs of CPU per streamed event and ~80,000 objects once
    imported: it runs in the worker's provider process (chat/assistant/process.py), never in
    the worker, whose event loop every socket waits on."""
    probe = (
        "import sys\n"
        "import clarity_project.asgi\n"
        "from chat.assistant.process import ProviderProcess\n"
        "from chat.assistant.base import get_provider\n"
        "assert isinstance(get_provider(), ProviderProcess)\n"
        "print('google.genai' in sys.modules)\n"
    )
    env = server_env({"ASSISTANT_PROVIDER": "gemini", "GEMINI_API_KEY": "test-key"})
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
