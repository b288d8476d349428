"""Origin policy at the handshake: refused before any consumer code runs (HTTP 403)."""

import pytest
from channels.testing import WebsocketCommunicator

from chat.origins import normalize_origin, origin_allowed
from clarity_project.asgi import application
from tests.conftest import token_for

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def allow_list(settings):
    settings.CHAT_ALLOWED_ORIGINS = ["https://app.clarity.example", "http://localhost:8000"]
    settings.CHAT_ALLOW_NO_ORIGIN = True


async def handshake(origin: bytes | None) -> tuple[bool, object]:
    headers = [(b"origin", origin)] if origin is not None else []
    communicator = WebsocketCommunicator(
        application, f"/api/v1/ws/lobby?token={token_for('alice')}", headers=headers
    )
    result = await communicator.connect(timeout=5)
    await communicator.disconnect()
    return result


@pytest.mark.parametrize(
    "origin",
    [b"https://app.clarity.example", b"https://APP.clarity.example:443", b"http://localhost:8000"],
)
async def test_allowed_origins_connect(origin):
    assert (await handshake(origin))[0] is True


@pytest.mark.parametrize(
    "origin",
    [
        b"null",
        b"https://app.clarity.example.evil.com",
        b"https://evilapp.clarity.example",
        b"http://app.clarity.example",
        b"https://app.clarity.example:8443",
        b"http://localhost:8001",
        b"file://",
        b"",
        b"https://app.clarity.example/path",
    ],
)
async def test_other_origins_are_refused_before_accept(origin):
    connected, _ = await handshake(origin)
    assert connected is False


async def test_native_clients_without_origin(settings):
    assert (await handshake(None))[0] is True
    settings.CHAT_ALLOW_NO_ORIGIN = False
    assert (await handshake(None))[0] is False


def test_normalize_origin():
    assert normalize_origin("HTTPS://Example.COM:443") == "https://example.com"
    assert normalize_origin("http://[::1]:8000") == "http://[::1]:8000"
    assert normalize_origin("null") is None
    assert normalize_origin("https://u:p@example.com") is None
    assert origin_allowed(None) is True
