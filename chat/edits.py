"""Editing a stored message (protocol §12): the new content replaces the old, which is kept as
a `MessageVersion`, and the message is marked `edited_at`; history frames then show the
current content with `metadata.edited_at` (`chat.history.message_frame`).

An operator's edit in the admin and, later, a user's `edit` frame go through the same
service; who may edit which message is the caller's question (the author only, for users).
"""

from __future__ import annotations

from dataclasses import dataclass

from django.db import transaction
from django.db.models import Subquery
from django.utils import timezone

from chat.models import ChatMessage, EditorKind, MessageVersion
from chat.protocol import CONTENT_MAX_CHARS, storable_text
from chat.sequence import seqs_take


class EditRefused(ValueError):
    """New content that no message may have; its text says why."""


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
        MessageVersion.objects.create(
            message=message,
            content=message.content,
            metadata=Subquery(ChatMessage.objects.filter(pk=message_id).values("metadata")),
            edited_at=edited_at,
            editor_kind=editor.kind,
            editor=editor.name,
        )
        message.content, message.edited_at = content, edited_at
        # An edit is a room event: it takes the room's next seq (protocol §15).
        message.latest_seq = seqs_take(room_id=message.room_id, count=1)
        message.save(update_fields=["content", "edited_at", "latest_seq"])
    return message
