"""`chat/audit.py` and the audited admin: every view of a message's or a session's page,
every search, change and deletion (bulk ones: one entry per object) and every sign-in is
recorded with who, what and from where, and never with what was read or searched for."""

from __future__ import annotations

import json
import uuid

import pytest
from django.contrib.auth.models import AnonymousUser
from django.test import RequestFactory

from chat.audit import Actor, audit_record
from chat.models import (
    ActorKind,
    AuditAction,
    AuditEntry,
    ChatMessage,
    ChatSession,
    ChatUser,
    Room,
)

pytestmark = pytest.mark.django_db

SECRET = "my HIV test came back"
CLIENT = "203.0.113.7"
# What a client could send itself: never taken for its address.
FORGED = {"REMOTE_ADDR": CLIENT, "HTTP_X_FORWARDED_FOR": "198.51.100.9"}


def message(content: str = SECRET, room: str = "lobby") -> ChatMessage:
    Room.objects.get_or_create(name=room, defaults={"kind": "public"})
    return ChatMessage.objects.create(
        room_id=room, user_id="alice", username="Alice", content=content
    )


def session() -> ChatSession:
    Room.objects.get_or_create(name="lobby", defaults={"kind": "public"})
    user, _ = ChatUser.objects.get_or_create(user_id="alice", username="Alice")
    return ChatSession.objects.create(
        user=user, username="Alice", room_id="lobby", channel_name="c", worker_id="w"
    )


def entries(**filters) -> list[AuditEntry]:
    return list(AuditEntry.objects.filter(**filters).order_by("id"))


def no_content_recorded() -> None:
    stored = json.dumps(list(AuditEntry.objects.values()), default=str)
    assert "HIV" not in stored and "diagnosis" not in stored


def test_viewing_a_message_writes_one_entry_naming_viewer_object_and_address(
    admin_client, admin_user
):
    row = message()
    page = admin_client.get(f"/admin/chat/chatmessage/{row.pk}/change/", **FORGED)
    assert page.status_code == 200 and SECRET in page.text

    [entry] = entries()
    assert (entry.action, entry.model, entry.object_id) == ("view", "chat.chatmessage", str(row.pk))
    assert (entry.actor_kind, entry.actor, entry.staff_user) == ("staff", "admin", admin_user)
    assert entry.client_address == CLIENT  # REMOTE_ADDR, not the forwarded header
    no_content_recorded()


def test_viewing_a_session_writes_one_entry(admin_client):
    row = session()
    page = admin_client.get(f"/admin/chat/chatsession/{row.pk}/change/", **FORGED)
    assert page.status_code == 200
    [entry] = entries()
    assert (entry.action, entry.model, entry.object_id) == ("view", "chat.chatsession", str(row.pk))


def test_pages_not_shown_write_no_view_entry(admin_client, client, django_user_model):
    row = message()
    missing = admin_client.get(f"/admin/chat/chatmessage/{row.pk + 1}/change/")
    assert missing.status_code == 302
    # Staff without the permission to view messages.
    client.force_login(django_user_model.objects.create_user("sam", is_staff=True))
    assert client.get(f"/admin/chat/chatmessage/{row.pk}/change/").status_code == 403
    # Signed out: sent to the sign-in page.
    client.logout()
    assert client.get(f"/admin/chat/chatmessage/{row.pk}/change/").status_code == 302
    assert not AuditEntry.objects.exists()


@pytest.mark.parametrize(
    ("changelist", "model"),
    [
        ("/admin/chat/chatmessage/", "chat.chatmessage"),
        ("/admin/chat/chatsession/", "chat.chatsession"),
        ("/admin/chat/chatuser/", "chat.chatuser"),
        ("/admin/auth/user/", "auth.user"),
    ],
)
def test_a_search_writes_one_entry_with_its_length_not_its_text(admin_client, changelist, model):
    message(), session()
    assert admin_client.get(changelist).status_code == 200  # a list is not a search
    query = "HIV diagnosis"
    assert admin_client.get(changelist, {"q": query}, **FORGED).status_code == 200

    [entry] = entries()
    assert (entry.action, entry.model, entry.actor, entry.client_address) == (
        "search",
        model,
        "admin",
        CLIENT,
    )
    assert entry.details["query_length"] == len(query)
    assert entry.details["fields"] and isinstance(entry.details["results"], int)
    # Django's "database error" page (?e=1) answers 200 without a list: still recorded.
    broken = {"q": query, "e": "1", "no_such_field": "1"}
    assert admin_client.get(changelist, broken).status_code == 200
    assert entries()[-1].details["results"] is None
    no_content_recorded()


