"""`chat/admin.py` and `chat/adminsite.py`: the admin shows chat content only where it must
(minimum necessary), keeps an operator's edit as a version, keeps the audit out of reach,
renders whatever rows hold, throttles sign-ins and, when required, asks for a second
factor. What the audit records is in tests/test_audit.py."""

from __future__ import annotations

import io
import re
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from axes.models import AccessAttempt
from django.core.management import CommandError, call_command
from django.db import connection
from django.db.models import F
from django.test import AsyncClient
from django_otp.plugins.otp_totp.models import TOTPDevice

from chat.checks import admin_two_factor_in_production
from chat.edits import Editor, message_edit
from chat.history import messages_page
from chat.models import (
    AuditAction,
    AuditEntry,
    ChatMessage,
    ChatSession,
    ChatUser,
    EditorKind,
    MessageVersion,
    Room,
)
from chat.protocol import iso
from tests.conftest import second_factor, totp_token

pytestmark = pytest.mark.django_db

SECRET = "my HIV test came back"
MESSAGES = "/admin/chat/chatmessage/"
AUDIT = "/admin/chat/auditentry/"


def message(content: str = SECRET, metadata: dict | None = None) -> ChatMessage:
    Room.objects.get_or_create(name="lobby", defaults={"kind": "public"})
    return ChatMessage.objects.create(
        room_id="lobby", user_id="alice", username="Alice", content=content, metadata=metadata
    )


def change_url(row: ChatMessage) -> str:
    return f"{MESSAGES}{row.pk}/change/"


def edit(client, row: ChatMessage, content: str):
    """Post the message's change form as a browser would (its hidden fields included)."""
    page = client.get(change_url(row))
    hidden = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', page.text))
    return client.post(change_url(row), {**hidden, "content": content})


def sign_in(client, username: str, password: str, address: str = "203.0.113.7", **extra):
    form = {"username": username, "password": password, "next": "/admin/", **extra}
    return client.post("/admin/login/", form, REMOTE_ADDR=address)


def signed_in(client) -> bool:
    return client.get("/admin/").status_code == 200


# --- minimum necessary -----------------------------------------------------------------------


def test_the_message_list_shows_who_where_and_when_never_what(admin_client):
    message(SECRET, metadata={"note": "diagnosis pending"})
    edited = message("first words")
    message_edit(message_id=edited.pk, content="second words", editor=Editor.user("alice"))

    page = admin_client.get(MESSAGES)
    assert page.status_code == 200
    for hidden in (SECRET, "diagnosis pending", "first words", "second words"):
        assert hidden not in page.text
    assert "Alice" in page.text and "lobby" in page.text
    marks = re.findall(r'<td class="field-edited"><img src="[^"]+" alt="(\w+)">', page.text)
    assert sorted(marks) == ["False", "True"]
    # Searching by content still finds the message, still without showing it.
    found = admin_client.get(MESSAGES, {"q": "HIV"})
    assert change_url(ChatMessage.objects.get(content=SECRET)) in found.text
    assert SECRET not in found.text


def test_the_change_page_shows_content_and_metadata(admin_client):
    row = message(SECRET, metadata={"note": "diagnosis pending"})
    page = admin_client.get(change_url(row))
    assert page.status_code == 200
    assert SECRET in page.text and "diagnosis pending" in page.text


def test_messages_are_not_added_in_the_admin(admin_client):
    assert admin_client.get(f"{MESSAGES}add/").status_code == 403


# --- operator edits --------------------------------------------------------------------------


def test_an_operator_edit_keeps_the_previous_version_and_shows_as_edited(admin_client):
    row = message(SECRET, metadata={"note": "kept"})
    response = edit(admin_client, row, "[removed by an operator]")
    assert response.status_code == 302

    row.refresh_from_db()
    assert row.content == "[removed by an operator]" and row.edited_at is not None
    [version] = MessageVersion.objects.filter(message=row)
    assert (version.content, version.metadata) == (SECRET, {"note": "kept"})
    assert (version.editor_kind, version.editor) == (EditorKind.OPERATOR, "admin")
    # What clients get from history now.
    [frame], _ = messages_page(room_id="lobby", limit=10, max_bytes=1_000_000)
    assert frame["content"] == "[removed by an operator]"
    assert frame["metadata"] == {"note": "kept", "edited_at": iso(row.edited_at)}
    # The change page shows the earlier version, read-only; the edit is in the audit.
    page = admin_client.get(change_url(row))
    assert SECRET in page.text and "Operator (the admin)" in page.text
    assert "versions-0-content" not in page.text  # no editable inline field
    [change] = AuditEntry.objects.filter(action=AuditAction.CHANGE)
    assert change.object_id == str(row.pk)
    assert change.details == {"changes": [{"changed": {"fields": ["content"]}}]}


