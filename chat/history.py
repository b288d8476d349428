"""Stored chat messages: writing them, paging them, and their wire form."""

from __future__ import annotations

from typing import Any

from chat.models import ChatMessage
from chat.protocol import MessageType, frame, iso


def message_create(
    *,
    room_id: str,
    user_id: str,
    username: str,
    content: str,
    metadata: dict[str, Any] | None,
    client_message_id: str | None,
) -> ChatMessage:
    return ChatMessage.objects.create(
        room_id=room_id,
        user_id=user_id,
        username=username,
        content=content,
        metadata=metadata,
        client_message_id=client_message_id,
    )


def message_store(
    *,
    room_id: str,
    user_id: str,
    username: str,
    content: str,
    metadata: dict[str, Any] | None,
    client_message_id: str | None,
) -> dict[str, Any]:
    """Store a chat message (a user's or the assistant's); its `message` frame."""
    return message_frame(
        message_create(
            room_id=room_id,
            user_id=user_id,
            username=username,
            content=content,
            metadata=metadata,
            client_message_id=client_message_id,
        )
    )


def message_frame(message: ChatMessage) -> dict[str, Any]:
    """The `message` frame of a stored message; its timestamp is when it was stored."""
    payload = frame(
        MessageType.MESSAGE,
        message_id=str(message.pk),
        content=message.content,
        user_id=message.user_id,
        username=message.username,
        metadata=message.metadata,
        client_message_id=message.client_message_id,
        room_id=message.room_id,
    )
    payload["timestamp"] = iso(message.created_at)
    return payload


def messages_page(
    *, room_id: str, limit: int, before: int | None = None, after: int | None = None
) -> tuple[list[dict[str, Any]], bool]:
    """Up to `limit` message frames, oldest first, and whether more lie beyond the page.

    Default and `before`: the newest messages (older than `before`); `after`: the oldest
    messages newer than `after` (catching up after a reconnect).
    """
    messages = ChatMessage.objects.filter(room_id=room_id)
    if after is not None:
        page = list(messages.filter(id__gt=after).order_by("id")[: limit + 1])
        has_more = len(page) > limit
        page = page[:limit]
    else:
        if before is not None:
            messages = messages.filter(id__lt=before)
        page = list(messages.order_by("-id")[: limit + 1])
        has_more = len(page) > limit
        page = page[:limit][::-1]
    return [message_frame(message) for message in page], has_more
