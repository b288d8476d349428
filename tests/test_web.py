"""The browser client's HTTP side (chat/web.py): the page at `/`, the development sign-in
endpoint, and the sample data file served with the client."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from channels.testing import ApplicationCommunicator
from django.test import Client

from chat.auth import EMULATOR_ENV, verify_token
from chat.protocol import ROOM_ID_RE
from chat.web import dev_uid


def claims(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def config(response) -> dict:
    """The client configuration the page hands its script (json_script)."""
    html = response.content.decode()
    start = html.index('<script id="clarity-config" type="application/json">')
    start = html.index(">", start) + 1
    return json.loads(html[start : html.index("</script>", start)])


@pytest.fixture
def production(settings, monkeypatch):
    """Real Firebase: no emulator, DEBUG off."""
    monkeypatch.delenv(EMULATOR_ENV, raising=False)
    settings.DEBUG = False
    return settings


def test_page_renders_the_rooms_list_and_dev_sign_in(client):
    """Rooms are deny by default (protocol §11): the page lists the user's and the public
    rooms and has forms to start a private or a direct room, instead of a free room id."""
    response = client.get("/")
    assert response.status_code == 200
    html = response.content.decode()
    for element in ('id="my-rooms"', 'id="public-rooms"', 'id="new-room-form"', 'id="direct-form"'):
        assert element in html, element
    assert 'id="dev-sign-in"' in html and "Dev sign-in" in html
    assert "csrfmiddlewaretoken" in html
    assert config(response) == {
        "signIn": {"method": "dev", "tokenUrl": "/dev/token"},
        "socketPath": "/api/v1/ws/",
        "apiBase": "/api/v1/",
        "roomIdPattern": ROOM_ID_RE.pattern,
        "aiUserId": "AI",
        "aiMention": "@ai",
        "maxMessageChars": 2000,
        "historyMaxLimit": 100,
        # What the client does after each close (protocol §10, §11, §16)
        "closeCodes": {
            "final": [4004, 4008, 4010],
            "roomRefused": [4004],
            "auth": [4001, 4003],
            "rateLimited": [4029],
            "slow": [4009],
        },
        "typingTimeout": 10,
        "sampleDataUrl": "/static/chat/sample-health.json",
    }


def test_dev_token_answers_a_token_the_server_accepts():
    client = Client(enforce_csrf_checks=True)
    page = client.get("/")
    csrf = page.cookies["csrftoken"].value
    response = client.post("/dev/token", {"name": "  Ana María "}, headers={"X-CSRFToken": csrf})
    assert response.status_code == 200
    answer = response.json()
    assert answer["user_id"] == dev_uid("Ana María") == "dev-ana-maría"
    assert answer["username"] == "Ana María"
    assert claims(answer["token"])["name"] == "Ana María"
    identity = verify_token(answer["token"])
    assert identity.user_id == "dev-ana-maría" and identity.username == "Ana María"


def test_dev_token_needs_csrf_and_a_name():
    client = Client(enforce_csrf_checks=True)
    assert client.post("/dev/token", {"name": "Ana"}).status_code == 403
    csrf = client.get("/").cookies["csrftoken"].value
    for name in ("", "   ", "!!!", "x" * 51):
        response = client.post("/dev/token", {"name": name}, headers={"X-CSRFToken": csrf})
        assert response.status_code == 400, name
        assert "name" in response.json()["error"]
    assert client.get("/dev/token").status_code == 405


def test_same_name_same_user():
    assert dev_uid("Ana") == dev_uid(" ana ") == "dev-ana"
    assert dev_uid("Ana") != dev_uid("Ben")


@pytest.mark.parametrize("debug, emulator", [(False, True), (True, False), (False, False)])
def test_no_dev_sign_in_outside_development(client, settings, monkeypatch, debug, emulator):
    settings.DEBUG = debug
    if emulator:
        monkeypatch.setenv(EMULATOR_ENV, "127.0.0.1:9099")
    else:
        monkeypatch.delenv(EMULATOR_ENV, raising=False)
    assert client.post("/dev/token", {"name": "Ana"}).status_code == 404
    assert client.get("/dev/token").status_code == 404
    response = client.get("/")
    assert response.status_code == 200
    html = response.content.decode()
    assert "dev-sign-in" not in html and "Dev sign-in" not in html
    assert config(response)["signIn"]["method"] in {"none", "firebase"}


def test_firebase_sign_in_when_configured(client, production):
    production.FIREBASE_WEB_API_KEY = "web-api-key"
    production.FIREBASE_AUTH_DOMAIN = "clarity.example.com"
    production.FIREBASE_JS_SDK_URL = "https://cdn.example.com/firebasejs/13.2.0/"
    response = client.get("/")
    assert config(response)["signIn"] == {
        "method": "firebase",
        "sdkUrl": "https://cdn.example.com/firebasejs/13.2.0",
        "apiKey": "web-api-key",
        "authDomain": "clarity.example.com",
        "projectId": production.FIREBASE_PROJECT_ID,
        "webPush": None,
    }
    assert 'id="google-sign-in"' in response.content.decode()


def test_no_sign_in_without_a_web_api_key(client, production):
    production.FIREBASE_WEB_API_KEY = ""
    response = client.get("/")
    assert config(response)["signIn"] == {"method": "none"}
    assert "Sign-in is not configured" in response.content.decode()


def test_user_data_in_settings_is_escaped_in_the_page(client, production):
    production.FIREBASE_WEB_API_KEY = "</script><script>alert(1)</script>"
    response = client.get("/")
    assert "<script>alert(1)" not in response.content.decode()
    assert config(response)["signIn"]["apiKey"] == "</script><script>alert(1)</script>"


async def http_get(application, path: str) -> tuple[int, bytes]:
    """One GET through an ASGI application (channels' HttpCommunicator cannot read Django's
    streamed responses, whose last body message has no `body` key)."""
    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": "GET",
        "path": path,
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1")],
    }
    communicator = ApplicationCommunicator(application, scope)
    await communicator.send_input({"type": "http.request", "body": b""})
    start = await communicator.receive_output(5)
    body = b""
    while True:
        message = await communicator.receive_output(5)
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return start["status"], body


@pytest.mark.django_db(transaction=True)
async def test_sample_data_file_is_served():
    """Through the real ASGI application, as daphne serves it (DEBUG)."""
    from clarity_project.asgi import application

    status, body = await http_get(application, "/static/chat/sample-health.json")
    assert status == 200
    points = json.loads(body)["data_points"]
    assert len(points) == 2 * 24 * 60
    assert points[0] == {"timestamp": "2025-06-01T00:00:00Z", "value": 0}
    assert len(body) <= 200_000


def test_the_browser_client_reads_server_constants_from_its_config():
    """Close codes, the assistant's id and mention, the room-id rule and the typing timeout
    come from `client_config()`; a copy in the scripts would drift from the server."""
    scripts = Path(__file__).resolve().parent.parent / "chat" / "static" / "chat"
    for script in scripts.glob("*.js"):
        source = script.read_text()
        assert not re.findall(r"\b40(?!00)\d\d\b", source), f"{script.name}: a close code literal"
        for constant in ('"AI"', "'AI'", '"@ai"', "A-Za-z0-9", "10000", "10 s"):
            assert constant not in source, f"{script.name}: {constant}"


# --- web push (protocol §13) --------------------------------------------------------------------


def web_push_settings(production) -> None:
    production.FIREBASE_WEB_API_KEY = "web-api-key"
    production.FIREBASE_WEB_PUSH_KEY = "BPublicVapidKey"
    production.FIREBASE_MESSAGING_SENDER_ID = "1234567890"
    production.FIREBASE_APP_ID = "1:1234567890:web:abc"


def test_web_push_is_offered_only_with_firebase_and_its_three_settings(client, production):
    web_push_settings(production)
    sign_in = config(client.get("/"))["signIn"]
    assert sign_in["webPush"] == {
        "vapidKey": "BPublicVapidKey",
        "messagingSenderId": "1234567890",
        "appId": "1:1234567890:web:abc",
        "serviceWorker": "/firebase-messaging-sw.js",
    }
    production.FIREBASE_APP_ID = ""
    assert config(client.get("/"))["signIn"]["webPush"] is None


def test_the_push_service_worker_is_served_only_where_web_push_is_configured(client, production):
    assert client.get("/firebase-messaging-sw.js").status_code == 404
    web_push_settings(production)
    response = client.get("/firebase-messaging-sw.js")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/javascript")
    script = response.content.decode()
    assert '"https://www.gstatic.com/firebasejs/13.2.0" + "/firebase-messaging-compat.js"' in script
    assert '"messagingSenderId": "1234567890"' in script and "BPublicVapidKey" not in script


def test_no_web_push_and_no_service_worker_in_development(client):
    assert "webPush" not in config(client.get("/"))["signIn"]
    assert client.get("/firebase-messaging-sw.js").status_code == 404
