"""`chat/retention.py` and `manage.py purgechat`: messages older than the message retention go
with their versions, ended sessions older than the session retention go, everything recent
and every open session stays; off by default; deleted in bounded batches that never load
content."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from chat.edits import Editor, message_edit
from chat.models import ChatMessage, ChatSession, ChatUser, MessageVersion, Room
from chat.retention import chat_purge

pytestmark = pytest.mark.django_db

NOW = timezone.now()


def days_ago(days: float):
    return NOW - timedelta(days=days)


def message(age_days: float, content: str = "hello", *, edited: bool = False) -> ChatMessage:
    Room.objects.get_or_create(name="lobby", defaults={"kind": "public"})
    row = ChatMessage.objects.create(
        room_id="lobby", user_id="alice", username="Alice", content=content
    )
    if edited:
        message_edit(message_id=row.pk, content=f"{content} (edited)", editor=Editor.user("alice"))
    ChatMessage.objects.filter(pk=row.pk).update(created_at=days_ago(age_days))
    return row


def session(*, connected_days: float, ended_days: float | None) -> ChatSession:
    Room.objects.get_or_create(name="lobby", defaults={"kind": "public"})
    user, _ = ChatUser.objects.get_or_create(user_id="alice", defaults={"username": "Alice"})
    return ChatSession.objects.create(
        user=user,
        username="Alice",
        room_id="lobby",
        channel_name="c",
        worker_id="w",
        client_address="203.0.113.7",
        connected_at=days_ago(connected_days),
        last_seen=days_ago(ended_days if ended_days is not None else 0),
        disconnected_at=days_ago(ended_days) if ended_days is not None else None,
    )


def purge(*args: str) -> str:
    out = io.StringIO()
    call_command("purgechat", *args, stdout=out)
    return out.getvalue()


@pytest.fixture
def rows():
    """Old and recent messages (one of each edited) and sessions, and a session open for a
    long time."""
    return {
        "old": message(40, edited=True),
        "old_plain": message(31),
        "recent": message(29, edited=True),
        "new": message(0),
        "ended_long_ago": session(connected_days=100, ended_days=95),
        "ended_recently": session(connected_days=100, ended_days=80),
        "open_for_ages": session(connected_days=400, ended_days=None),
    }


def test_off_by_default_deletes_nothing(rows, settings):
    assert settings.CHAT_MESSAGE_RETENTION_DAYS == 0
    assert settings.CHAT_SESSION_RETENTION_DAYS == 0
    messages, versions = ChatMessage.objects.count(), MessageVersion.objects.count()
    sessions = ChatSession.objects.count()

    output = purge()

    assert "Deleted 0 message(s) and 0 version(s) (retention off)" in output
    assert "0 ended session(s) (retention off)" in output
    assert ChatMessage.objects.count() == messages == 4
    assert MessageVersion.objects.count() == versions == 2
    assert ChatSession.objects.count() == sessions == 3


def test_old_messages_go_with_their_versions_and_recent_ones_stay(rows, settings):
    settings.CHAT_MESSAGE_RETENTION_DAYS = 30

    output = purge()

    assert "Deleted 2 message(s) and 1 version(s) (older than 30 days)" in output
    kept = set(ChatMessage.objects.values_list("pk", flat=True))
    assert kept == {rows["recent"].pk, rows["new"].pk}
    assert set(MessageVersion.objects.values_list("message_id", flat=True)) == {rows["recent"].pk}
    # Sessions have their own retention, still off.
    assert ChatSession.objects.count() == 3


def test_old_ended_sessions_go_and_open_ones_never(rows, settings):
    settings.CHAT_SESSION_RETENTION_DAYS = 90

    output = purge()

    assert "1 ended session(s) (older than 90 days)" in output
    kept = set(ChatSession.objects.values_list("pk", flat=True))
    assert kept == {rows["ended_recently"].pk, rows["open_for_ages"].pk}
    assert ChatMessage.objects.count() == 4  # message retention still off
    # Even a retention shorter than every session leaves the open one alone.
    settings.CHAT_SESSION_RETENTION_DAYS = 1
    purge()
    assert list(ChatSession.objects.values_list("pk", flat=True)) == [rows["open_for_ages"].pk]


def test_a_dry_run_counts_and_deletes_nothing(rows, settings):
    settings.CHAT_MESSAGE_RETENTION_DAYS, settings.CHAT_SESSION_RETENTION_DAYS = 30, 90
    output = purge("--dry-run")
    assert "Would delete 2 message(s) and 1 version(s)" in output
    assert "1 ended session(s)" in output
    assert ChatMessage.objects.count() == 4 and ChatSession.objects.count() == 3


def test_deletes_in_bounded_batches_without_loading_content(settings):
    secret = "my HIV test came back"
    old = [message(60 + n, secret, edited=n % 2 == 0) for n in range(7)]
    recent = message(1, secret)

    with CaptureQueriesContext(connection) as queries:
        purged = chat_purge(message_days=30, session_days=0, batch_size=3)

    assert (purged.messages, purged.versions, purged.sessions) == (7, 4, 0)
    assert list(ChatMessage.objects.values_list("pk", flat=True)) == [recent.pk]
    assert not MessageVersion.objects.filter(message_id__in=[row.pk for row in old]).exists()
    statements = [query["sql"] for query in queries.captured_queries]
    message_deletes = [
        sql for sql in statements if sql.startswith('DELETE FROM "chat_chatmessage"')
    ]
    assert len(message_deletes) == 3  # 3 + 3 + 1 rows, one statement each
    # Nothing read the content or metadata of what it deleted.
    assert not any('"content"' in sql or '"metadata"' in sql for sql in statements)


def test_a_bad_batch_size_is_refused():
    with pytest.raises(CommandError, match="--batch-size"):
        purge("--batch-size", "0")
