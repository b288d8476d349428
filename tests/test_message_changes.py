"""Users' edits and deletions (protocol §12, `edit` and `delete`), on the real consumer and
in-memory layer: who may change what (the author edits; the author, a moderator or an owner
deletes), the broadcasts with their own seqs, history and `after_seq` showing the current
state, the versions kept, and what a hostile member would try (someone else's message, a
message of another room, a deleted one, a room they were removed from)."""

from __future__ import annotations

import pytest
from channels.db import database_sync_to_async

from chat.membership import member_put, room_create_private
from chat.models import ChatMessage, MessageVersion, RoomMember
from tests.conftest import NO_BUDGETS

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _generous(settings):
    for name, value in NO_BUDGETS.items():
        setattr(settings, name, value)


def private_room(owner: str, *members: str) -> str:
    return room_create_private(user_id=owner, name="Care team", members=list(members))["room_id"]


async def said(client, content: str, *others) -> dict:
    """Send a message; its echo, once every other member got it too."""
    await client.send({"type": "message", "content": content})
    echo = await client.recv_type("message")
    for other in others:
        await other.recv_type("message")
    return echo


async def test_the_author_edits_and_the_room_sees_the_new_content_with_its_own_seq(clients):
    alice = await clients.join("lobby", "alice")
    bob = await clients.join("lobby", "bob")
    await alice.recv_type("user_joined")
    sent = await said(alice, "I slept badly", bob)
    await said(bob, "sorry to hear", alice)  # seq 2
    await alice.send({"type": "edit", "message_id": sent["message_id"], "content": "I slept OK"})
    for client in (alice, bob):
        updated = await client.recv_type("message_updated")
        assert updated["message_id"] == sent["message_id"]
        assert (updated["seq"], updated["content"]) == (3, "I slept OK")
        assert updated["edited_at"]
    # History and a catch-up read show the current state; the old text is a version.
    await bob.send({"type": "history", "after_seq": 2})
    (entry,) = (await bob.recv_type("history"))["messages"]
    assert (entry["content"], entry["seq"], entry["changed_seq"]) == ("I slept OK", 1, 3)
    assert entry["metadata"]["edited_at"] == updated["edited_at"]
    versions = await database_sync_to_async(list)(
        MessageVersion.objects.values_list("content", "editor")
    )
    assert versions == [("I slept badly", "alice")]
    # The same content again is no edit: nothing is broadcast, no seq is taken.
    await alice.send({"type": "edit", "message_id": sent["message_id"], "content": "I slept OK"})
    await alice.expect_nothing_pending()
    await bob.expect_nothing_pending()


async def test_only_the_author_edits(clients):
    alice = await clients.join("lobby", "alice")
    bob = await clients.join("lobby", "bob")
    await alice.recv_type("user_joined")
    sent = await said(alice, "mine", bob)
    await bob.send({"type": "edit", "message_id": sent["message_id"], "content": "yours now"})
    await bob.expect_error("NOT_ALLOWED")
    await alice.expect_nothing_pending()
    stored = await database_sync_to_async(ChatMessage.objects.get)(pk=sent["message_id"])
    assert stored.content == "mine" and stored.edited_at is None


async def test_the_author_deletes_and_history_keeps_a_tombstone(clients):
    alice = await clients.join("lobby", "alice")
    bob = await clients.join("lobby", "bob")
    await alice.recv_type("user_joined")
    sent = await said(alice, "too much detail about my symptoms", bob)
    await alice.send({"type": "delete", "message_id": sent["message_id"]})
    for client in (alice, bob):
        deleted = await client.recv_type("message_deleted")
        assert (deleted["message_id"], deleted["seq"], deleted["deleted_by"]) == (
            sent["message_id"],
            2,
            "alice",
        )
    await bob.send({"type": "history", "after_seq": 1})
    (entry,) = (await bob.recv_type("history"))["messages"]
    assert entry["content"] is None and entry["metadata"]["deleted_at"]
    assert entry["changed_seq"] == 2
    version = await database_sync_to_async(MessageVersion.objects.get)()
    assert version.content == "too much detail about my symptoms"
    # Deleted is gone: neither edited nor deleted again.
    for frame in (
        {"type": "delete", "message_id": sent["message_id"]},
        {"type": "edit", "message_id": sent["message_id"], "content": "back"},
    ):
        await alice.send(frame)
        await alice.expect_error("MESSAGE_NOT_FOUND")


async def test_moderators_delete_others_messages_members_do_not(clients):
    room = await database_sync_to_async(private_room)("olive", "mona", "mel")
    await database_sync_to_async(member_put)(
        room_id=room, actor_id="olive", user_id="mona", role="moderator"
    )
    olive = await clients.join(room, "olive", public_room=False)
    mona = await clients.join(room, "mona", public_room=False)
    mel = await clients.join(room, "mel", public_room=False)
    owner_says = await said(olive, "from the owner", mona, mel)
    mel_says = await said(mel, "from a member", olive, mona)
    await mel.send({"type": "delete", "message_id": owner_says["message_id"]})
    await mel.expect_error("NOT_ALLOWED")
    await mona.send({"type": "edit", "message_id": mel_says["message_id"], "content": "edited"})
    await mona.expect_error("NOT_ALLOWED")  # moderators delete, they do not rewrite
    await mona.send({"type": "delete", "message_id": mel_says["message_id"]})
    for client in (olive, mona, mel):
        deleted = await client.recv_type("message_deleted")
        assert (deleted["message_id"], deleted["deleted_by"]) == (mel_says["message_id"], "mona")


async def test_a_message_of_another_room_is_not_found_there(clients):
    """The id of a message in a room the user cannot read tells nothing: not found, as for
    an id that does not exist."""
    secret_room = await database_sync_to_async(private_room)("olive")
    olive = await clients.join(secret_room, "olive", public_room=False)
    secret = await said(olive, "private")
    mallory = await clients.join("lobby", "mallory")
    for frame in (
        {"type": "edit", "message_id": secret["message_id"], "content": "pwned"},
        {"type": "delete", "message_id": secret["message_id"]},
        {"type": "delete", "message_id": 10**9},
    ):
        await mallory.send(frame)
        error = await mallory.expect_error("MESSAGE_NOT_FOUND")
        assert error["details"] is None
    stored = await database_sync_to_async(ChatMessage.objects.get)(pk=secret["message_id"])
    assert stored.content == "private"


async def test_a_member_removed_meanwhile_cannot_change_what_they_wrote(clients):
    room = await database_sync_to_async(private_room)("olive", "mel")
    mel = await clients.join(room, "mel", public_room=False)
    sent = await said(mel, "before removal")
    # Removed behind the socket's back (the API would also close it): the rule still says no.
    await database_sync_to_async(RoomMember.objects.filter(room_id=room, user_id="mel").delete)()
    await mel.send({"type": "delete", "message_id": sent["message_id"]})
    await mel.expect_refusal("ROOM_FORBIDDEN", 4004)
    stored = await database_sync_to_async(ChatMessage.objects.get)(pk=sent["message_id"])
    assert stored.deleted_at is None


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "edit", "message_id": 1},
        {"type": "edit", "message_id": 1, "content": "   "},
        {"type": "edit", "message_id": 1, "content": "x" * 2001},
        {"type": "edit", "message_id": "abc", "content": "x"},
        {"type": "delete"},
        {"type": "delete", "message_id": 0},
    ],
)
async def test_a_malformed_change_is_a_parse_error(clients, frame):
    alice = await clients.join("lobby", "alice")
    await said(alice, "something")
    await alice.send(frame)
    await alice.expect_error("MESSAGE_PARSE_ERROR")