def test_saving_an_untouched_page_is_not_an_edit(admin_client):
    row = message("line one\nline two  ")
    # A browser sends the textarea back with CRLF line breaks.
    response = edit(admin_client, row, "line one\r\nline two  ")
    assert response.status_code == 302
    row.refresh_from_db()
    assert row.content == "line one\nline two  " and row.edited_at is None
    assert not MessageVersion.objects.exists()
    assert not AuditEntry.objects.filter(action=AuditAction.CHANGE).exists()


def test_an_edit_no_message_may_have_is_refused(admin_client):
    row = message()
    for bad in ("", "   ", "a\x00b"):
        page = edit(admin_client, row, bad)
        assert page.status_code == 200 and "errornote" in page.text
    row.refresh_from_db()
    assert row.content == SECRET and row.edited_at is None
    assert not MessageVersion.objects.exists()


# --- the audit is out of reach ---------------------------------------------------------------


def audit_entry() -> AuditEntry:
    return AuditEntry.objects.create(
        actor_kind="staff", actor="someone", action=AuditAction.VIEW, model="chat.chatmessage"
    )


def test_plain_staff_do_not_see_the_audit_whatever_their_permissions(staff_client, staff_user):
    assert staff_user.has_perm("chat.view_auditentry")  # given, and still refused
    entry = audit_entry()
    index = staff_client.get("/admin/")
    assert index.status_code == 200
    assert "Chat messages" in index.text and "Audit entries" not in index.text
    for url in (AUDIT, f"{AUDIT}{entry.pk}/change/", f"{AUDIT}add/", f"{AUDIT}{entry.pk}/delete/"):
        assert staff_client.get(url).status_code == 403, url
    assert staff_client.get("/admin/chat/").status_code == 200  # the app page lists the rest


def test_nobody_changes_or_deletes_audit_entries_in_the_admin(admin_client):
    entry = audit_entry()
    before = AuditEntry.objects.values().get(pk=entry.pk)
    listed = admin_client.get(AUDIT)
    assert listed.status_code == 200 and f"{AUDIT}{entry.pk}/change/" in listed.text
    view = admin_client.get(f"{AUDIT}{entry.pk}/change/")
    assert view.status_code == 200 and 'name="actor"' not in view.text  # read-only
    form = {"actor_kind": "staff", "actor": "nobody", "action": "view", "details": "{}"}
    assert admin_client.post(f"{AUDIT}{entry.pk}/change/", form).status_code == 403
    assert admin_client.post(f"{AUDIT}{entry.pk}/delete/", {"post": "yes"}).status_code == 403
    assert admin_client.get(f"{AUDIT}add/").status_code == 403
    assert admin_client.post(f"{AUDIT}add/", form).status_code == 403
    bulk = {"action": "delete_selected", "_selected_action": [entry.pk], "post": "yes"}
    admin_client.post(AUDIT, bulk)
    assert list(AuditEntry.objects.values()) == [before]


# --- whatever rows hold ----------------------------------------------------------------------

ODD = "\u202eevil\u200b \U0001f469\u200d\U0001f469\u200d\U0001f467 e\u0301 \ufdfd \ufeff"
SCRIPT = "<script>alert(1)</script>"


