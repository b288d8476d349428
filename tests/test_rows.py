"""Rows written in bulk (chat/rows.py): what the ORM would have stored, conflicts skipped
only when asked. (On PostgreSQL these statements run in every distributed test's joins and
closes: tests/test_distributed.py.)"""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.db import IntegrityError
from django.utils import timezone

from chat.models import ChatSession, ChatUser, Role, Room, RoomKind, RoomMember
from chat.rows import rows_insert, rows_update

pytestmark = pytest.mark.django_db


def session(user: ChatUser, room: Room, **fields) -> ChatSession:
    return ChatSession(
        session_id=uuid.uuid4(),
        user=user,
        username=user.username,
        room=room,
        channel_name=f"test.{uuid.uuid4().hex}",
        worker_id="w1",
        client_address="203.0.113.9",
        user_agent="ua ☃",
        **fields,
    )


def stored(row) -> dict:
    fresh = type(row).objects.get(pk=row.pk)
    return {f.attname: getattr(fresh, f.attname) for f in type(row)._meta.concrete_fields}


def test_inserted_rows_read_back_as_the_orm_would_have_stored_them():
    user = ChatUser.objects.create(user_id="alice", username="Alice")
    room = Room.objects.create(name="lobby", kind=RoomKind.PUBLIC)
    ours, theirs = session(user, room), session(user, room, messages_sent=3)
    rows_insert(rows=[ours])
    theirs.save(force_insert=True)
    mine, orm = stored(ours), stored(theirs)
    for differs in ("session_id", "channel_name", "messages_sent", "connected_at", "last_seen"):
        mine.pop(differs), orm.pop(differs)
    assert mine == orm
    assert stored(ours)["connected_at"] == ours.connected_at  # aware datetimes kept exactly
    assert not ours._state.adding


def test_an_auto_key_is_left_to_the_database_and_conflicts_are_skipped_only_when_asked():
    room = Room.objects.create(name="lobby", kind=RoomKind.PUBLIC)
    RoomMember.objects.create(room=room, user_id="alice", role=Role.OWNER)
    rows_insert(
        rows=[
            RoomMember(room=room, user_id="alice", role=Role.MEMBER),  # taken: skipped
            RoomMember(room=room, user_id="bob", role=Role.MEMBER),
        ],
        ignore_conflicts=True,
    )
    assert dict(RoomMember.objects.values_list("user_id", "role")) == {
        "alice": Role.OWNER,
        "bob": Role.MEMBER,
    }
    with pytest.raises(IntegrityError):
        rows_insert(rows=[RoomMember(room=room, user_id="bob", role=Role.MODERATOR)])


def test_updated_fields_change_and_nothing_else():
    user = ChatUser.objects.create(user_id="alice", username="Alice")
    room = Room.objects.create(name="lobby", kind=RoomKind.PUBLIC)
    rows = [session(user, room) for _ in range(3)]
    rows_insert(rows=rows)
    later = timezone.now() + timedelta(minutes=5)
    for n, row in enumerate(rows[:2]):
        row.disconnected_at, row.close_code, row.close_reason = later, 1000 + n, "client"
        row.username = "not written"
    rows_update(rows=rows[:2], fields=["disconnected_at", "close_code", "close_reason"])
    got = {str(s.session_id): s for s in ChatSession.objects.all()}
    for n, row in enumerate(rows[:2]):
        fresh = got[str(row.session_id)]
        assert (fresh.disconnected_at, fresh.close_code, fresh.close_reason) == (
            later,
            1000 + n,
            "client",
        )
        assert fresh.username == "Alice"
    assert got[str(rows[2].session_id)].disconnected_at is None


def test_a_raise_only_update_never_lowers_a_value():
    """Two workers storing read positions at once: the one behind cannot undo the other."""
    room = Room.objects.create(name="lobby", kind=RoomKind.PUBLIC)
    ahead, behind, fresh = (
        RoomMember.objects.create(room=room, user_id=uid, last_read_seq=seq)
        for uid, seq in (("alice", 9), ("bob", 3), ("carol", None))
    )
    for member, seq in ((ahead, 5), (behind, 7), (fresh, 2)):
        member.last_read_seq = seq  # what a worker that read the row earlier would write
    rows_update(rows=[ahead, behind, fresh], fields=["last_read_seq"], raise_only=True)
    stored = dict(RoomMember.objects.values_list("user_id", "last_read_seq"))
    assert stored == {"alice": 9, "bob": 7, "carol": 2}
    with pytest.raises(ValueError):
        rows_update(rows=[ahead], fields=["last_read_seq", "role"], raise_only=True)
