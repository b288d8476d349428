"""Migration 0003 (protocol §11): rooms that existed before membership become private, with
everyone who posted or held a session there as members — nobody gains a room."""

from __future__ import annotations

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

pytestmark = pytest.mark.django_db(transaction=True)

BEFORE = [("chat", "0002_rooms_membership")]
AFTER = [("chat", "0003_rooms_existing_private")]


def migrate_to(targets):
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(targets)
    return executor.loader.project_state(targets).apps


@pytest.fixture(autouse=True)
def back_to_latest():
    yield
    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes())


def test_existing_rooms_become_private_with_their_posters_and_visitors_as_members():
    apps = migrate_to(BEFORE)
    Room = apps.get_model("chat", "Room")
    ChatUser = apps.get_model("chat", "ChatUser")
    ChatMessage = apps.get_model("chat", "ChatMessage")
    ChatSession = apps.get_model("chat", "ChatSession")
    lobby = Room.objects.create(name="lobby")
    Room.objects.create(name="quiet")
    health = Room.objects.create(name="health_analysis_carol")
    for uid in ("alice", "bob", "carol", "dave"):
        ChatUser.objects.create(user_id=uid, username=uid.title())
    ChatMessage.objects.create(room=lobby, user_id="alice", username="Alice", content="hi")
    ChatMessage.objects.create(room=lobby, user_id="AI", username="AI", content="hello")
    session = {"channel_name": "c", "worker_id": "w", "username": "x"}
    ChatSession.objects.create(room=lobby, user_id="bob", **session)
    ChatSession.objects.create(room=health, user_id="carol", **session)
    # A stray row of another user in a personal room must not make them its member.
    ChatSession.objects.create(room=health, user_id="dave", **session)

    apps = migrate_to(AFTER)
    Room = apps.get_model("chat", "Room")
    RoomMember = apps.get_model("chat", "RoomMember")
    kinds = dict(Room.objects.values_list("name", "kind"))
    assert kinds == {"lobby": "private", "quiet": "private", "health_analysis_carol": "personal"}
    members = set(RoomMember.objects.values_list("room_id", "user_id", "role", "banned"))
    assert members == {
        ("lobby", "alice", "member", False),
        ("lobby", "bob", "member", False),
        ("health_analysis_carol", "carol", "owner", False),
    }


def test_messages_stored_before_sequence_numbers_are_numbered_in_order():
    """Migration 0006 (protocol §15): each room's messages 1, 2, 3... in the order stored,
    each room's last_seq their count, so `after_seq` pages reach every old message."""
    apps = migrate_to([("chat", "0005_userdata")])
    Room = apps.get_model("chat", "Room")
    ChatMessage = apps.get_model("chat", "ChatMessage")
    lobby, other = Room.objects.create(name="lobby"), Room.objects.create(name="other")
    Room.objects.create(name="empty")
    for n in range(5):
        for room in (lobby, other) if n % 2 else (lobby,):
            ChatMessage.objects.create(room=room, user_id="u", username="U", content=f"{n}")

    apps = migrate_to([("chat", "0006_sequence_numbers")])
    Room = apps.get_model("chat", "Room")
    ChatMessage = apps.get_model("chat", "ChatMessage")
    for room_id, count in (("lobby", 5), ("other", 2), ("empty", 0)):
        rows = ChatMessage.objects.filter(room_id=room_id).order_by("id")
        assert list(rows.values_list("seq", "latest_seq")) == [(n, n) for n in range(1, count + 1)]
        assert Room.objects.get(pk=room_id).last_seq == count
