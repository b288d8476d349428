"""The assistant in a room (protocol §7, §14): whether a message gets a reply, and the reply:
streamed to the room as `assistant_delta` frames while it is written, then stored as a
`message` from "AI" answering it (`metadata.in_reply_to`, `metadata.stream_id`)."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings
from django.db import connection

from chat.assistant.base import APOLOGY, AssistantError, AssistantProvider, AssistantRequest, ask
from chat.deltas import DeltaStream, DeltaTurns, Emit
from chat.models import AssistantMode, ChatMessage, RoomKind
from chat.protocol import AI_USER_ID, AI_USERNAME
from chat.rooms import room_group
from chat.sessions import room_sockets
from chat.writer import MessageWriter

logger = logging.getLogger(__name__)

MENTION = "@ai"


def room_assistant_mode(*, stored: str, kind: str) -> str:
    """A room's stored mode; else the deployment's (ASSISTANT_MODE) if set; else by kind:
    `always` in public rooms (the original's behaviour), `mention` elsewhere — a private
    conversation goes to the model only when someone asks it to (protocol §11)."""
    if stored:
        return stored
    if settings.ASSISTANT_MODE:
        return settings.ASSISTANT_MODE
    return AssistantMode.ALWAYS if kind == RoomKind.PUBLIC else AssistantMode.MENTION


def wants_reply(*, mode: str, content: str) -> bool:
    if mode == AssistantMode.ALWAYS:
        return True
    if mode == AssistantMode.MENTION:
        return content[: len(MENTION)].lower() == MENTION
    return False


def room_context(*, room_id: str, before_id: int, limit: int) -> list[tuple[str, str]]:
    """The room's messages before the question, oldest first, as (username, content);
    deleted ones left out."""
    rows = (
        ChatMessage.objects.filter(room_id=room_id, id__lt=before_id, deleted_at__isnull=True)
        .order_by("-id")
        .values_list("username", "content")[:limit]
    )
    return list(rows)[::-1]


def question_inputs_apart(
    *, room_id: str, before_id: int, limit: int
) -> tuple[list[tuple[str, str]], int]:
    """`room_context`, and the sockets open in the room (what each delta frame will cost:
    chat.deltas), on the assistant's own database thread, which then lets its connection go
    (no connection held between questions, none left behind at exit)."""
    try:
        return (
            room_context(room_id=room_id, before_id=before_id, limit=limit),
            room_sockets(room_id=room_id),
        )
    finally:
        connection.close()


async def assistant_reply(
    *,
    provider: AssistantProvider,
    question: dict[str, Any],
    user_id: str,
    username: str,
    emit: Emit,
    turns: DeltaTurns,
    reads: ThreadPoolExecutor,
    writer: MessageWriter,
) -> dict[str, Any]:
    """Ask the provider about a stored chat message, `emit` its answer's deltas as they come,
    then store the reply and return its frame.

    The room's context (and its sockets, which pace the deltas) is read on `reads` (the
    worker's assistant database thread), not on the database thread the chat's messages are
    stored on: 5-14 ms per question measured with replies streaming, which every message
    arriving meanwhile waited behind. The reply is stored by `writer` (the worker's
    `MessageWriter`), in the batch of the chat messages arriving with it: a transaction of
    its own on that thread would hold them up just the same.

    Any failure or timeout stops the deltas and becomes the apology text: the room always
    gets an answer.
    """
    room_id = question["room_id"]
    context, sockets = await database_sync_to_async(
        question_inputs_apart, thread_sensitive=False, executor=reads
    )(
        room_id=room_id,
        before_id=int(question["message_id"]),
        limit=settings.ASSISTANT_CONTEXT_MESSAGES,
    )
    request = AssistantRequest(
        user_id=user_id,
        username=username,
        question=question["content"],
        context=context,
        metrics=None,
        kind="chat",
    )
    deltas = DeltaStream(
        kind="reply",
        room_id=room_id,
        in_reply_to=question["message_id"],
        emit=emit,
        group=room_group(room_id),
        turns=turns,
        sockets=sockets,
    )
    try:
        try:
            content = (await ask(provider, request, on_text=deltas.write)).narrative
        except AssistantError as exc:
            logger.warning("assistant failed in room=%s: %s", room_id, exc)
            content = APOLOGY
            await deltas.finish(final=None)
        else:
            await deltas.finish(final=content)
    finally:
        deltas.cancel()
    # Stored as the members' messages are, with the pushes it owes (protocol §13): an asker
    # who has left hears that the answer came.
    stored = await writer.store(
        room_id=room_id,
        user_id=AI_USER_ID,
        username=AI_USERNAME,
        content=content,
        metadata={"in_reply_to": question["message_id"], "stream_id": deltas.stream_id},
        client_message_id=None,
    )
    return stored.frame
