"""Push notifications (protocol §13, chat/push.py): who is owed one when a message is stored
(coalescing, mutes, public rooms, presence on any worker), and the push worker's sends, tested
at the HTTP boundary: Google's OAuth token endpoint and FCM's v1 `messages:send` are served
through `responses`, the Firebase Admin SDK and its HTTP client run for real. Dead tokens are
pruned only on FCM's unregistered / sender-mismatch answers; a transient failure retries;
nothing of a room or a message leaves in a push."""

from __future__ import annotations

import json
import threading
from datetime import timedelta

import pytest
import requests
import responses
from channels.db import database_sync_to_async
from django.db import connection
from django.utils import timezone

from chat.auth import firebase_app
from chat.devices import push_preferences
from chat.edits import Editor, message_delete
from chat.membership import membership_mute, room_create, room_create_private
from chat.models import ChatMessage, Device, PushState, RoomKind, RoomMember
from chat.push import push_worker_run, pushes_claim, pushes_queue, pushes_send
from chat.sessions import sessions_open
from chat.writer import messages_store_and_push
from tests.conftest import builtin_reply, stored_message
from tests.test_auth import (
    OAUTH_TOKEN_URL,
    PROJECT,
    fresh_firebase_apps,  # noqa: F401  (autouse: each test its own SDK app)
    make_signing_key,
    service_account_file,
)
from tests.test_joins import request as session_request

pytestmark = pytest.mark.django_db