def test_pages_render_whatever_rows_hold(admin_client):
    long = message("x" * 100_000)
    wide = message("wide", metadata={f"key{n}": "v" * 100 for n in range(2_000)})
    odd = message(f"{ODD} {SCRIPT}", metadata={ODD: SCRIPT, "nested": [[[[[[[[[[ODD]]]]]]]]]]})
    deep = message("deep")
    # Nested deeper than Python's JSON decoder goes (written by something other than this
    # code): shown from the database's text, never decoded.
    depth = 1_500
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE chat_chatmessage SET metadata = %s WHERE id = %s",
            ["[" * depth + "]" * depth, deep.pk],
        )
    user = ChatUser.objects.create(user_id="alice", username=f"Alice {ODD}")
    huge_agent = ChatSession.objects.create(
        user=user,
        username=user.username,
        room_id="lobby",
        channel_name="c",
        worker_id="w",
        user_agent="Mozilla/5.0 " + "A" * 200_000,  # beyond the column: SQLite keeps it
    )

    for url in (MESSAGES, "/admin/chat/chatsession/", "/admin/chat/chatuser/"):
        page = admin_client.get(url)
        assert page.status_code == 200, url
        assert len(page.content) < 100_000, url
    assert SCRIPT not in admin_client.get(MESSAGES).text

    assert admin_client.get(change_url(long)).status_code == 200
    wide_page = admin_client.get(change_url(wide))
    assert wide_page.status_code == 200 and "more characters)" in wide_page.text
    assert len(wide_page.content) < 100_000
    odd_page = admin_client.get(change_url(odd))
    assert odd_page.status_code == 200 and SCRIPT not in odd_page.text
    assert "&lt;script&gt;" in odd_page.text
    deep_page = admin_client.get(change_url(deep))
    assert deep_page.status_code == 200 and "[[[[" in deep_page.text
    session_page = admin_client.get(f"/admin/chat/chatsession/{huge_agent.pk}/change/")
    assert session_page.status_code == 200 and "more characters)" in session_page.text
    assert len(session_page.content) < 100_000

    # Edited, each keeps its metadata in a version the page shows, bounded too.
    for row in (wide, deep, odd):
        assert edit(admin_client, row, "edited").status_code == 302
        page = admin_client.get(change_url(row))
        assert page.status_code == 200 and len(page.content) < 100_000
    assert MessageVersion.objects.count() == 3


# --- sign-in throttling ----------------------------------------------------------------------


def test_failed_sign_ins_lock_the_username_even_with_the_right_password(
    client, django_user_model, settings
):
    django_user_model.objects.create_user("olga", password="right-pw", is_staff=True)
    limit = settings.ADMIN_LOGIN_FAILURE_LIMIT
    # From a new address each time: the username's failures count, wherever they come from.
    for n in range(limit - 1):
        assert sign_in(client, "olga", "wrong", f"198.51.100.{n}").status_code == 200
    assert sign_in(client, "olga", "wrong", "198.51.100.99").status_code == 429
    assert sign_in(client, "olga", "right-pw", "203.0.113.50").status_code == 429
    assert not signed_in(client)
    refused = AuditEntry.objects.filter(action=AuditAction.LOGIN_REFUSED, actor="olga")
    assert [entry.details["locked_out"] for entry in refused.order_by("id")][-2:] == [True, True]

    # Once the lockout has passed without a further attempt, the right password works.
    AccessAttempt.objects.update(
        attempt_time=F("attempt_time") - timedelta(seconds=settings.ADMIN_LOGIN_LOCKOUT + 1)
    )
    assert sign_in(client, "olga", "right-pw", "203.0.113.50").status_code == 302
    assert signed_in(client)


@pytest.mark.django_db(transaction=True)
async def test_the_lockout_holds_through_the_asgi_handler(django_user_model, settings):
    """As daphne serves the admin (axes' middleware runs in its async form there)."""
    await sync_to_async(django_user_model.objects.create_user)(
        "olga", password="right-pw", is_staff=True
    )
    http = AsyncClient()
    form = {"username": "olga", "password": "wrong"}
    statuses = [
        (await http.post("/admin/login/", form)).status_code
        for _ in range(settings.ADMIN_LOGIN_FAILURE_LIMIT)
    ]
    assert statuses[-1] == 429 and set(statuses[:-1]) == {200}
    right = await http.post("/admin/login/", {**form, "password": "right-pw"})
    assert right.status_code == 429
    assert (await http.get("/admin/")).status_code == 302


