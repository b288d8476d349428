"""Sessions across workers, in one process: reaping dead workers' sessions, the HTTP
companions, the admin (pages and the terminate action) and `manage.py reapsessions`."""

from __future__ import annotations

import io

import pytest
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from django.core.management import CommandError, call_command
from django.test import AsyncClient
from django.utils import timezone

from chat.liveness import worker_mark_alive
from chat.models import ChatMessage, ChatSession, ChatUser, Room
from chat.sessions import SessionLiveness, sessions_touch
from chat.shared_state import shared_state
from chat.worker import WORKER_ID, reap_dead_workers
from tests.conftest import token_for

pytestmark = pytest.mark.django_db(transaction=True)


@database_sync_to_async
def open_foreign_session(*, user_id: str, room_id: str, worker_id: str) -> ChatSession:
    """A session row as another worker would have written it."""
    user, _ = ChatUser.objects.get_or_create(user_id=user_id, username=user_id.title())
    room, _ = Room.objects.get_or_create(name=room_id)
    return ChatSession.objects.create(
        user=user,
        username=user.username,
        room=room,
        channel_name=f"specific.{worker_id}!{user_id}",
        worker_id=worker_id,
    )


# --- reaping ---------------------------------------------------------------------------------


async def test_dead_workers_sessions_are_ended_and_their_users_shown_as_left(clients):
    alice = await clients.join("lobby", "alice")
    ghost = await open_foreign_session(user_id="bob", room_id="lobby", worker_id="dead-worker")
    await open_foreign_session(user_id="bob", room_id="lobby", worker_id="dead-worker")

    assert await reap_dead_workers(exclude={WORKER_ID}) == 2

    left = await alice.recv()
    assert left["type"] == "system" and left["content"] == "Bob left the chat"
    assert (await alice.recv())["type"] == "user_left"
    await alice.expect_nothing_pending()  # once per user, not per session
    await database_sync_to_async(ghost.refresh_from_db)()
    assert ghost.disconnected_at is not None and ghost.close_reason == "worker_lost"
    assert await reap_dead_workers(exclude={WORKER_ID}) == 0


async def test_live_workers_sessions_are_kept(clients):
    alice = await clients.join("lobby", "alice")
    worker_mark_alive(worker_id="live-worker")
    await open_foreign_session(user_id="bob", room_id="lobby", worker_id="live-worker")
    assert await reap_dead_workers(exclude={WORKER_ID}) == 0
    await alice.expect_nothing_pending()


async def test_no_left_notice_while_the_user_is_still_connected_elsewhere(clients):
    alice = await clients.join("lobby", "alice")
    await clients.join("lobby", "bob")
    await alice.recv_type("user_joined")
    await open_foreign_session(user_id="bob", room_id="lobby", worker_id="dead-worker")
    assert await reap_dead_workers(exclude={WORKER_ID}) == 1
    await alice.expect_nothing_pending()


async def test_the_worker_reaps_by_itself(clients, settings):
    settings.CHAT_REAP_INTERVAL = 0.1
    alice = await clients.join("lobby", "alice")
    await open_foreign_session(user_id="bob", room_id="lobby", worker_id="dead-worker")
    left = await alice.recv(timeout=3)
    assert left["content"] == "Bob left the chat"


async def test_this_workers_own_sessions_are_never_reaped(clients):
    alice = await clients.join("lobby", "alice")
    shared_state().clear()  # even with its liveness key gone
    assert await reap_dead_workers(exclude={WORKER_ID}) == 0
    await alice.expect_nothing_pending()


async def test_reapsessions_command_needs_redis_or_all():
    await open_foreign_session(user_id="bob", room_id="lobby", worker_id="dead-worker")
    with pytest.raises(CommandError):
        await sync_to_async(call_command)("reapsessions")
    out = io.StringIO()
    await sync_to_async(call_command)("reapsessions", "--all", stdout=out)
    assert "Ended 1 session(s)" in out.getvalue()
    assert not await database_sync_to_async(
        ChatSession.objects.filter(disconnected_at__isnull=True).exists
    )()


# --- HTTP companions -------------------------------------------------------------------------


