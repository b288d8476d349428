"""`chat/edits.py`: an edit keeps the previous version, marks the message, and history shows
the current content with `metadata.edited_at` (protocol §12); what no message may say is
refused. The admin's edits (through the same service) are in tests/test_admin.py."""

from __future__ import annotations

import uuid

import pytest
from channels.db import database_sync_to_async

from chat.edits import Editor, EditRefused, message_edit
from chat.history import message_store, messages_page
from chat.models import ChatMessage, EditorKind, MessageVersion, Room
from chat.protocol import CONTENT_MAX_CHARS, iso

pytestmark = pytest.mark.django_db(transaction=True)

PAGE_BYTES = 1_000_000


def stored(content: str = "I slept badly", metadata: dict | None = None) -> int:
    Room.objects.get_or_create(name="lobby", defaults={"kind": "public"})
    frame = message_store(
        room_id="lobby",
        user_id="alice",
        username="Alice",
        content=content,
        metadata=metadata,
        client_message_id=f"c-{uuid.uuid4()}",  # each a new message (idempotent send)
    )
    return int(frame["message_id"])


def test_an_edit_keeps_the_previous_version_and_history_shows_edited_at():
    message_id = stored(metadata={"mood": "tired"})
    edited = message_edit(
        message_id=message_id, content="I slept well", editor=Editor.user("alice")
    )

    assert edited.content == "I slept well" and edited.edited_at is not None
    version = MessageVersion.objects.get(message_id=message_id)
    assert (version.content, version.metadata) == ("I slept badly", {"mood": "tired"})
    assert (version.editor_kind, version.editor) == (EditorKind.USER, "alice")
    assert version.edited_at == edited.edited_at
    # History: the current content, the client's metadata and the server's edited_at.
    [frame], _ = messages_page(room_id="lobby", limit=10, max_bytes=PAGE_BYTES)
    assert frame["content"] == "I slept well"
    assert frame["metadata"] == {"mood": "tired", "edited_at": iso(edited.edited_at)}
    assert frame["metadata"]["edited_at"].endswith("Z")
    # The stored metadata is still the client's own: the mark is the server's, per frame.
    assert ChatMessage.objects.get(pk=message_id).metadata == {"mood": "tired"}


def test_every_edit_is_a_version_and_unedited_messages_carry_no_mark():
    message_id, untouched = stored("one"), stored("other")
    message_edit(message_id=message_id, content="two", editor=Editor.operator("olga"))
    message_edit(message_id=message_id, content="three", editor=Editor.user("alice"))
    # The same content again is not an edit.
    message_edit(message_id=message_id, content="three", editor=Editor.user("alice"))

    versions = MessageVersion.objects.filter(message_id=message_id).order_by("id")
    assert [(v.content, v.editor_kind, v.editor) for v in versions] == [
        ("one", EditorKind.OPERATOR, "olga"),
        ("two", EditorKind.USER, "alice"),
    ]
    frames, _ = messages_page(room_id="lobby", limit=10, max_bytes=PAGE_BYTES)
    by_id = {int(frame["message_id"]): frame for frame in frames}
    assert by_id[message_id]["content"] == "three"
    assert by_id[untouched]["metadata"] is None


def test_content_no_message_may_have_is_refused_and_nothing_changes():
    message_id = stored("short")
    for bad in ("", "   \n", "a\x00b", "\ud800", "x" * (CONTENT_MAX_CHARS + 1)):
        with pytest.raises(EditRefused):
            message_edit(message_id=message_id, content=bad, editor=Editor.user("alice"))
    message = ChatMessage.objects.get(pk=message_id)
    assert (message.content, message.edited_at) == ("short", None)
    assert not MessageVersion.objects.exists()
    with pytest.raises(ChatMessage.DoesNotExist):
        message_edit(message_id=message_id + 1, content="x", editor=Editor.user("alice"))


def test_a_message_longer_than_the_limit_may_be_redacted():
    """The assistant's replies may be longer than a user's message: an operator can still
    shorten one, or save it at its length, but not make it longer."""
    long = "y" * (CONTENT_MAX_CHARS * 2)
    message_id = stored(long)
    message_edit(message_id=message_id, content=long[:-1], editor=Editor.operator("olga"))
    with pytest.raises(EditRefused):
        message_edit(message_id=message_id, content=long + "y", editor=Editor.operator("olga"))
    message_edit(message_id=message_id, content="[redacted]", editor=Editor.operator("olga"))
    assert ChatMessage.objects.get(pk=message_id).content == "[redacted]"


async def test_a_joining_socket_sees_the_edited_message_as_edited(clients):
    message_id = await database_sync_to_async(stored)("before")
    edited = await database_sync_to_async(message_edit)(
        message_id=message_id, content="after", editor=Editor.operator("olga")
    )
    bob = await clients.join("lobby", "bob")
    [frame] = bob.history["messages"]
    assert frame["message_id"] == str(message_id) and frame["content"] == "after"
    assert frame["metadata"] == {"edited_at": iso(edited.edited_at)}
