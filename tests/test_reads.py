"""History requests in batches (chat/reads.py): each request is asked of the one rule in the
same database call as its read, whoever else is in the batch, and requests for the same
page share one read."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from chat.access import Refused
from chat.history import message_store
from chat.models import Role, Room, RoomKind, RoomMember
from chat.reads import PageRequest, pages_read

pytestmark = pytest.mark.django_db


def store(room_id: str, content: str) -> None:
    message_store(
        room_id=room_id,
        user_id="bob",
        username="Bob",
        content=content,
        metadata=None,
        client_message_id=None,
    )


def ask(user_id: str, room_id: str, **bounds) -> PageRequest:
    return PageRequest(user_id=user_id, room_id=room_id, limit=10, max_bytes=65536, **bounds)


def test_a_hostile_request_in_a_batch_reads_nothing_and_the_others_their_pages():
    Room.objects.create(name="lobby", kind=RoomKind.PUBLIC)
    Room.objects.create(name="secret", kind=RoomKind.PRIVATE)
    RoomMember.objects.create(room_id="secret", user_id="bob", role=Role.OWNER)
    RoomMember.objects.create(room_id="lobby", user_id="alice", role=Role.MEMBER)
    store("lobby", "hello")
    store("secret", "for bob only")
    outcomes = pages_read(
        requests=[
            ask("alice", "lobby", after_seq=0),
            ask("mallory", "secret", after_seq=0),  # not a member
            ask("mallory", "nowhere", after_seq=0),  # no such room: the same refusal
            ask("bob", "secret", after_seq=0),
        ]
    )
    assert [m["content"] for m in outcomes[0][0]] == ["hello"]
    assert isinstance(outcomes[1], Refused) and isinstance(outcomes[2], Refused)
    assert str(outcomes[1]) == str(outcomes[2])
    assert [m["content"] for m in outcomes[3][0]] == ["for bob only"]


def test_requests_for_the_same_page_share_one_read():
    Room.objects.create(name="lobby", kind=RoomKind.PUBLIC)
    for n in range(3):
        store("lobby", f"m{n}")
    for n in range(20):
        RoomMember.objects.create(room_id="lobby", user_id=f"user{n}", role=Role.MEMBER)
    one = [ask(f"user{n}", "lobby", after_seq=1) for n in range(20)]
    with CaptureQueriesContext(connection) as alone:
        pages_read(requests=one[:1])
    with CaptureQueriesContext(connection) as together:
        outcomes = pages_read(requests=one)
    assert len(together.captured_queries) == len(alone.captured_queries)
    assert all(page == outcomes[0] for page in outcomes)
    assert [m["content"] for m in outcomes[0][0]] == ["m1", "m2"]
