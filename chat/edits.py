"""Editing and deleting a stored message (protocol §12). An edit replaces the content, the
old one kept as a `MessageVersion`, and marks the message `edited_at`; a deletion keeps
what the message said as a version too and leaves a tombstone in its place (content and
metadata emptied, client id removed, `deleted_at` set). History frames show the current
state (`chat.history.message_frame`: `metadata.edited_at`, or `content: null` with
`metadata.deleted_at`). Each change is a room event and takes the room's next seq (§15).

An operator's edit in the admin and a user's `edit` frame go through the same service; a
user's `edit` and `delete` frames through `message_user_change`, which asks the one rule
(chat.access: the author edits, the author or a moderator or owner deletes).
"""

from __future__ import annotations

from dataclasses import dataclass

from django.db import transaction
from django.db.models import Subquery
from django.utils import timezone

from chat.access import Action, Subject, room_authorize
from chat.models import ChatMessage, EditorKind, MessageVersion
from chat.protocol import CONTENT_MAX_CHARS, MessageType, frame, iso, storable_text
from chat.sequence import seqs_take


class EditRefused(ValueError):
    """New content that no message may have; its text says why."""


class MessageNotFound(Exception):
    """No such message in the room, or it is deleted already."""


@dataclass(frozen=True)
class Editor:
    kind: EditorKind
    name: str  # a user id, or an operator's staff username

    @classmethod
    def user(cls, user_id: str) -> Editor:
        return cls(EditorKind.USER, user_id)

    @classmethod
    def operator(cls, username: str) -> Editor:
        return cls(EditorKind.OPERATOR, username)


def content_check(*, content: str, current: str) -> None:
    """EditRefused unless `content` could replace `current`: not empty, storable, and no
    longer than a message may be (or than the message already is: the assistant's replies
    may be longer, and an operator who redacts one must be able to save it)."""
    if not content.strip():
        raise EditRefused("A message cannot be empty.")
    limit = max(CONTENT_MAX_CHARS, len(current))
    if len(content) > limit:
        raise EditRefused(f"At most {limit} characters.")
    try:
        storable_text(content)
    except ValueError as error:
        raise EditRefused(f"Content {error}.") from None


def message_edit(*, message_id: int, content: str, editor: Editor) -> ChatMessage:
    """Replace a message's content, keeping what it said as a version; the message as
    stored (its metadata not loaded). Unchanged content is not an edit (no version, no mark).
    EditRefused for a deleted message or content `content_check` refuses;
    ChatMessage.DoesNotExist for no such message.

    The version's metadata is copied by the database, never decoded here: a stored row may
    hold JSON nested deeper than Python's decoder takes, and must still be editable."""
    with transaction.atomic():
        message = ChatMessage.objects.select_for_update().defer("metadata").get(pk=message_id)
        if message.deleted_at is not None:
            raise EditRefused("A deleted message cannot be edited.")
        if content == message.content:
            return message
        content_check(content=content, current=message.content)
        edited_at = timezone.now()
        _version_keep(message=message, at=edited_at, editor=editor)
        message.content, message.edited_at = content, edited_at
        # An edit is a room event: it takes the room's next seq (protocol §15).
        message.latest_seq = seqs_take(room_id=message.room_id, count=1)
        message.save(update_fields=["content", "edited_at", "latest_seq"])
    return message


def _version_keep(*, message: ChatMessage, at, editor: Editor) -> None:
    """What the message says now, kept as a version (its metadata copied by the database)."""
    MessageVersion.objects.create(
        message=message,
        content=message.content,
        metadata=Subquery(ChatMessage.objects.filter(pk=message.pk).values("metadata")),
        edited_at=at,
        editor_kind=editor.kind,
        editor=editor.name,
    )


def message_delete(*, message_id: int, deleter: Editor) -> ChatMessage:
    """Leave a tombstone in the message's place, keeping what it said as a version; the
    message as stored. MessageNotFound if it is deleted already or does not exist."""
    with transaction.atomic():
        message = (
            ChatMessage.objects.select_for_update()
            .defer("metadata")
            .filter(pk=message_id, deleted_at__isnull=True)
            .first()
        )
        if message is None:
            raise MessageNotFound(message_id)
        deleted_at = timezone.now()
        _version_keep(message=message, at=deleted_at, editor=deleter)
        message.content, message.metadata, message.client_message_id = "", None, None
        message.deleted_at = deleted_at
        message.latest_seq = seqs_take(room_id=message.room_id, count=1)
        message.save(
            update_fields=["content", "metadata", "client_message_id", "deleted_at", "latest_seq"]
        )
    return message


def message_user_change(
    *, room_id: str, message_id: int, user_id: str, content: str | None
) -> ChatMessage | None:
    """A user's `edit` (`content`) or `delete` (`content` None) of a message of `room_id`:
    the message as stored, or None if nothing changed (an edit to the same content).
    MessageNotFound (no such message in this room, or it is deleted), Refused (the rule:
    ROOM_FORBIDDEN, NOT_ALLOWED), EditRefused. Blocking (database)."""
    with transaction.atomic():
        found = (
            ChatMessage.objects.select_for_update()
            .filter(pk=message_id, room_id=room_id, deleted_at__isnull=True)
            .values_list("user_id", "content")
            .first()
        )
        if found is None:
            raise MessageNotFound(message_id)
        author, current = found
        room_authorize(
            user_id=user_id,
            room_id=room_id,
            action=Action.EDIT_MESSAGE if content is not None else Action.DELETE_MESSAGE,
            subject=Subject(member=None, author=author),
        )
        if content is None:
            return message_delete(message_id=message_id, deleter=Editor.user(user_id))
        if content == current:
            return None
        return message_edit(message_id=message_id, content=content, editor=Editor.user(user_id))


def message_updated_frame(message: ChatMessage) -> dict:
    """`message_updated` (protocol §12): the edit's own seq, the new content."""
    return frame(
        MessageType.MESSAGE_UPDATED,
        message_id=str(message.pk),
        seq=message.latest_seq,
        content=message.content,
        edited_at=iso(message.edited_at),
    )


def message_deleted_frame(message: ChatMessage, *, deleted_by: str) -> dict:
    """`message_deleted` (protocol §12): the deletion's own seq, and who deleted it."""
    return frame(
        MessageType.MESSAGE_DELETED,
        message_id=str(message.pk),
        seq=message.latest_seq,
        deleted_by=deleted_by,
    )
