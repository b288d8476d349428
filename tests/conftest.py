"""Fixtures: a fresh in-memory channel layer, shared state and cache per test, emulator
tokens, and a small client that drives the real ASGI application through Channels'
WebsocketCommunicator."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import respx
from channels.db import database_sync_to_async
from channels.layers import channel_layers, get_channel_layer
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.core.cache import caches
from django_otp.oath import totp
from django_otp.plugins.otp_totp.models import TOTPDevice

from chat.assistant.builtin import BuiltinProvider
from chat.deltas import DeltaTurns, Emit
from chat.devtokens import emulator_token
from chat.history import message_store
from chat.models import ChatSession
from chat.protocol import MessageType, frame
from chat.replies import assistant_reply
from chat.rooms import room_event
from chat.shared_state import MemoryState, RedisState, SharedState, shared_state
from chat.testing.client import heartbeat_probe
from chat.testing.redis_server import REDIS_SERVER, REDIS_URL, PrivateRedis, redis_answers
from chat.timers import LoopClock
from chat.writer import MessageWriter
from tests.gemini_api import GENERATE_URL, GeminiServer
from tests.logscan import remember_sent

# The budgets off (protocol §16), for tests that throw hundreds of frames or sockets at one
# user to check something else (the answer to each frame, what leaks): they are tested
# themselves in tests/test_fair_share.py.
NO_BUDGETS = {
    "CHAT_MESSAGE_RATE_LIMIT": 100_000,
    "CHAT_RATE_LIMIT_CLOSE_FACTOR": 1_000,
    "CHAT_INBOUND_BYTES_PER_MINUTE": 0,
    "CHAT_CATCH_UP_RATE_LIMIT": 0,
    "CHAT_CONNECT_RATE_LIMIT": 0,
    "CHAT_CONNECT_RATE_LIMIT_PER_ADDRESS": 0,
    "CHAT_ANALYSIS_RATE_LIMIT": 100_000,  # malformed analysis requests count toward it too
}


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix, tmp_path_factory):
    """The in-process tests' SQLite database is a file, as in production (WAL, busy
    timeout), not Django's default shared-cache in-memory database: that one refuses a writer
    at once while another thread reads a table ("database table is locked") where SQLite on a
    file waits, so tests whose requests and sockets use the database from two threads (as
    daphne runs them) failed now and then."""
    database = settings.DATABASES["default"]
    if database["ENGINE"] == "django.db.backends.sqlite3":
        name = tmp_path_factory.mktemp("database") / "test.sqlite3"
        database.setdefault("TEST", {})["NAME"] = str(name)


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory) -> Iterator[PrivateRedis]:
    """A redis-server of the module's own, which its tests may kill, stall and restart (the
    machine's Redis on 6379 is shared: never disturbed). Skipped without redis-server."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (these tests start their own)")
    server = PrivateRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop(signal.SIGTERM)


@pytest.fixture(autouse=True)
def fresh_shared_state():
    """Each test starts with an empty channel layer, shared state and cache."""

    def clear() -> None:
        channel_layers.backends.clear()
        shared_state().clear()
        caches["default"].clear()

    clear()
    yield
    clear()


def stored_message(room_id: str, user_id: str, content: str = "hi") -> dict:
    """A user's message stored in a room as the socket path stores it: its frame."""
    return message_store(
        room_id=room_id,
        user_id=user_id,
        username=user_id.title(),
        content=content,
        metadata=None,
        client_message_id=None,
    )


async def builtin_reply(question: dict, *, user_id: str, username: str, emit: Emit) -> dict:
    """`assistant_reply` to a stored question with the built-in provider, delta turns on the
    loop's clock, a context-reading thread and a message writer of its own: the stored
    reply's frame."""
    with ThreadPoolExecutor(max_workers=1) as reads:
        return await assistant_reply(
            provider=BuiltinProvider(),
            question=question,
            user_id=user_id,
            username=username,
            emit=emit,
            turns=DeltaTurns(clock=LoopClock()),
            reads=reads,
            writer=MessageWriter(),
        )


def token_for(uid: str, name: str | None = None, **kwargs: Any) -> str:
    return emulator_token(uid=uid, name=name if name is not None else uid.title(), **kwargs)