FCM_URL = f"https://fcm.googleapis.com/v1/projects/{PROJECT}/messages:send"
FCM_ERRORS = {  # token -> FCM's answer (status, status text, FcmError code)
    "dead-token": (404, "NOT_FOUND", "UNREGISTERED"),
    "foreign-token": (403, "PERMISSION_DENIED", "SENDER_ID_MISMATCH"),
    "busy-token": (429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED"),
}


class FakeFcm:
    """FCM's v1 send endpoint: records each message, answers by token."""

    def __init__(self) -> None:
        self.sent: list[dict] = []
        self.authorizations: list[str] = []

    def send(self, request: requests.PreparedRequest):
        self.authorizations.append(request.headers.get("Authorization", ""))
        message = json.loads(request.body)["message"]
        self.sent.append(message)
        error = FCM_ERRORS.get(message["token"])
        if error is None:
            return 200, {}, json.dumps({"name": f"projects/{PROJECT}/messages/{len(self.sent)}"})
        status, text, code = error
        detail = {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}
        body = {"error": {"code": status, "message": code, "status": text, "details": [detail]}}
        return status, {}, json.dumps(body)

    def tokens(self) -> list[str]:
        return [message["token"] for message in self.sent]


@pytest.fixture
def fcm(settings, tmp_path):
    """A throwaway service account; Google's token endpoint and FCM through `responses`."""
    key = make_signing_key("pusher")
    settings.FIREBASE_CREDENTIALS = service_account_file(tmp_path, key, "pusher")
    settings.CHAT_PUSH_TITLE = "Clarity"
    fake = FakeFcm()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as http:
        http.add(
            responses.POST,
            OAUTH_TOKEN_URL,
            json={"access_token": "push-access-token", "expires_in": 3600, "token_type": "Bearer"},
        )
        http.add_callback(responses.POST, FCM_URL, callback=fake.send)
        yield fake


def care_team(*members: str) -> str:
    return room_create_private(user_id="olive", name="Sleep clinic", members=list(members))[
        "room_id"
    ]


def device(user_id: str, token: str) -> None:
    Device.objects.create(user_id=user_id, token=token, platform="android")


def say(room_id: str, user_id: str, content: str = "my results came back") -> int:
    """Store a message; its id."""
    return int(stored_message(room_id, user_id, content)["message_id"])


def owed() -> set[tuple[str, str]]:
    return set(PushState.objects.filter(pending=True).values_list("room_id", "user_id"))


# --- who is owed a push ------------------------------------------------------------------------


def test_members_away_with_a_device_are_owed_one_push_per_room(db):
    room = care_team("bob", "carol", "dave", "erin")
    for user in ("olive", "bob", "carol", "dave"):
        device(user, f"{user}-token")
    membership_mute(user_id="carol", room_id=room, muted=True)
    sessions_open(
        requests=[session_request("dave", room)],
        worker_id="w2",
        max_connections=3,
        open_rooms=False,
    )
    assert (
        pushes_queue(
            messages=[(room, "olive", say(room, "olive")), (room, "olive", say(room, "olive"))]
        )
        == 1
    )
    # olive wrote it; carol muted the room; dave has a socket in it (on another worker);
    # erin has no device: only bob.
    assert owed() == {(room, "bob")}
    assert (
        pushes_queue(messages=[(room, "olive", say(room, "olive"))]) == 0
    )  # already owed: coalesced


def test_public_rooms_push_nothing(db):
    room_create(room_id="lobby", kind=RoomKind.PUBLIC)
    RoomMember.objects.create(room_id="lobby", user_id="bob")
    device("bob", "bob-token")
    assert pushes_queue(messages=[("lobby", "olive", say("lobby", "olive"))]) == 0


def test_one_push_per_room_per_coalescing_window(db, settings):
    settings.CHAT_PUSH_COALESCE = 30
    room = care_team("bob")
    device("bob", "bob-token")
    now = timezone.now()
    pushes_queue(messages=[(room, "olive", say(room, "olive"))], now=now)
    PushState.objects.update(pending=False, last_sent_at=now)  # as if just sent
    pushes_queue(messages=[(room, "olive", say(room, "olive"))], now=now + timedelta(seconds=5))
    state = PushState.objects.get()
    assert state.pending and state.due_at == now + timedelta(seconds=30)
    assert pushes_claim(now=now + timedelta(seconds=29)) == []


# --- the push worker, at the HTTP boundary -----------------------------------------------------


def test_a_push_is_content_free_and_goes_to_every_device(db, fcm):
    room = care_team("bob")
    device("bob", "bob-phone")
    device("bob", "bob-browser")
    say(room, "olive", "my biopsy results came back")
    pushes_queue(messages=[(room, "olive", say(room, "olive"))])
    outcome = pushes_send(states=pushes_claim(), app=firebase_app())
    assert (outcome.sent, outcome.failed, outcome.pruned) == (2, 0, 0)
    assert sorted(fcm.tokens()) == ["bob-browser", "bob-phone"]
    for message in fcm.sent:
        assert message["notification"] == {"title": "Clarity", "body": "New message"}
        assert message["data"] == {"room_id": room}
    everything = json.dumps(fcm.sent)
    assert "biopsy" not in everything and "Sleep clinic" not in everything
    assert set(fcm.authorizations) == {"Bearer push-access-token"}
    assert owed() == set() and PushState.objects.get().last_sent_at is not None


def test_tokens_are_pruned_only_on_unregistered_or_sender_mismatch(db, fcm):
    room = care_team("bob")
    for token in ("dead-token", "foreign-token", "busy-token", "good-token"):
        device("bob", token)
    pushes_queue(messages=[(room, "olive", say(room, "olive"))])
    outcome = pushes_send(states=pushes_claim(), app=firebase_app())
    assert (outcome.sent, outcome.failed, outcome.pruned) == (1, 1, 2)
    assert sorted(Device.objects.values_list("token", flat=True)) == ["busy-token", "good-token"]
    assert owed() == set()  # one device got it: done


def test_a_transient_failure_is_retried_with_backoff_then_given_up(db, fcm, settings):
    settings.CHAT_PUSH_MAX_ATTEMPTS = 2
    room = care_team("bob")
    device("bob", "busy-token")
    pushes_queue(messages=[(room, "olive", say(room, "olive"))])
    now = timezone.now()
    pushes_send(states=pushes_claim(now=now), app=firebase_app(), now=now)
    state = PushState.objects.get()
    assert state.pending and state.attempts == 1 and state.due_at == now + timedelta(seconds=30)
    assert Device.objects.filter(token="busy-token").exists()  # kept: it may work later
    later = now + timedelta(seconds=31)
    pushes_send(states=pushes_claim(now=later), app=firebase_app(), now=later)
    assert owed() == set() and len(fcm.sent) == 2  # given up after two attempts


def test_a_claimed_push_is_not_claimed_again_until_its_lease_is_over(db, settings):
    settings.CHAT_PUSH_LEASE = 60
    room = care_team("bob")
    device("bob", "bob-token")
    pushes_queue(messages=[(room, "olive", say(room, "olive"))])
    now = timezone.now()
    assert len(pushes_claim(now=now)) == 1
    assert pushes_claim(now=now + timedelta(seconds=59)) == []  # another push worker
    assert len(pushes_claim(now=now + timedelta(seconds=61))) == 1  # the first one died


def test_a_token_that_moved_is_not_pruned_for_its_old_user(db, fcm):
    """bob's dead token, registered by carol meanwhile: bob's failure does not delete it."""
    room = care_team("bob")
    device("bob", "dead-token")
    pushes_queue(messages=[(room, "olive", say(room, "olive"))])
    states = pushes_claim()
    Device.objects.filter(token="dead-token").update(user_id="carol")
    pushes_send(states=states, app=firebase_app())
    assert Device.objects.filter(token="dead-token", user_id="carol").exists()


def test_nothing_is_queued_when_push_is_off(db, settings):
    room = care_team("bob")
    device("bob", "bob-token")
    settings.CHAT_PUSH = False
    fields = {"room_id": room, "user_id": "olive", "username": "Olive", "content": "hi"}
    messages_store_and_push(messages=[fields | {"metadata": None, "client_message_id": None}])
    assert owed() == set()


@pytest.mark.django_db(transaction=True)  # (SQLite changes its schema outside transactions)
def test_a_push_that_cannot_be_queued_never_costs_a_message(settings, caplog):
    """The outbox is unusable (its table is gone): the message is stored all the same, the
    failure logged."""
    settings.CHAT_PUSH = True
    room = care_team("bob")
    device("bob", "bob-token")
    with connection.schema_editor() as editor:
        editor.delete_model(PushState)
    try:
        fields = {"room_id": room, "user_id": "olive", "username": "Olive", "content": "hi"}
        (stored,) = messages_store_and_push(
            messages=[fields | {"metadata": None, "client_message_id": None}]
        )
        assert stored.new
        assert ChatMessage.objects.filter(pk=stored.frame["message_id"]).exists()
        assert "queueing pushes failed" in caplog.text
    finally:
        with connection.schema_editor() as editor:
            editor.create_model(PushState)


def test_a_push_owed_to_a_user_with_no_device_left_is_settled(db, fcm):
    """A push owed to a user whose devices all went meanwhile is settled, not retried."""
    room = care_team("bob")
    device("bob", "bob-token")
    pushes_queue(messages=[(room, "olive", say(room, "olive"))])
    states = pushes_claim()
    Device.objects.all().delete()
    assert pushes_send(states=states, app=firebase_app()).sent == 0
    assert owed() == set() and fcm.sent == []


@pytest.mark.django_db(transaction=True)  # the worker thread reads what the test committed
def test_the_push_worker_sends_what_is_due_and_stops_when_told(fcm, settings):
    settings.CHAT_PUSH_POLL = 0.01
    room = care_team("bob")
    device("bob", "bob-token")
    pushes_queue(messages=[(room, "olive", say(room, "olive"))])
    stop = threading.Event()
    worker = threading.Thread(
        target=push_worker_run, kwargs={"app": firebase_app(), "stop": stop, "poll": 0.01}
    )
    worker.start()
    try:
        deadline = timezone.now() + timedelta(seconds=5)
        while fcm.sent == [] and timezone.now() < deadline:
            stop.wait(0.01)
    finally:
        stop.set()
        worker.join(5)
    assert not worker.is_alive()
    assert fcm.tokens() == ["bob-token"] and owed() == set()


@pytest.mark.django_db(transaction=True)
async def test_a_message_sent_over_a_socket_owes_a_push_to_the_members_away(clients, settings):
    settings.CHAT_PUSH = True
    room = await database_sync_to_async(care_team)("bob", "carol")
    for user in ("bob", "carol"):
        await database_sync_to_async(device)(user, f"{user}-token")
    olive = await clients.join(room, "olive", public_room=False)
    carol = await clients.join(room, "carol", public_room=False)
    await olive.send({"type": "message", "content": "new results"})
    await olive.recv_type("message")
    await carol.recv_type("message")
    assert await database_sync_to_async(owed)() == {(room, "bob")}  # carol is here


# --- previews: only asked for, only where allowed ----------------------------------------------


@pytest.mark.parametrize(
    ("allowed", "asked", "deleted", "body"),
    [
        (False, False, False, "New message"),
        (False, True, False, "New message"),  # the deployment does not allow them
        (True, False, False, "New message"),  # the user did not ask
        (True, True, True, "New message"),  # the message was deleted meanwhile
        (True, True, False, "Olive: " + "x" * 100),  # the first 100 characters
    ],
)
def test_a_preview_only_where_allowed_and_asked_for(
    db, fcm, settings, allowed, asked, deleted, body
):
    settings.CHAT_PUSH_PREVIEW_ALLOWED = allowed
    room = care_team("bob")
    device("bob", "bob-token")
    push_preferences(user_id="bob", previews=asked)
    said = say(room, "olive", "x" * 150)
    pushes_queue(messages=[(room, "olive", said)])
    if deleted:
        message_delete(message_id=said, deleter=Editor.user("olive"))
    pushes_send(states=pushes_claim(), app=firebase_app())
    (message,) = fcm.sent
    assert message["notification"] == {"title": "Clarity", "body": body}


def test_push_preferences_over_http(client, settings):
    from tests.test_api import send

    settings.CHAT_PUSH_PREVIEW_ALLOWED = False
    assert send(client, "GET", "/api/v1/push", "bob").json() == {
        "previews": False,
        "allowed": False,
    }
    changed = send(client, "PATCH", "/api/v1/push", "bob", {"previews": True})
    assert changed.json() == {"previews": True, "allowed": False}
    assert send(client, "PATCH", "/api/v1/push", "bob", {"previews": "yes"}).status_code == 400
    assert send(client, "GET", "/api/v1/push", None).status_code == 401


@pytest.mark.django_db(transaction=True)
async def test_an_assistant_reply_owes_a_push_to_the_asker_who_left(settings):
    """The asker is away when the answer comes (no socket in the room): they are owed a
    push, as every member away is; the assistant itself never is."""
    settings.CHAT_PUSH = True
    room = await database_sync_to_async(care_team)("bob")
    await database_sync_to_async(device)("olive", "olive-token")
    question = await database_sync_to_async(stored_message)(room, "olive", "@ai how did I sleep?")
    sent = []

    async def emit(payload: dict) -> None:
        sent.append(payload)

    reply = await builtin_reply(question, user_id="olive", username="Olive", emit=emit)
    assert [payload["type"] for payload in sent] == ["assistant_delta"]
    assert reply["user_id"] == "AI"
    assert await database_sync_to_async(owed)() == {(room, "olive")}  # bob has no device


def test_a_message_queued_while_its_push_is_sent_is_not_lost(db, fcm, settings):
    """The push worker claimed bob's push; a newer message comes meanwhile (coalesced into
    the owed push): once the send is settled, a push is still owed for it, after the
    coalescing window."""
    settings.CHAT_PUSH_COALESCE = 30
    room = care_team("bob")
    device("bob", "bob-token")
    pushes_queue(messages=[(room, "olive", say(room, "olive"))])
    now = timezone.now()
    states = pushes_claim(now=now)
    pushes_queue(messages=[(room, "olive", say(room, "olive", "and one more"))], now=now)
    pushes_send(states=states, app=firebase_app(), now=now)
    state = PushState.objects.get()
    assert state.pending and state.due_at == now + timedelta(seconds=30)
    assert state.last_sent_at == now and len(fcm.sent) == 1
