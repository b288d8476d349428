"""Read positions (protocol §12, `read`): how far each member has read their room, stored on
their membership (`RoomMember.last_read_seq`), batched per worker (chat.batching).

A socket's `read` frames are coalesced on the socket (the consumer keeps the highest seq
asked and has at most one mark in flight); the worker's marks are written together, each
asked of the one rule (chat.access) in the same call. A position never moves back and never
passes the room's last seq (a client cannot mark messages not sent yet as read). Only a
mark that moved the position is reported as `advanced`, once per member and batch: that is
what the room, or the user's other sockets, are told (`read_frame`).
"""

from __future__ import annotations

from dataclasses import dataclass

from chat.access import Action, Ask, Refused, rooms_authorize
from chat.batching import Batcher
from chat.models import RoomKind, RoomMember
from chat.protocol import MessageType, frame
from chat.rows import rows_update


@dataclass(frozen=True)
class ReadMark:
    """A member says they have read their room up to `seq`."""

    user_id: str
    room_id: str
    seq: int


@dataclass(frozen=True)
class ReadMarked:
    """The member's read position once the mark is stored; `advanced`: this mark moved it
    (its receipt is to be sent)."""

    seq: int
    advanced: bool


def reads_mark(*, marks: list[ReadMark]) -> list[ReadMarked | Refused]:
    """For each mark, in order, the member's read position after the batch, or the rule's
    refusal (the user may have been removed since the socket joined). Blocking (database).

    Two queries (the rule's: rooms and memberships) and, if any position moves, one UPDATE
    that only raises positions: a mark stored at the same time by another worker, ahead of
    this one, is not undone (both are reported; clients keep the highest)."""
    if not marks:
        return []
    answers = rooms_authorize(
        asks=[Ask(user_id=m.user_id, room_id=m.room_id, action=Action.READ) for m in marks]
    )
    members: dict[tuple[str, str], RoomMember] = {}
    wanted: dict[tuple[str, str], int] = {}  # (room, user) -> the highest seq asked, capped
    last_of: dict[tuple[str, str], int] = {}  # (room, user) -> the index of its last mark
    for index, (mark, answer) in enumerate(zip(marks, answers, strict=True)):
        if isinstance(answer, Refused):
            continue
        room, member = answer
        if member is None:
            continue  # (the rule let in a user with no membership: nothing to store)
        place = (mark.room_id, mark.user_id)
        # Never past the room's last event.
        wanted[place] = max(wanted.get(place, 0), min(mark.seq, room.last_seq))
        members[place] = member
        last_of[place] = index
    moved: list[RoomMember] = []
    for place, seq in wanted.items():
        member = members[place]
        if member.last_read_seq is None or seq > member.last_read_seq:
            member.last_read_seq = seq
            moved.append(member)
    rows_update(rows=moved, fields=["last_read_seq"], raise_only=True)
    advanced = {(member.room_id, member.user_id) for member in moved}
    outcomes: list[ReadMarked | Refused] = []
    for index, (mark, answer) in enumerate(zip(marks, answers, strict=True)):
        if isinstance(answer, Refused):
            outcomes.append(answer)
            continue
        place = (mark.room_id, mark.user_id)
        member = members.get(place)
        outcomes.append(
            ReadMarked(
                seq=(member.last_read_seq or 0) if member is not None else 0,
                advanced=place in advanced and last_of[place] == index,
            )
        )
    return outcomes


class ReadMarker(Batcher[ReadMark, ReadMarked]):
    """This worker's read marks, batched (one per event loop)."""

    def __init__(self, *, max_batch: int = 500) -> None:
        super().__init__(
            run=lambda batch: reads_mark(marks=batch), what="read mark", max_batch=max_batch
        )

    async def mark(self, mark: ReadMark) -> ReadMarked:
        """The member's read position after this mark; raises Refused."""
        return await self.submit(mark)


def read_frame(*, room_id: str, user_id: str, seq: int) -> dict:
    """A receipt: `user_id` has read `room_id` up to `seq`."""
    return frame(MessageType.READ, room_id=room_id, user_id=user_id, seq=seq)


def receipts_to_room(kind: str) -> bool:
    """Whether a room of this kind hears its members' receipts (private and direct rooms);
    in the others only the reader's own sockets do (protocol §12)."""
    return kind in (RoomKind.PRIVATE, RoomKind.DIRECT)
