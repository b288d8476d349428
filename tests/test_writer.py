"""Batched message storage (chat/writer.py): every message stored once, in arrival order,
its frame as history gives it; one bad message does not fail the others."""

from __future__ import annotations

import asyncio

import pytest
from channels.db import database_sync_to_async
from django.db import connection, reset_queries

from chat.history import messages_page
from chat.models import Room
from chat.writer import MessageWriter

pytestmark = pytest.mark.django_db(transaction=True)


def fields(n: int, room_id: str = "lobby") -> dict:
    return {
        "room_id": room_id,
        "user_id": f"user{n % 3}",
        "username": f"User {n % 3}",
        "content": f"message {n}",
        "metadata": {"n": n} if n % 2 else None,
        "client_message_id": f"c{n}",
    }


async def test_concurrent_messages_are_stored_in_few_transactions_in_arrival_order():
    await database_sync_to_async(Room.objects.create)(name="lobby")
    writer = MessageWriter()

    def insert_statements(*, reset: bool = False) -> int:
        """INSERTs logged on the database thread's connection (DEBUG is on in tests)."""
        if reset:
            reset_queries()
        return sum('INSERT INTO "chat_chatmessage"' in q["sql"] for q in connection.queries)

    await database_sync_to_async(insert_statements)(reset=True)
    stored = await asyncio.gather(*(writer.store(**fields(n)) for n in range(60)))
    assert await database_sync_to_async(insert_statements)() < 60  # batched
    frames = [one.frame for one in stored]
    assert [frame["seq"] for frame in frames] == list(range(1, 61))  # in arrival order
    ids = [int(frame["message_id"]) for frame in frames]
    assert ids == sorted(ids) and len(set(ids)) == 60
    assert [frame["content"] for frame in frames] == [f"message {n}" for n in range(60)]

    history, _ = await database_sync_to_async(messages_page)(
        room_id="lobby", limit=100, max_bytes=1_000_000
    )
    assert history == frames


async def test_a_bad_message_fails_alone():
    await database_sync_to_async(Room.objects.create)(name="lobby")
    writer = MessageWriter()
    bad = fields(1) | {"room_id": "no-such-room"}  # violates the room foreign key
    results = await asyncio.gather(
        writer.store(**fields(0)),
        writer.store(**fields(2)),
        writer.store(**bad),
        writer.store(**fields(3)),
        return_exceptions=True,
    )
    assert isinstance(results[2], Exception)
    assert [r.frame["content"] for i, r in enumerate(results) if i != 2] == [
        "message 0",
        "message 2",
        "message 3",
    ]


async def test_a_lone_message_is_two_statements_in_one_transaction():
    """Under light load every batch is one message: its seq taken (chat.sequence) and its
    row inserted, in one transaction (a message with a client id costs one lookup more:
    idempotent send)."""
    await database_sync_to_async(Room.objects.create)(name="lobby")
    writer = MessageWriter()

    def statements(*, reset: bool = False) -> list[str]:
        if reset:
            reset_queries()
        return [q["sql"].split()[0] for q in connection.queries]

    await database_sync_to_async(statements)(reset=True)
    frame = (await writer.store(**fields(1) | {"client_message_id": None})).frame
    made = [s for s in await database_sync_to_async(statements)() if s not in {"BEGIN", "COMMIT"}]
    assert made == ["UPDATE", "INSERT"]
    history, _ = await database_sync_to_async(messages_page)(
        room_id="lobby", limit=10, max_bytes=1_000_000
    )
    assert history == [frame]
