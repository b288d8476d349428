"""One user's data: its export (the right of access) and its erasure (the right to deletion).

What a user's data is here: the messages they wrote, with every earlier version of them; the
messages in their personal room (`health_analysis_<uid>`: the assistant's analyses of their
health data); their sessions (when, from which address, with which user agent); their
memberships; and their display name. There is no device registry (push notifications,
protocol §13, are not built), so an export says so instead of listing devices.

An erasure keeps every room's history consistent: each erased message stays, with its id and
place, as a tombstone — content emptied, metadata and client id removed, `deleted_at` set —
which history shows as `content: null` with `metadata.deleted_at` (protocol §12). Their
versions are deleted; sessions keep when and where (room, worker) but lose their address,
user agent and name; memberships go, except bans (a moderation decision about the user,
which erasing must not lift); the name on the user's rows becomes the one a token without a
name gives (`User_` + 8 characters of the uid). The user's open sockets are closed first, on
whichever worker holds them (`session.terminate`, close 4010), so nothing they send lands
after the erasure, and their rooms see them leave. Audit entries about them are kept.

What an erasure cannot reach (README, "Security and operations"): other users' messages
quoting them, the assistant's replies in shared rooms that quote them, the hosts' logs, and
database backups. It does not close the Firebase account: a user who signs in again starts
new data.

Blocking (database, and waiting for sockets to close): call from a thread.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from asgiref.sync import async_to_sync
from django.db import transaction
from django.db.models import F, Prefetch, Q, QuerySet, TextField, Value
from django.db.models.functions import Cast, Coalesce
from django.utils import timezone

from chat.auth import display_name
from chat.models import ChatMessage, ChatSession, ChatUser, MessageVersion, RoomMember
from chat.protocol import AI_USER_ID, HEALTH_ROOM_PREFIX, iso
from chat.sequence import deletions_number
from chat.sessions import sessions_terminate, sessions_wait_ended

EXPORT_FORMAT = "clarity-chat-user-export/1"
NO_DEVICE_REGISTRY = (
    "No devices are listed: this server keeps no device registry (push notifications, "
    "protocol §13, are not built), so it holds no device tokens for this user."
)


class UserDataRefused(ValueError):
    """A uid whose data is not one user's (the assistant's)."""


class UnknownUser(LookupError):
    """No data of this uid: no user row, message or membership."""


@dataclass(frozen=True)
class Erasure:
    """What an erasure did: rows changed or deleted, and the user's sockets it closed (and
    any still open when it gave up waiting)."""

    messages: int
    versions: int
    sessions: int
    memberships: int
    sockets_closed: int
    sockets_open: int

    def counts(self) -> dict[str, int]:
        return asdict(self)


def personal_room_id(*, user_id: str) -> str:
    return f"{HEALTH_ROOM_PREFIX}{user_id}"


def _messages_of(user_id: str) -> QuerySet[ChatMessage]:
    """The user's messages, and everything in their personal room (the analyses)."""
    return ChatMessage.objects.filter(
        Q(user_id=user_id) | Q(room_id=personal_room_id(user_id=user_id))
    )


def user_data_check(*, user_id: str) -> None:
    """UserDataRefused for the assistant's uid; UnknownUser if nothing is stored for it."""
    if user_id == AI_USER_ID:
        raise UserDataRefused("AI is the assistant's uid, not a user's")
    if not (
        ChatUser.objects.filter(pk=user_id).exists()
        or ChatMessage.objects.filter(user_id=user_id).exists()
        or RoomMember.objects.filter(user_id=user_id).exists()
    ):
        raise UnknownUser(user_id)


def user_data_counts(*, user_id: str) -> dict[str, int]:
    """How much is stored for the user (what an erasure would reach): messages (theirs and
    their personal room's), versions, sessions, open sessions, memberships (bans apart)."""
    user_data_check(user_id=user_id)
    messages = _messages_of(user_id)
    sessions = ChatSession.objects.filter(user_id=user_id)
    return {
        "messages": messages.count(),
        "versions": MessageVersion.objects.filter(message__in=messages).count(),
        "sessions": sessions.count(),
        "open_sessions": sessions.filter(disconnected_at__isnull=True).count(),
        "memberships": RoomMember.objects.filter(user_id=user_id, banned=False).count(),
    }