def test_a_bulk_delete_writes_one_entry_per_message(admin_client):
    rows = [message(f"{SECRET} {n}") for n in range(3)]
    kept = message("kept")
    ids = [str(row.pk) for row in rows]
    response = admin_client.post(
        "/admin/chat/chatmessage/",
        {"action": "delete_selected", "_selected_action": ids, "post": "yes"},
        **FORGED,
    )
    assert response.status_code == 302
    assert list(ChatMessage.objects.values_list("pk", flat=True)) == [kept.pk]
    deleted = entries(action=AuditAction.DELETE)
    assert sorted(entry.object_id for entry in deleted) == sorted(ids)
    assert {(entry.model, entry.actor, entry.client_address) for entry in deleted} == {
        ("chat.chatmessage", "admin", CLIENT)
    }
    no_content_recorded()


def test_a_single_delete_writes_one_entry(admin_client):
    row = message()
    response = admin_client.post(f"/admin/chat/chatmessage/{row.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302 and not ChatMessage.objects.exists()
    [entry] = entries(action=AuditAction.DELETE)
    assert entry.object_id == str(row.pk)


def test_terminating_sessions_is_recorded(admin_client):
    row = session()
    response = admin_client.post(
        "/admin/chat/chatsession/",
        {"action": "terminate_sessions", "_selected_action": [str(row.pk)]},
    )
    assert response.status_code == 302
    [entry] = entries(action=AuditAction.CHANGE)
    assert (entry.object_id, entry.details) == (str(row.pk), {"action": "terminate"})


def test_sign_ins_and_refusals_are_recorded(client, django_user_model):
    django_user_model.objects.create_user("olga", password="right-pw", is_staff=True)
    refused = client.post(
        "/admin/login/", {"username": "olga", "password": "wrong"}, REMOTE_ADDR=CLIENT
    )
    assert refused.status_code == 200
    signed_in = client.post(
        "/admin/login/", {"username": "olga", "password": "right-pw"}, REMOTE_ADDR=CLIENT
    )
    assert signed_in.status_code == 302

    first, second = entries()
    assert (first.action, first.actor, first.staff_user, first.client_address) == (
        "login_refused",
        "olga",
        None,
        CLIENT,
    )
    assert first.details == {"locked_out": False}
    assert (second.action, second.actor, second.staff_user.username) == ("login", "olga", "olga")


def test_audit_record_for_an_export_by_a_chat_user():
    """What a later export records (the service the admin uses, called directly)."""
    request = RequestFactory().get("/api/v1/export", REMOTE_ADDR=CLIENT)
    request.user = AnonymousUser()
    rows = [message(), message()]
    written = audit_record(
        request=request,
        action=AuditAction.EXPORT,
        model=ChatMessage,
        object_ids=[row.pk for row in rows],
        details={"format": "json"},
        actor=Actor.chat_user("alice"),
    )
    assert len(written) == 2
    assert {(e.actor_kind, e.actor, e.action, e.client_address) for e in entries()} == {
        (ActorKind.USER, "alice", "export", CLIENT)
    }
    # Who acted must be known: an anonymous request does not record itself.
    with pytest.raises(ValueError):
        audit_record(request=request, action=AuditAction.EXPORT)


def test_long_identifiers_are_bounded():
    request = RequestFactory().get("/", REMOTE_ADDR="x" * 500)
    request.user = AnonymousUser()
    [entry] = audit_record(
        request=request,
        action=AuditAction.LOGIN_REFUSED,
        object_ids=[uuid.uuid4().hex * 20],
        actor=Actor.attempted("n" * 1000),
    )
    entry.full_clean()  # every field within its column
