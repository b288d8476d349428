"""Retention: deleting what is older than the deployment keeps (`manage.py purgechat`, run
daily by the systemd timer in deploy/, like Django's `clearsessions`).

Messages older than CHAT_MESSAGE_RETENTION_DAYS go with their versions; ended sessions
(connection records: address, user agent) that ended longer than CHAT_SESSION_RETENTION_DAYS
ago go too. Open sessions are never touched, whatever their age. Either setting at 0 (the
default) keeps that kind forever. Audit entries are not purged here: the access log has its
own retention (HIPAA asks six years).

Deletions run in batches of at most `batch_size` rows, oldest first, each its own
transaction: memory stays bounded, and no statement locks more than a batch of a big table,
so workers keep writing while it runs. An interrupted purge has deleted whole batches only,
and the next run goes on from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db.models import QuerySet
from django.utils import timezone

from chat.models import ChatMessage, ChatSession, MessageVersion

BATCH_SIZE = 1000


@dataclass(frozen=True)
class Purged:
    messages: int = 0
    versions: int = 0
    sessions: int = 0


def cutoff(*, days: int, now: datetime) -> datetime | None:
    """The moment before which rows go; None when `days` is 0 (kept forever)."""
    if days < 0:
        raise ValueError("a retention is a number of days, 0 to keep forever")
    return now - timedelta(days=days) if days else None


def _delete_in_batches(rows: QuerySet, *, batch_size: int) -> dict[str, int]:
    """Delete `rows` a batch of primary keys at a time (oldest first: the queryset's order),
    each batch in its own transaction, until none is left; counts by model label, summed
    (rows deleted with them by cascade included). Only the keys are loaded, never content."""
    totals: dict[str, int] = {}
    while True:
        keys = list(rows.values_list("pk", flat=True)[:batch_size])
        if not keys:
            return totals
        _, counts = rows.model.objects.filter(pk__in=keys).only("pk").delete()
        for label, count in counts.items():
            totals[label] = totals.get(label, 0) + count


def chat_purge(
    *,
    message_days: int,
    session_days: int,
    now: datetime | None = None,
    batch_size: int = BATCH_SIZE,
) -> Purged:
    """Delete messages created more than `message_days` ago (with their versions) and
    sessions that ended more than `session_days` ago; 0 keeps that kind. What was deleted."""
    now = now or timezone.now()
    counts: dict[str, int] = {}
    if (before := cutoff(days=message_days, now=now)) is not None:
        old = ChatMessage.objects.filter(created_at__lt=before).order_by("created_at", "pk")
        counts |= _delete_in_batches(old, batch_size=batch_size)  # versions by cascade
    if (before := cutoff(days=session_days, now=now)) is not None:
        ended = ChatSession.objects.filter(disconnected_at__lt=before).order_by("disconnected_at")
        counts |= _delete_in_batches(ended, batch_size=batch_size)
    return Purged(
        messages=counts.get(ChatMessage._meta.label, 0),
        versions=counts.get(MessageVersion._meta.label, 0),
        sessions=counts.get(ChatSession._meta.label, 0),
    )


def chat_purge_pending(
    *, message_days: int, session_days: int, now: datetime | None = None
) -> Purged:
    """What `chat_purge` would delete now (a dry run), counted without deleting."""
    now = now or timezone.now()
    messages = versions = sessions = 0
    if (before := cutoff(days=message_days, now=now)) is not None:
        old = ChatMessage.objects.filter(created_at__lt=before)
        messages = old.count()
        versions = MessageVersion.objects.filter(message__in=old).count()
    if (before := cutoff(days=session_days, now=now)) is not None:
        sessions = ChatSession.objects.filter(disconnected_at__lt=before).count()
    return Purged(messages=messages, versions=versions, sessions=sessions)