def test_failed_sign_ins_from_one_address_lock_that_address(client, django_user_model, settings):
    django_user_model.objects.create_user("olga", password="right-pw", is_staff=True)
    for n in range(settings.ADMIN_LOGIN_FAILURE_LIMIT):
        sign_in(client, f"guess{n}", "wrong", "198.51.100.1")
    assert sign_in(client, "olga", "right-pw", "198.51.100.1").status_code == 429
    assert sign_in(client, "olga", "right-pw", "203.0.113.50").status_code == 302


def test_a_successful_sign_in_clears_the_count(client, django_user_model, settings):
    django_user_model.objects.create_user("olga", password="right-pw", is_staff=True)
    for _ in range(2):
        for _ in range(settings.ADMIN_LOGIN_FAILURE_LIMIT - 1):
            assert sign_in(client, "olga", "wrong").status_code == 200
        assert sign_in(client, "olga", "right-pw").status_code == 302
        client.logout()


# --- two-factor sign-in ----------------------------------------------------------------------


def test_two_factor_is_required_when_set(client, django_user_model, settings):
    settings.ADMIN_REQUIRE_2FA = True
    user = django_user_model.objects.create_user("olga", password="right-pw", is_staff=True)
    device = TOTPDevice.objects.create(user=user, name="phone", confirmed=True)

    assert 'name="otp_token"' in client.get("/admin/login/").text
    # A password alone, or with a wrong token, does not sign in.
    assert sign_in(client, "olga", "right-pw").status_code == 200
    assert not signed_in(client)
    # A session signed in some other way, without the device, is not let in either, nor
    # counted as an operator by the HTTP companions.
    client.force_login(user)
    assert not signed_in(client)
    assert client.get("/api/v1/ws/chat/stats").status_code == 401
    client.logout()

    response = sign_in(client, "olga", "right-pw", **second_factor(device, totp_token(device)))
    assert response.status_code == 302
    assert signed_in(client)
    assert client.get("/api/v1/ws/chat/stats").status_code == 200
    assert AuditEntry.objects.filter(action=AuditAction.LOGIN, actor="olga").count() == 1


def test_a_wrong_one_time_password_is_refused(client, django_user_model, settings):
    settings.ADMIN_REQUIRE_2FA = True
    user = django_user_model.objects.create_user("olga", password="right-pw", is_staff=True)
    device = TOTPDevice.objects.create(user=user, name="phone", confirmed=True)
    wrong = f"{(int(totp_token(device)) + 1) % 1_000_000:06d}"
    assert sign_in(client, "olga", "right-pw", **second_factor(device, wrong)).status_code == 200
    assert not signed_in(client)


def test_a_password_is_enough_when_two_factor_is_off(client, django_user_model, settings):
    settings.ADMIN_REQUIRE_2FA = False
    django_user_model.objects.create_user("olga", password="right-pw", is_staff=True)
    assert 'name="otp_token"' not in client.get("/admin/login/").text
    assert sign_in(client, "olga", "right-pw").status_code == 302
    assert signed_in(client)


def test_two_factor_off_in_production_is_warned(settings):
    settings.DEBUG, settings.ADMIN_REQUIRE_2FA = False, False
    [warning] = admin_two_factor_in_production(None)
    assert warning.id == "chat.W001"
    settings.ADMIN_REQUIRE_2FA = True
    assert admin_two_factor_in_production(None) == []


def test_addtotpdevice_prints_the_secret_once_and_the_admin_never_shows_it(
    admin_client, staff_user, django_user_model
):
    out = io.StringIO()
    call_command("addtotpdevice", "olga", stdout=out)
    url = out.getvalue().strip()
    assert url.startswith("otpauth://totp/") and "secret=" in url
    device = TOTPDevice.objects.get(user=staff_user)
    assert device.confirmed
    secret = re.search(r"secret=([A-Z2-7]+)", url).group(1)
    page = admin_client.get(f"/admin/otp_totp/totpdevice/{device.pk}/change/")
    assert page.status_code == 200
    assert secret not in page.text and device.key not in page.text
    assert admin_client.get(f"/admin/otp_totp/totpdevice/{device.pk}/config/").status_code == 403

    django_user_model.objects.create_user("pat")
    for name in ("pat", "nobody"):
        with pytest.raises(CommandError):
            call_command("addtotpdevice", name, stdout=io.StringIO())