class ChatClient:
    """A test-side WebSocket client speaking the v1 protocol."""

    def __init__(self, communicator: WebsocketCommunicator):
        self.communicator = communicator
        self.closed = False
        self.ack: dict | None = None
        self.presence: dict | None = None
        self.history: dict | None = None

    async def recv(self, timeout: float = 2) -> dict:
        return json.loads(await self.communicator.receive_from(timeout))

    async def recv_type(self, type_: str, timeout: float = 2) -> dict:
        """The next frame of this type; frames of other types before it are skipped."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            frame = await self.recv(max(remaining, 0.01))
            if frame["type"] == type_:
                return frame

    async def send(self, payload: Any) -> None:
        remember_sent(payload)
        await self.communicator.send_to(text_data=json.dumps(payload))

    async def send_text(self, text: str) -> None:
        remember_sent(text)
        await self.communicator.send_input({"type": "websocket.receive", "text": text})

    async def send_bytes(self, data: bytes) -> None:
        await self.communicator.send_input({"type": "websocket.receive", "bytes": data})

    async def expect_error(self, code: str, timeout: float = 2) -> dict:
        frame = await self.recv(timeout)
        assert frame["type"] == "error", frame
        assert frame["error_code"] == code, frame
        return frame

    async def expect_close(self, code: int, timeout: float = 2) -> dict:
        output = await self.communicator.receive_output(timeout)
        assert output["type"] == "websocket.close", output
        assert output.get("code") == code, output
        await self.close()
        return output

    async def expect_refusal(self, error_code: str, close_code: int) -> dict:
        error = await self.expect_error(error_code)
        await self.expect_close(close_code)
        return error

    async def expect_nothing_pending(self) -> None:
        """No frame sent to this open socket is unread. Two markers must each be the very next
        frame: a heartbeat's ack (the socket's frames are handled one at a time, in order, so
        whatever they caused was sent before it), then a frame put on the socket's channel-layer
        queue (first in, first out: every room frame queued for it earlier comes first). The
        ack alone is not enough: Channels handles a received frame before a channel-layer
        message that became ready at the same moment. What the server may still do in the
        background (an assistant reply) is not covered: first wait for what shows it decided."""
        probe = heartbeat_probe()
        await self.send(probe)
        ack = await self.recv(timeout=5)
        assert ack["type"] == "heartbeat_ack", ack
        assert ack["client_timestamp"] == probe["client_timestamp"], (probe, ack)
        marker = frame(
            MessageType.SYSTEM, content=f"marker {probe['client_timestamp']}", level="info"
        )
        await get_channel_layer().send(await self.channel_name(), room_event(marker))
        assert await self.recv(timeout=5) == marker

    async def channel_name(self) -> str:
        """The channel-layer name of this joined socket (its session row has it)."""
        assert self.ack is not None, "the socket has not joined"
        session = await database_sync_to_async(ChatSession.objects.get)(
            session_id=self.ack["session_id"]
        )
        return session.channel_name

    async def close_and_expect_nothing_more(self) -> None:
        """For a socket the server closed: complete the close; nothing was sent after it. Once
        the application has returned, everything it ever sent is in the output queue."""
        await self.close()
        queue = self.communicator.output_queue
        assert queue.empty(), queue.get_nowait()

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            await self.communicator.disconnect(timeout=5)


def room_ensure(room_id: str, *, kind: str = "public") -> None:
    """Test set-up: the room exists (rooms are no longer made by joining, protocol §11)."""
    from chat.models import Room

    Room.objects.get_or_create(name=room_id, defaults={"kind": kind})


async def open_socket(
    room: str = "lobby",
    *,
    token: str | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
    path: str | None = None,
    public_room: bool = False,
) -> ChatClient:
    """Open a socket; returns the client once the server accepted the handshake.
    `public_room`: make `room` a public room first if it does not exist."""
    from channels.db import database_sync_to_async

    from clarity_project.asgi import application

    if public_room and path is None:
        await database_sync_to_async(room_ensure)(room)

    url = path or f"/api/v1/ws/{room}"
    if token is not None:
        url += f"?token={token}"
    communicator = WebsocketCommunicator(application, url, headers=headers)
    connected, _ = await communicator.connect(timeout=5)
    assert connected, "handshake refused"
    return ChatClient(communicator)


async def join(
    room: str = "lobby", uid: str = "alice", name: str | None = None, **kw
) -> ChatClient:
    """Open a socket with a valid token and read the join frames (ack, presence, history).
    The room is made public if it does not exist, unless `public_room=False`."""
    kw.setdefault("public_room", True)
    return await read_join(await open_socket(room, token=token_for(uid, name), **kw))


async def read_join(client: ChatClient) -> ChatClient:
    """Read the join frames of a socket that must have been let in."""
    client.ack = await client.recv()
    assert client.ack["type"] == "connection_ack", client.ack
    client.presence = await client.recv()
    assert client.presence["type"] == "presence", client.presence
    client.history = await client.recv()
    assert client.history["type"] == "history", client.history
    return client


@pytest.fixture
async def clients():
    """Collects clients and closes them all at the end of the test."""
    opened: list[ChatClient] = []

    class Opener:
        async def join(self, *args, **kwargs) -> ChatClient:
            client = await join(*args, **kwargs)
            opened.append(client)
            return client

        async def open(self, *args, **kwargs) -> ChatClient:
            client = await open_socket(*args, **kwargs)
            opened.append(client)
            return client

    yield Opener()
    for client in opened:
        await client.close()


@pytest.fixture
def gemini(settings, monkeypatch):
    """Gemini Developer API settings; environment that would steer the SDK is removed."""
    for name in (
        "GOOGLE_GENAI_HTTP_CLIENT",
        "GOOGLE_GENAI_USE_VERTEXAI",
        "GOOGLE_GENAI_USE_ENTERPRISE",
        "GOOGLE_GENAI_API_VERSION",
        "GOOGLE_API_KEY",
        "GEMINI_API_KEY",
        "GOOGLE_CLOUD_PROJECT",
        "GOOGLE_CLOUD_LOCATION",
        "GOOGLE_APPLICATION_CREDENTIALS",
    ):
        monkeypatch.delenv(name, raising=False)
    settings.ASSISTANT_PROVIDER = "gemini"
    settings.GEMINI_API_KEY = "test-key"
    settings.GEMINI_MODEL = "gemini-2.5-pro"
    settings.ASSISTANT_TIMEOUT = 5
    settings.ASSISTANT_FIRST_CHUNK_TIMEOUT = 5
    settings.ASSISTANT_BREAKER_FAILURES = 5
    settings.ASSISTANT_BREAKER_RESET = 60
    return settings


@pytest.fixture
async def api(request, gemini):
    """The mocked Gemini API (tests/gemini_api.py); `api.generate` is generateContent. Its
    routes answer this process's SDK calls and, over HTTP at GEMINI_BASE_URL, the worker's
    provider process. A test that talks through sockets (`clients`) gets that process
    started first: it takes ~1.5 s, outside every test's timeouts, as at a worker's start."""
    with respx.mock(using="httpcore2", assert_all_called=False) as router:
        router.generate = router.post(url__regex=GENERATE_URL.pattern)
        server = GeminiServer(router)
        await server.start()
        gemini.GEMINI_BASE_URL = server.url
        router.server = server
        provider = None
        if "clients" in request.fixturenames:
            from clarity_project.asgi import worker

            provider = worker.assistant
            await provider.prepare()
        try:
            yield router
        finally:
            if provider is not None:
                provider.close()
            await server.close()


@pytest.fixture
def staff_user(django_user_model):
    """A staff user who is not a superuser, given every permission there is (the audit's
    too): what a superuser alone may do stays refused."""
    from django.contrib.auth.models import Permission

    user = django_user_model.objects.create_user("olga", password="olga-pw", is_staff=True)
    user.user_permissions.set(Permission.objects.all())
    return user


@pytest.fixture
def staff_client(client, staff_user):
    client.force_login(staff_user)
    return client


# --- helpers several test files share -------------------------------------------------------


def use_backend(kind: str, settings) -> SharedState:
    """The process's backend as settings choose it: memory, or Redis under a fresh prefix."""
    if kind == "redis":
        if not redis_answers():
            pytest.skip(f"no Redis at {REDIS_URL}")
        settings.REDIS_URL = REDIS_URL
        settings.REDIS_PREFIX = f"test-state-{uuid.uuid4().hex}"
    else:
        settings.REDIS_URL = None
    backend = shared_state()
    assert isinstance(backend, RedisState if kind == "redis" else MemoryState)
    return backend


async def act_as_daphne(client, frames: list) -> None:
    """What daphne does when the application closes a socket: the closing handshake, then
    `websocket.disconnect` to the application. Records what the socket received."""
    frames.append(await client.recv(timeout=5))
    output = await client.communicator.receive_output(timeout=5)
    frames.append(output)
    await client.close()


def totp_token(device: TOTPDevice) -> str:
    """The device's current TOTP code."""
    return f"{totp(device.bin_key, device.step, device.t0, device.digits, device.drift):06d}"


def second_factor(device: TOTPDevice, otp_token: str) -> dict[str, str]:
    """The admin login form's second-factor fields."""
    return {"otp_device": device.persistent_id, "otp_token": otp_token}


async def frames_until_close(client, *, most: int = 100) -> tuple[list[dict], int]:
    """Every frame the server sends until it closes, and its close code. Frames a client
    sends after the server decided to close are ignored, so what comes out is exact."""
    frames = []
    for _ in range(most):
        output = await client.communicator.receive_output(5)
        if output["type"] == "websocket.close":
            await client.close()
            return frames, output["code"]
        frames.append(json.loads(output["text"]))
    raise AssertionError(f"not closed after {most} frames: {frames[-3:]}")
