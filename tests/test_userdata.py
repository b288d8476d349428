"""`chat/userdata.py`, `manage.py exportuser` / `eraseuser` and the chat users' admin actions:
one user's data exported (theirs only) and erased (tombstones in place, versions, addresses,
memberships gone, sockets closed on whichever worker holds them), each audited; the hostile
cases refused. The last test erases a user connected to one of two real workers on
PostgreSQL while a witness watches from the other."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import AsyncClient

from chat.edits import Editor, EditRefused, message_edit
from chat.history import messages_page
from chat.models import (
    ActorKind,
    AuditAction,
    AuditEntry,
    ChatMessage,
    ChatSession,
    ChatUser,
    MessageVersion,
    Role,
    Room,
    RoomKind,
    RoomMember,
)
from chat.protocol import AI_USER_ID, AI_USERNAME
from chat.replies import room_context
from chat.testing.client import ChatSocket
from chat.testing.processes import ServerError, manage
from chat.testing.redis_server import REDIS_URL, redis_answers
from chat.testing.waiting import eventually
from chat.userdata import NO_DEVICE_REGISTRY, user_export
from tests.conftest import act_as_daphne
from tests.servers import start_cluster

SECRET = "my HIV test came back"
FIRST_DRAFT = "my HIV test came back positive"
ANALYSIS = "Your sleep efficiency was 71 % last night."
USERS = "/admin/chat/chatuser/"
ALICE_ADDRESS, BOB_ADDRESS = "203.0.113.7", "198.51.100.9"
ANONYMOUS = "User_alice"  # what a token without a name would show for uid "alice"


def seed() -> dict[str, ChatMessage]:
    """Alice and Bob in a public room and a direct room; Alice's personal room with an
    analysis; a room Alice is banned from; one session each, with address and user agent."""
    lobby = Room.objects.create(name="lobby", kind=RoomKind.PUBLIC)
    direct = Room.objects.create(name="dm-1", kind=RoomKind.DIRECT, direct_pair="alice\nbob")
    personal = Room.objects.create(name="health_analysis_alice", kind=RoomKind.PERSONAL)
    quiet = Room.objects.create(name="quiet", kind=RoomKind.PUBLIC)
    alice = ChatUser.objects.create(user_id="alice", username="Alice Smith")
    bob = ChatUser.objects.create(user_id="bob", username="Bob Jones")
    RoomMember.objects.bulk_create(
        [
            RoomMember(room=lobby, user_id="alice"),
            RoomMember(room=lobby, user_id="bob"),
            RoomMember(room=direct, user_id="alice"),
            RoomMember(room=direct, user_id="bob"),
            RoomMember(room=personal, user_id="alice", role=Role.OWNER),
            RoomMember(room=quiet, user_id="alice", banned=True),
        ]
    )

    def say(room: Room, uid: str, name: str, content: str, metadata=None) -> ChatMessage:
        return ChatMessage.objects.create(
            room=room, user_id=uid, username=name, content=content, metadata=metadata
        )

    rows = {
        "alice_lobby": say(lobby, "alice", "Alice Smith", FIRST_DRAFT, {"mood": "anxious"}),
        "bob_lobby": say(lobby, "bob", "Bob Jones", "sorry to hear, Alice"),
        "ai_lobby": say(lobby, AI_USER_ID, AI_USERNAME, "Please talk to your doctor."),
        "alice_direct": say(direct, "alice", "Alice Smith", "between us"),
        "bob_direct": say(direct, "bob", "Bob Jones", "of course"),
        "analysis": say(personal, AI_USER_ID, AI_USERNAME, ANALYSIS, {"analysis": {"n": 1}}),
    }
    message_edit(message_id=rows["alice_lobby"].pk, content=SECRET, editor=Editor.user("alice"))
    for user, room, address, agent in (
        (alice, lobby, ALICE_ADDRESS, "AliceBrowser/1.0"),
        (bob, lobby, BOB_ADDRESS, "BobBrowser/2.0"),
    ):
        ChatSession.objects.create(
            user=user,
            username=user.username,
            room=room,
            channel_name=f"channel-{user.pk}",
            worker_id="w1",
            client_address=address,
            user_agent=agent,
        )
    ChatSession.objects.filter(user_id="alice").update(
        close_code=1000, disconnected_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    )
    return rows


def audit(action: AuditAction, object_id: str = "alice") -> list[AuditEntry]:
    return list(
        AuditEntry.objects.filter(action=action, model="chat.chatuser", object_id=object_id)
    )


def assert_nothing_of_bob(text: str) -> None:
    for other in ("bob", "sorry to hear", "of course", BOB_ADDRESS, "talk to your doctor"):
        assert other not in text.lower(), other


def staff_with(django_user_model, *codenames: str):
    user = django_user_model.objects.create_user("sam", password="sam-pw", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__in=codenames))
    return user


# --- export ------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_export_command_writes_the_users_data_and_nothing_of_others(tmp_path):
    rows = seed()
    path = tmp_path / "alice.json"

    err = io.StringIO()
    call_command("exportuser", "alice", "--output", str(path), stderr=err)

    assert f"to {path}" in err.getvalue()
    assert (path.stat().st_mode & 0o777) == 0o600  # health data: its owner only
    text = path.read_text()
    data = json.loads(text)
    assert data["format"] == "clarity-chat-user-export/1"
    assert data["user"]["user_id"] == "alice" and data["user"]["username"] == "Alice Smith"
    messages = data["messages"]
    assert [m["message_id"] for m in messages] == [
        str(rows["alice_lobby"].pk),
        str(rows["alice_direct"].pk),
    ]
    edited = messages[0]
    assert (edited["content"], edited["metadata"]) == (SECRET, {"mood": "anxious"})
    assert edited["edited_at"] is not None and edited["deleted_at"] is None
    [version] = edited["versions"]
    assert (version["content"], version["metadata"]) == (FIRST_DRAFT, {"mood": "anxious"})
    assert version["replaced_by"] == "user"
    [analysis] = data["personal_room_messages"]
    assert (analysis["content"], analysis["user_id"]) == (ANALYSIS, AI_USER_ID)
    [session] = data["sessions"]
    assert (session["client_address"], session["user_agent"]) == (ALICE_ADDRESS, "AliceBrowser/1.0")
    assert session["disconnected_at"] == "2026-01-02T03:04:05Z" and session["close_code"] == 1000
    memberships = {(m["room_id"], m["role"], m["banned"]) for m in data["memberships"]}
    assert memberships == {
        ("lobby", "member", False),
        ("dm-1", "member", False),
        ("health_analysis_alice", "owner", False),
        ("quiet", "member", True),
    }
    assert data["devices"] == [] and data["notes"] == [NO_DEVICE_REGISTRY]
    assert_nothing_of_bob(text)
    # Recorded: by whom (the system user, through the command), never what.
    [entry] = audit(AuditAction.EXPORT)
    assert entry.actor_kind == ActorKind.COMMAND and "manage.py exportuser" in entry.actor
    assert entry.details == {
        "messages": 2,
        "personal_room_messages": 1,
        "sessions": 1,
        "memberships": 4,
    }
    assert SECRET not in json.dumps(entry.details)
    # An existing file is never overwritten.
    with pytest.raises(CommandError, match="exists"):
        call_command("exportuser", "alice", "--output", str(path))
    assert json.loads(path.read_text()) == data


@pytest.mark.django_db
def test_the_export_command_writes_to_standard_output():
    seed()
    out = io.StringIO()
    call_command("exportuser", "alice", stdout=out)
    assert json.loads(out.getvalue())["user"]["user_id"] == "alice"
    assert len(audit(AuditAction.EXPORT)) == 1


@pytest.mark.django_db
def test_the_admin_export_is_a_json_download_and_is_audited(admin_client):
    seed()
    response = admin_client.post(
        USERS,
        {"action": "export_user_data", "_selected_action": ["alice"]},
        REMOTE_ADDR=ALICE_ADDRESS,
    )

    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert response["Content-Disposition"] == 'attachment; filename="clarity-user-alice.json"'
    assert "no-store" in response["Cache-Control"]
    data = json.loads(response.content)
    expected = user_export(user_id="alice")
    assert {**data, "exported_at": None} == {**expected, "exported_at": None}
    assert_nothing_of_bob(response.content.decode())
    [entry] = audit(AuditAction.EXPORT)
    assert (entry.actor, entry.actor_kind, entry.client_address) == (
        "admin",
        ActorKind.STAFF,
        ALICE_ADDRESS,
    )
    # One user per download.
    several = admin_client.post(
        USERS, {"action": "export_user_data", "_selected_action": ["alice", "bob"]}
    )
    assert several.status_code == 302 and len(audit(AuditAction.EXPORT)) == 1


@pytest.mark.django_db
def test_export_and_erasure_need_their_permissions(client, django_user_model, staff_user):
    seed()
    # Staff who may see and even delete chat users but hold neither permission: neither
    # action is offered, and one posted anyway does nothing.
    client.force_login(staff_with(django_user_model, "view_chatuser", "delete_chatuser"))
    page = client.get(USERS)
    assert page.status_code == 200 and "delete_selected" in page.text
    assert "export_user_data" not in page.text and "erase_user_data" not in page.text
    for action in ("export_user_data", "erase_user_data"):
        refused = client.post(
            USERS, {"action": action, "_selected_action": ["alice"], "post": "yes"}
        )
        assert refused.status_code == 302, action
        assert not refused.has_header("Content-Disposition")
    assert not AuditEntry.objects.filter(action__in=[AuditAction.EXPORT, AuditAction.DELETE])
    assert ChatMessage.objects.filter(user_id="alice", deleted_at__isnull=True).count() == 2
    # A staff user who is not a superuser but holds the permission may export.
    client.force_login(staff_user)
    allowed = client.post(USERS, {"action": "export_user_data", "_selected_action": ["alice"]})
    assert allowed.status_code == 200 and json.loads(allowed.content)["user"]["user_id"] == "alice"


@pytest.mark.django_db
def test_the_export_takes_metadata_nested_deeper_than_python_decodes():
    rows = seed()
    depth = 1_500  # written by something other than this code
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE chat_chatmessage SET metadata = %s WHERE id = %s",
            ["[" * depth + "]" * depth, rows["alice_direct"].pk],
        )
    out = io.StringIO()
    call_command("exportuser", "alice", stdout=out)
    [_, deep] = json.loads(out.getvalue())["messages"]
    assert deep["metadata"] == {"undecoded_json": "[" * depth + "]" * depth}
    call_command("eraseuser", "alice", "--yes", stdout=io.StringIO())
    assert ChatMessage.objects.get(pk=rows["alice_direct"].pk).metadata is None


# --- erasure -----------------------------------------------------------------------------------


def lobby_history() -> list[dict]:
    frames, _ = messages_page(room_id="lobby", limit=100, max_bytes=1_000_000)
    return frames


@pytest.mark.django_db
def test_the_admin_erasure_confirms_first_then_erases_keeping_history_consistent(admin_client):
    rows = seed()
    # An earlier access about Alice, which the erasure must keep.
    assert admin_client.get(f"{USERS}alice/change/").status_code == 200
    before = lobby_history()
    form = {"action": "erase_user_data", "_selected_action": ["alice"]}

    confirm = admin_client.post(USERS, form)

    assert confirm.status_code == 200
    assert "Erase these users" in confirm.text and "cannot be undone" in confirm.text
    assert "3 message(s), 1 version(s), 1 session(s) (0 open), 3 membership(s)" in confirm.text
    assert 'name="post" value="yes"' in confirm.text
    assert ChatMessage.objects.get(pk=rows["alice_lobby"].pk).content == SECRET  # not yet

    erased = admin_client.post(USERS, {**form, "post": "yes"}, REMOTE_ADDR=BOB_ADDRESS)

    assert erased.status_code == 302
    page = admin_client.get(USERS)
    assert "Erased alice: 3 message(s), 1 version(s), 1 session(s), 3 membership(s)" in page.text
    # The room's history: the same messages, in the same order, Alice's as tombstones.
    after = lobby_history()
    assert [f["message_id"] for f in after] == [f["message_id"] for f in before]
    tombstone, bobs, assistants = after
    assert tombstone["content"] is None and set(tombstone["metadata"]) == {"deleted_at"}
    assert (tombstone["user_id"], tombstone["username"]) == ("alice", ANONYMOUS)
    assert tombstone["client_message_id"] is None
    assert bobs == before[1] and assistants == before[2]
    # Nothing Alice wrote is stored any more; Bob's rows are untouched.
    for row in ChatMessage.objects.filter(pk__in=[rows["alice_lobby"].pk, rows["analysis"].pk]):
        assert (row.content, row.metadata, row.deleted_at is not None) == ("", None, True)
    assert ChatMessage.objects.get(pk=rows["bob_direct"].pk).content == "of course"
    assert not MessageVersion.objects.exists()
    alice_session = ChatSession.objects.get(user_id="alice")
    assert (alice_session.client_address, alice_session.user_agent) == ("", "")
    assert alice_session.username == ANONYMOUS and alice_session.close_code == 1000
    bob_session = ChatSession.objects.get(user_id="bob")
    assert (bob_session.client_address, bob_session.user_agent) == (BOB_ADDRESS, "BobBrowser/2.0")
    # Memberships gone but the ban; Bob's kept.
    assert list(RoomMember.objects.filter(user_id="alice").values_list("room_id", "banned")) == [
        ("quiet", True)
    ]
    assert RoomMember.objects.filter(user_id="bob").count() == 2
    assert ChatUser.objects.get(pk="alice").username == ANONYMOUS
    # Audited, with counts; the earlier view of Alice is still there.
    [entry] = audit(AuditAction.DELETE)
    assert (entry.actor, entry.client_address) == ("admin", BOB_ADDRESS)
    assert entry.details == {
        "erasure": {
            "messages": 3,
            "versions": 1,
            "sessions": 1,
            "memberships": 3,
            "sockets_closed": 0,
            "sockets_open": 0,
        }
    }
    assert len(audit(AuditAction.VIEW)) == 1
    # A tombstone is not edited back to life, nor given to the assistant as context.
    with pytest.raises(EditRefused):
        message_edit(message_id=rows["alice_lobby"].pk, content="back", editor=Editor.user("x"))
    context = room_context(room_id="lobby", before_id=rows["ai_lobby"].pk + 1, limit=10)
    assert context == [("Bob Jones", "sorry to hear, Alice"), (AI_USERNAME, before[2]["content"])]


@pytest.mark.django_db
def test_the_erase_command_asks_for_confirmation_then_erases_and_is_audited():
    rows = seed()
    out = io.StringIO()
    with pytest.raises(CommandError, match="--yes"):
        call_command("eraseuser", "alice", stdout=out)
    assert "3 messages, 1 versions, 1 sessions, 0 open_sessions, 3 memberships" in out.getvalue()
    assert ChatMessage.objects.get(pk=rows["alice_lobby"].pk).content == SECRET
    assert not AuditEntry.objects.exists()

    out = io.StringIO()
    call_command("eraseuser", "alice", "--yes", stdout=out)

    assert "Erased alice: 3 message(s) made tombstones, 1 version(s) deleted" in out.getvalue()
    assert not ChatMessage.objects.filter(user_id="alice", deleted_at__isnull=True).exists()
    [entry] = audit(AuditAction.DELETE)
    assert entry.actor_kind == ActorKind.COMMAND and "manage.py eraseuser" in entry.actor
    assert entry.details["erasure"]["messages"] == 3


@pytest.mark.django_db
@pytest.mark.parametrize("command", ["exportuser", "eraseuser"])
def test_an_unknown_uid_and_the_assistants_are_refused(command):
    rows = seed()
    extra = ["--yes"] if command == "eraseuser" else []
    with pytest.raises(CommandError, match="Nothing is stored for uid 'nobody'"):
        call_command(command, "nobody", *extra, stdout=io.StringIO())
    with pytest.raises(CommandError, match="assistant"):
        call_command(command, AI_USER_ID, *extra, stdout=io.StringIO())
    assert not AuditEntry.objects.exists()
    assistant = ChatMessage.objects.get(pk=rows["ai_lobby"].pk)
    assert assistant.deleted_at is None and assistant.content == "Please talk to your doctor."


@pytest.mark.django_db(transaction=True)
async def test_erasure_closes_the_users_socket_and_the_room_sees_tombstones(clients):
    alice = await clients.join("lobby", "alice", "Alice Smith")
    bob = await clients.join("lobby", "bob", "Bob")
    await alice.recv_type("user_joined")
    await alice.send({"type": "message", "content": SECRET})
    mine = await alice.recv_type("message")
    await bob.recv_type("message")
    await bob.send({"type": "message", "content": "sorry to hear"})
    theirs = await bob.recv_type("message")
    await alice.recv_type("message")
    frames: list = []
    watcher = asyncio.create_task(act_as_daphne(alice, frames))
    admin = await sync_to_async(get_user_model().objects.create_superuser)("admin", "a@b.c", "pw")
    http = AsyncClient()
    await sync_to_async(http.force_login)(admin)

    # Each request in its own thread-sensitive context, as Django's ASGI handler runs it under
    # daphne (the test client does not): the sync admin view waits in its own thread while
    # the sockets' database calls run in theirs.
    async with ThreadSensitiveContext():
        response = await http.post(
            USERS, {"action": "erase_user_data", "_selected_action": ["alice"], "post": "yes"}
        )

    # By the time the admin answers, Alice's socket was told and closed, its session ended.
    assert response.status_code == 302
    error, close = frames
    assert error["type"] == "error" and error["error_code"] == "SESSION_TERMINATED"
    assert close["type"] == "websocket.close" and close["code"] == 4010
    await watcher
    left = await bob.recv_type("user_left")
    assert left["user_id"] == "alice"
    await bob.send({"type": "history", "limit": 10, "request_id": "after-erasure"})
    page = await bob.recv_type("history")
    assert [m["message_id"] for m in page["messages"]] == [mine["message_id"], theirs["message_id"]]
    tombstone, kept = page["messages"]
    assert tombstone["content"] is None and set(tombstone["metadata"]) == {"deleted_at"}
    assert kept["content"] == "sorry to hear" and kept["user_id"] == "bob"
    [entry] = await sync_to_async(audit)(AuditAction.DELETE)
    assert entry.details["erasure"]["sockets_closed"] == 1


# --- across two workers on PostgreSQL ----------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not redis_answers(REDIS_URL):
        pytest.skip(f"no Redis at {REDIS_URL} (the workers share it)")
    directory = tmp_path_factory.mktemp("erasure-postgres")
    with start_cluster(directory, backend="postgres", redis_url=REDIS_URL) as running:
        yield running


async def test_erasure_across_two_workers_on_postgresql(cluster, tmp_path: Path):
    tag = uuid.uuid4().hex[:8]
    room, uid, witness_id = f"care-{tag}", f"erased-{tag}", f"witness-{tag}"
    opened: list[ChatSocket] = []

    async def join(worker, who: str, name: str) -> ChatSocket:
        client = await ChatSocket.join(worker.url, room, who, name)
        opened.append(client)
        return client

    try:
        witness = await join(cluster.a, witness_id, "Witness")
        user = await join(cluster.b, uid, "Erin Erased")
        await witness.recv_type("user_joined")
        sent = []
        for who, text in ((user, SECRET), (witness, "take care"), (user, "thanks")):
            await who.send({"type": "message", "content": text})
            sent.append((await witness.recv_type("message"))["message_id"])
            await user.recv_type("message")

        output = await asyncio.to_thread(
            manage,
            ["eraseuser", uid, "--yes"],
            env=cluster.env,
            log_path=tmp_path / "eraseuser.log",
        )

        assert f"Erased {uid}: 2 message(s) made tombstones" in output
        assert "1 socket(s) closed" in output
        # The user's socket, on worker B, was told and closed; the witness, on A, saw them go.
        await user.expect_error("SESSION_TERMINATED")
        await user.expect_close(4010)
        left = await witness.recv_type("user_left")
        assert left["user_id"] == uid
        # A fresh history on either worker: tombstones in the user's places, the rest intact.
        reader = await join(cluster.b, f"reader-{tag}", "Reader")
        await witness.send({"type": "history", "limit": 10, "request_id": "fresh"})
        pages = [(await witness.recv_type("history"))["messages"], reader.history["messages"]]
        for messages in pages:
            assert [m["message_id"] for m in messages] == sent
            first, middle, last = messages
            for tombstone in (first, last):
                assert tombstone["content"] is None and set(tombstone["metadata"]) == {"deleted_at"}
                assert tombstone["user_id"] == uid and tombstone["username"] != "Erin Erased"
            assert (middle["content"], middle["user_id"]) == ("take care", witness_id)
        db = cluster.database
        [(address, agent, close_code)] = await asyncio.to_thread(
            db.rows,
            "SELECT client_address, user_agent, close_code FROM chat_chatsession "
            "WHERE user_id = %s",
            uid,
        )
        assert (address, agent, close_code) == ("", "", 4010)
        [(actor_kind, details)] = await asyncio.to_thread(
            db.rows,
            "SELECT actor_kind, details FROM chat_auditentry WHERE object_id = %s",
            uid,
        )
        assert actor_kind == "command" and details["erasure"]["sockets_closed"] == 1
    finally:
        await asyncio.gather(*(client.close() for client in opened))
        await eventually(
            lambda: not cluster.database.open_sessions(), timeout=10, what="sessions closed"
        )
    cluster.assert_alive()


def test_erasing_an_unknown_uid_on_the_cluster_changes_nothing(cluster, tmp_path: Path):
    with pytest.raises(ServerError, match="Nothing is stored"):
        manage(
            ["eraseuser", "nobody-at-all", "--yes"], env=cluster.env, log_path=tmp_path / "e.log"
        )
    assert not cluster.database.rows(
        "SELECT id FROM chat_auditentry WHERE object_id = %s", "nobody-at-all"
    )
