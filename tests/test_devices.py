"""Push devices (protocol §13): registering and removing FCM registration tokens over HTTP.
A token moves to whoever registers it last, is removed by its own user only and only by a
body (never a URL), is never answered back or logged, and a user's devices are bounded."""

from __future__ import annotations

import logging

import pytest

from chat.models import Device
from tests.test_api import send

pytestmark = pytest.mark.django_db

TOKEN = "fcm-token_abc:APA91b" + "x" * 140


def devices() -> dict[str, tuple[str, str]]:
    return {d.token: (d.user_id, d.platform) for d in Device.objects.all()}


def test_a_token_is_registered_once_and_moves_to_whoever_registers_it_last(client):
    first = send(client, "POST", "/api/v1/devices", "alice", {"token": TOKEN, "platform": "ios"})
    assert (first.status_code, first.json()) == (201, {"platform": "ios", "registered": True})
    again = send(client, "POST", "/api/v1/devices", "alice", {"token": TOKEN, "platform": "ios"})
    assert again.status_code == 200
    assert devices() == {TOKEN: ("alice", "ios")}
    # The phone changed hands (or alice signed out and bob in): it is bob's now, only his.
    moved = send(client, "POST", "/api/v1/devices", "bob", {"token": TOKEN, "platform": "ios"})
    assert moved.status_code == 201
    assert devices() == {TOKEN: ("bob", "ios")}


def test_a_token_is_removed_by_its_own_user_by_body_only(client):
    send(client, "POST", "/api/v1/devices", "alice", {"token": TOKEN, "platform": "android"})
    # Someone else's token: nothing happens, and the answer is the one for an unknown token.
    other = send(client, "DELETE", "/api/v1/devices", "mallory", {"token": TOKEN})
    unknown = send(client, "DELETE", "/api/v1/devices", "mallory", {"token": "nope"})
    assert other.json() == unknown.json() == {"removed": False}
    assert devices() == {TOKEN: ("alice", "android")}
    # Not by a URL: a token in the query string is no request to remove anything.
    in_url = send(client, "DELETE", f"/api/v1/devices?token={TOKEN}", "alice")
    assert in_url.status_code == 400 and in_url.json()["error_code"] == "INVALID_REQUEST"
    assert devices() == {TOKEN: ("alice", "android")}
    removed = send(client, "DELETE", "/api/v1/devices", "alice", {"token": TOKEN})
    assert (removed.status_code, removed.json()) == (200, {"removed": True})
    assert devices() == {}


def test_a_users_devices_are_bounded_the_oldest_goes(client, settings):
    settings.CHAT_MAX_DEVICES_PER_USER = 2
    for n in range(3):
        send(client, "POST", "/api/v1/devices", "alice", {"token": f"t{n}", "platform": "web"})
    assert sorted(devices()) == ["t1", "t2"]


@pytest.mark.parametrize(
    "body",
    [
        {"token": TOKEN},
        {"token": TOKEN, "platform": "blackberry"},
        {"token": "", "platform": "web"},
        {"token": "has spaces", "platform": "web"},
        {"token": "x" * 4097, "platform": "web"},
        {"token": 12345, "platform": "web"},
    ],
)
def test_a_malformed_registration_is_refused_without_echoing_it(client, body):
    response = send(client, "POST", "/api/v1/devices", "alice", body)
    assert response.status_code == 400 and response.json()["error_code"] == "INVALID_REQUEST"
    assert TOKEN not in response.content.decode()
    assert devices() == {}


def test_devices_need_a_signed_in_user(client):
    response = send(client, "POST", "/api/v1/devices", None, {"token": TOKEN, "platform": "web"})
    assert response.status_code == 401
    assert send(client, "GET", "/api/v1/devices", "alice").status_code == 405


def test_tokens_never_reach_the_logs(client, caplog):
    caplog.set_level(logging.DEBUG)
    send(client, "POST", "/api/v1/devices", "alice", {"token": TOKEN, "platform": "web"})
    send(client, "POST", "/api/v1/devices", "alice", {"token": TOKEN + "!", "platform": "web"})
    send(client, "DELETE", "/api/v1/devices", "alice", {"token": TOKEN})
    assert TOKEN not in caplog.text
