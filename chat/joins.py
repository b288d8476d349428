"""Socket joins (and leaves) in batches (protocol §4, §11): the joins that arrive together
share their database work, and so do the sessions that end together.

A join is two database calls, each batched per worker (chat.batching) with the other
sockets joining at the same time:

1. `sessions_open` (chat.sessions): every socket's session, in one transaction, each asked
   of the one rule (chat.access) and counted against the per-user cap under its user's
   lock, exactly as if it were alone.
2. `rooms_view` (here), once the socket is in its room's group: the room's presence and its
   history on join, read once per room for every socket of the batch in that room, each
   socket asked of the rule again (the user may have been removed since step 1). Reading
   after joining the group is what makes it gap-free: a message stored meanwhile is either
   in the page or delivered live (or both: clients keep one copy per seq).

In a reconnect storm a batch holds hundreds of joins: one thread round trip, one commit,
and one presence and history query per room instead of per socket. When a worker restarts,
its thousands of sockets close at once: `SessionCloser` ends them in batches too
(`sessions_close`), within the shutdown's grace.

The room is told of each join and leave (`system` + `user_joined` / `user_left`, skipping
the user's own sockets): `chat.rooms.GroupEvents` sends the notices of one event-loop turn
as one channel-layer event per room, so a room whose members rejoin together gets one delivery
per socket, not one per member who joined.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from chat.access import Action, Ask, Refused, rooms_authorize
from chat.batching import Batcher
from chat.history import newest_pages
from chat.sessions import (
    SessionClosed,
    SessionEnd,
    SessionOpened,
    SessionRequest,
    rooms_presence,
    sessions_close,
    sessions_open,
)


@dataclass(frozen=True)
class ViewRequest:
    """A socket that has joined its room's group asks what it sees on joining."""

    user_id: str
    room_id: str
    history_limit: int
    history_max_bytes: int


@dataclass(frozen=True)
class RoomView:
    presence: list[dict[str, Any]]
    history: list[dict[str, Any]]
    has_more: bool


def rooms_view(*, requests: list[ViewRequest]) -> list[RoomView | Refused]:
    """For each request, in order, its room's presence and newest history page, or the
    rule's refusal: presence in one query for every room of the batch, history in one per
    page size (chat.history.newest_pages). Blocking (database)."""
    answers = rooms_authorize(
        asks=[Ask(user_id=r.user_id, room_id=r.room_id, action=Action.READ) for r in requests]
    )
    admitted = [
        request
        for request, answer in zip(requests, answers, strict=True)
        if not isinstance(answer, Refused)
    ]
    presence = rooms_presence(room_ids=list(dict.fromkeys(r.room_id for r in admitted)))
    sizes: dict[tuple[int, int], list[str]] = {}
    for request in admitted:
        sizes.setdefault((request.history_limit, request.history_max_bytes), []).append(
            request.room_id
        )
    views = {  # one per room and page size, shared by its requests
        (room_id, *size): RoomView(presence=presence[room_id], history=history, has_more=more)
        for size, room_ids in sizes.items()
        for room_id, (history, more) in newest_pages(
            room_ids=list(dict.fromkeys(room_ids)), limit=size[0], max_bytes=size[1]
        ).items()
    }
    return [
        answer
        if isinstance(answer, Refused)
        else views[(request.room_id, request.history_limit, request.history_max_bytes)]
        for request, answer in zip(requests, answers, strict=True)
    ]


class SessionOpener(Batcher[SessionRequest, SessionOpened]):
    """This worker's session opens, batched (one per event loop). `limits` gives the
    current (max_connections, open_rooms) settings."""

    def __init__(
        self, *, worker_id: str, limits: Callable[[], tuple[int, bool]], max_batch: int = 500
    ) -> None:
        def run(batch: list[SessionRequest]) -> list[SessionOpened | Exception]:
            max_connections, open_rooms = limits()
            return sessions_open(
                requests=batch,
                worker_id=worker_id,
                max_connections=max_connections,
                open_rooms=open_rooms,
            )

        super().__init__(run=run, what="session open", max_batch=max_batch)

    async def open(self, request: SessionRequest) -> SessionOpened:
        """The socket's session; raises SessionRefused."""
        return await self.submit(request)


class RoomViewer(Batcher[ViewRequest, RoomView]):
    """This worker's join views, batched (one per event loop)."""

    def __init__(self, *, max_batch: int = 500) -> None:
        super().__init__(
            run=lambda batch: rooms_view(requests=batch), what="room view", max_batch=max_batch
        )

    async def view(self, request: ViewRequest) -> RoomView:
        """The room as the socket sees it on joining; raises Refused."""
        return await self.submit(request)


class SessionCloser(Batcher[SessionEnd, SessionClosed | None]):
    """This worker's session ends, batched (one per event loop)."""

    def __init__(self, *, max_batch: int = 500) -> None:
        super().__init__(
            run=lambda batch: sessions_close(ends=batch), what="session close", max_batch=max_batch
        )

    async def close(self, end: SessionEnd) -> SessionClosed | None:
        """What ended, or None if the session had already ended."""
        return await self.submit(end)