def _json_value(text: str | None) -> Any:
    """A stored JSON value, decoded; as its text if Python's decoder cannot take it (nested
    deeper than its recursion limit: a row written by something other than this code)."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return {"undecoded_json": text}


def _when(moment) -> str | None:
    return iso(moment) if moment is not None else None


def _message_entry(message: ChatMessage) -> dict[str, Any]:
    deleted = message.deleted_at is not None
    return {
        "message_id": str(message.pk),
        "room_id": message.room_id,
        "user_id": message.user_id,
        "created_at": iso(message.created_at),
        "content": None if deleted else message.content,
        "metadata": None if deleted else _json_value(message.stored_metadata),
        "client_message_id": message.client_message_id,
        "edited_at": _when(message.edited_at),
        "deleted_at": _when(message.deleted_at),
        # Earlier versions, oldest first; who replaced each only by kind (an operator's name
        # is not this user's data).
        "versions": [
            {
                "content": version.content,
                "metadata": _json_value(version.stored_metadata),
                "replaced_at": iso(version.edited_at),
                "replaced_by": version.editor_kind,
            }
            for version in message.versions.all()
        ],
    }


def user_export(*, user_id: str) -> dict[str, Any]:
    """Everything stored about the user, as one JSON-ready object: their profile row, their
    messages with versions, their personal room's messages, their sessions with addresses
    and user agents, their memberships; nothing of other users (their messages, names, or
    the other member of a direct room). UserDataRefused / UnknownUser as `user_data_check`."""
    user_data_check(user_id=user_id)
    user = ChatUser.objects.filter(pk=user_id).first()
    versions = (
        MessageVersion.objects.defer("metadata")
        .annotate(stored_metadata=Cast("metadata", TextField()))
        .order_by("id")
    )
    messages = (
        _messages_of(user_id)
        .defer("metadata")
        .annotate(stored_metadata=Cast("metadata", TextField()))
        .prefetch_related(Prefetch("versions", queryset=versions))
        .order_by("id")
    )
    entries = [_message_entry(message) for message in messages.iterator(chunk_size=500)]
    sessions = ChatSession.objects.filter(user_id=user_id).order_by("connected_at")
    memberships = (
        RoomMember.objects.filter(user_id=user_id).select_related("room").order_by("joined_at")
    )
    return {
        "format": EXPORT_FORMAT,
        "exported_at": iso(timezone.now()),
        "user": {
            "user_id": user_id,
            "username": user.username if user else None,
            "first_seen": _when(user.first_seen) if user else None,
        },
        "messages": [entry for entry in entries if entry["user_id"] == user_id],
        "personal_room_messages": [entry for entry in entries if entry["user_id"] != user_id],
        "sessions": [
            {
                "session_id": str(session.session_id),
                "room_id": session.room_id,
                "endpoint": session.endpoint,
                "username": session.username,
                "client_address": session.client_address,
                "user_agent": session.user_agent,
                "connected_at": iso(session.connected_at),
                "last_seen": iso(session.last_seen),
                "disconnected_at": _when(session.disconnected_at),
                "close_code": session.close_code,
                "close_reason": session.close_reason,
                "messages_sent": session.messages_sent,
            }
            for session in sessions.iterator(chunk_size=500)
        ],
        "memberships": [
            {
                "room_id": member.room_id,
                "room_kind": member.room.kind,
                "role": member.role,
                "joined_at": iso(member.joined_at),
                "muted": member.muted,
                "banned": member.banned,
                "last_read_seq": member.last_read_seq,
            }
            for member in memberships
        ],
        "devices": [],
        "notes": [NO_DEVICE_REGISTRY],
    }


def export_summary(data: dict[str, Any]) -> dict[str, int]:
    """What the audit keeps of an export: how many of each kind, never what."""
    kinds = ("messages", "personal_room_messages", "sessions", "memberships")
    return {kind: len(data[kind]) for kind in kinds}


def user_erase(
    *, user_id: str, timeout: float, audit: Callable[[dict[str, int]], object]
) -> Erasure:
    """Erase the user's data (see the module's docstring). Their open sockets are closed
    first and waited for, at most `timeout` seconds; then, in one transaction under the
    user's lock (the one a socket's open and close take), every row is changed and
    `audit(counts)` records it: an erasure that cannot be recorded does not happen.
    UserDataRefused / UnknownUser as `user_data_check`."""
    user_data_check(user_id=user_id)
    open_sessions = list(
        ChatSession.objects.filter(user_id=user_id, disconnected_at__isnull=True).values_list(
            "session_id", "channel_name"
        )
    )
    still_open = 0
    if open_sessions:
        sessions_terminate(session_ids=[str(session_id) for session_id, _ in open_sessions])
        still_open = async_to_sync(sessions_wait_ended)(
            channels=[channel for _, channel in open_sessions], timeout=timeout
        )
    anonymous = display_name({}, user_id)
    tombstone = {
        "content": "",
        "metadata": None,
        "client_message_id": None,
        "deleted_at": Coalesce(F("deleted_at"), Value(timezone.now())),
    }
    with transaction.atomic():
        ChatUser.objects.filter(pk=user_id).update(username=anonymous)  # locks the row
        messages = _messages_of(user_id)
        deleted_now = messages.filter(deleted_at__isnull=True).order_by("id")
        deletions_number(rows=list(deleted_now.values_list("pk", "room_id")))  # §15
        versions, _ = MessageVersion.objects.filter(message__in=messages).delete()
        erased = ChatMessage.objects.filter(user_id=user_id).update(username=anonymous, **tombstone)
        erased += messages.exclude(user_id=user_id).update(**tombstone)
        sessions = ChatSession.objects.filter(user_id=user_id).update(
            client_address="", user_agent="", username=anonymous
        )
        memberships, _ = RoomMember.objects.filter(user_id=user_id, banned=False).delete()
        erasure = Erasure(
            messages=erased,
            versions=versions,
            sessions=sessions,
            memberships=memberships,
            sockets_closed=len(open_sessions) - still_open,
            sockets_open=ChatSession.objects.filter(
                user_id=user_id, disconnected_at__isnull=True
            ).count(),
        )
        audit(erasure.counts())
    return erasure
