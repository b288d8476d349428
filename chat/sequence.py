"""Room sequence numbers (protocol §15): every room event — a message stored, edited or
deleted — takes the next seq of its room: 1, 2, 3... with no gaps, across workers.

A room's `last_seq` is a counter on its row, moved by one UPDATE inside the transaction
that stores the event. The UPDATE locks the row until that transaction commits, so events of
one room are numbered in the order they commit and a transaction that rolls back takes its
seqs back with it: no gaps, no seq twice. (PostgreSQL: a row lock; SQLite: the database's
write lock.) Events of different rooms never wait for each other.
"""

from __future__ import annotations

from django.db import connection

from chat.models import ChatMessage, Room


class RoomGone(Exception):
    """The room was deleted meanwhile: nothing can be stored in it."""


def _move(*, room_id: str, by: int) -> int:
    if not connection.in_atomic_block:
        raise RuntimeError("seqs are taken inside the transaction that stores their events")
    table = connection.ops.quote_name(Room._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET last_seq = last_seq + %s WHERE name = %s RETURNING last_seq",
            [by, room_id],
        )
        row = cursor.fetchone()
    if row is None:
        raise RoomGone(room_id)
    return row[0]


def seqs_take(*, room_id: str, count: int) -> int:
    """Take the room's next `count` seqs (locking its row until the caller's transaction
    ends); the first of them."""
    return _move(room_id=room_id, by=count) - count + 1


def seqs_give_back(*, room_id: str, count: int) -> None:
    """Give back the last `count` seqs this transaction took (it holds the room's row, so
    nobody took any since): they were not needed after all."""
    if count:
        _move(room_id=room_id, by=-count)


def room_last_seq(*, room_id: str) -> int:
    """The seq of the room's latest event (0 before any)."""
    return Room.objects.filter(pk=room_id).values_list("last_seq", flat=True).first() or 0


def deletions_number(*, rows: list[tuple[int, str]]) -> None:
    """Messages about to be deleted (`(id, room_id)`, oldest first), each a room event:
    each takes its room's next seq as its latest (inside the deleting transaction)."""
    by_room: dict[str, list[int]] = {}
    for message_id, room_id in rows:
        by_room.setdefault(room_id, []).append(message_id)
    for room_id, ids in sorted(by_room.items()):
        first = seqs_take(room_id=room_id, count=len(ids))
        numbered = [ChatMessage(pk=pk, latest_seq=first + n) for n, pk in enumerate(ids)]
        ChatMessage.objects.bulk_update(numbered, ["latest_seq"])