async def test_stats_and_room_users(clients):
    await clients.join("lobby", "alice")
    await clients.join("lobby", "alice")
    await clients.join("lobby", "bob")
    await clients.join("other", "carol")
    http = AsyncClient()
    auth = {"Authorization": f"Bearer {token_for('alice')}"}
    operator = {"Authorization": f"Bearer {token_for('olga', claims={'clarity_staff': True})}"}

    stats = (await http.get("/api/v1/ws/chat/stats", headers=operator)).json()
    assert stats == {"total_users": 3, "total_connections": 4, "rooms": {"lobby": 2, "other": 1}}

    body = (await http.get("/api/v1/ws/chat/users/lobby", headers=auth)).json()
    assert body["room_id"] == "lobby"
    assert {(u["user_id"], u["connection_count"]) for u in body["users"]} == {
        ("alice", 2),
        ("bob", 1),
    }
    assert (await http.get("/api/v1/ws/chat/users/bad%20room", headers=auth)).status_code == 404


@pytest.mark.parametrize(
    ("header", "status", "code"),
    [
        (None, 401, "AUTH_REQUIRED"),
        ("Basic abc", 401, "AUTH_REQUIRED"),
        ("Bearer garbage", 401, "AUTH_INVALID"),
    ],
)
async def test_http_companions_need_a_valid_token(header, status, code):
    http = AsyncClient()
    for url in ("/api/v1/ws/chat/stats", "/api/v1/ws/chat/users/lobby"):
        response = await http.get(url, headers={"Authorization": header} if header else {})
        assert response.status_code == status
        assert response.json()["error_code"] == code


# --- admin -----------------------------------------------------------------------------------


@pytest.fixture
async def admin_http(django_user_model):
    await sync_to_async(django_user_model.objects.create_superuser)("admin", "a@b.c", "pw")
    http = AsyncClient()
    await sync_to_async(http.force_login)(
        await sync_to_async(django_user_model.objects.get)(username="admin")
    )
    return http


async def test_admin_pages_list_rooms_sessions_and_messages(clients, admin_http):
    alice = await clients.join("lobby", "alice", "Alice")
    await alice.send({"type": "message", "content": "visible in the admin"})
    message_id = (await alice.recv_type("message"))["message_id"]

    rooms = await admin_http.get("/admin/chat/room/")
    assert rooms.status_code == 200 and b"lobby" in rooms.content
    sessions = await admin_http.get("/admin/chat/chatsession/?disconnected_at__isempty=1")
    assert sessions.status_code == 200
    assert alice.ack["session_id"].encode() in sessions.content
    # Found by its content, listed without it (tests/test_admin.py: minimum necessary).
    messages = await admin_http.get("/admin/chat/chatmessage/?q=visible")
    assert messages.status_code == 200 and b"visible in the admin" not in messages.content
    assert f"/admin/chat/chatmessage/{message_id}/change/".encode() in messages.content
    session = await admin_http.get(f"/admin/chat/chatsession/{alice.ack['session_id']}/change/")
    assert session.status_code == 200
    assert (await admin_http.get("/admin/chat/chatuser/")).status_code == 200


async def test_admin_terminates_live_sessions(clients, admin_http):
    alice = await clients.join("lobby", "alice")
    bob = await clients.join("lobby", "bob")
    await alice.recv_type("user_joined")
    response = await admin_http.post(
        "/admin/chat/chatsession/",
        {"action": "terminate_sessions", "_selected_action": [bob.ack["session_id"]]},
    )
    assert response.status_code == 302
    await bob.expect_refusal("SESSION_TERMINATED", 4010)
    assert (await alice.recv())["content"] == "Bob left the chat"
    assert (await alice.recv())["type"] == "user_left"
    session = await database_sync_to_async(ChatSession.objects.get)(
        session_id=bob.ack["session_id"]
    )
    assert session.close_code == 4010 and session.close_reason == "session_terminated"
    await alice.send({"type": "heartbeat"})
    assert (await alice.recv())["type"] == "heartbeat_ack"


async def test_room_admin_shows_members_now(clients, admin_http):
    await clients.join("lobby", "alice")
    await clients.join("lobby", "alice")
    await clients.join("lobby", "bob")
    page = await admin_http.get("/admin/chat/room/")
    assert page.status_code == 200
    assert b'<td class="field-members_now">2</td>' in page.content
    assert await database_sync_to_async(ChatMessage.objects.count)() == 0


# --- liveness, written in batches -------------------------------------------------------------


async def test_a_batch_never_rewrites_a_session_that_has_ended(clients):
    alice = await clients.join("lobby", "alice")
    await alice.close()
    ended = await database_sync_to_async(ChatSession.objects.get)(
        session_id=alice.ack["session_id"]
    )
    await database_sync_to_async(sessions_touch)(
        sessions=[
            SessionLiveness(
                session_id=str(ended.session_id), last_seen=timezone.now(), messages_sent=99
            )
        ]
    )
    await database_sync_to_async(ended.refresh_from_db)()
    assert ended.messages_sent == 0 and ended.last_seen <= ended.disconnected_at
