"""History pages asked for on open sockets (`history`, protocol §4, §15), batched per worker
(chat.batching): the requests that arrive while the previous batch is in the database thread
are read together, each asked of the one rule (chat.access) in the same call, and requests
for the same page share one read.

After a worker restart every rejoining client asks for what it missed (`history`
`after_seq`), most of a room's members from the same seq: one thread round trip and one
query per request was a large part of the rejoining worker's database thread.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass
from typing import Any

from chat.access import Action, Ask, Refused, rooms_authorize
from chat.batching import Batcher
from chat.history import messages_page

Page = tuple[list[dict[str, Any]], bool]


@dataclass(frozen=True)
class PageRequest:
    """One socket's `history` request (the bounds as `messages_page` takes them)."""

    user_id: str
    room_id: str
    limit: int
    max_bytes: int
    before: int | None = None
    after: int | None = None
    before_seq: int | None = None
    after_seq: int | None = None

    def page_key(self) -> tuple:
        """What the page depends on: everything but who asks."""
        return astuple(self)[1:]


def pages_read(*, requests: list[PageRequest]) -> list[Page | Refused]:
    """For each request, in order, its page or the rule's refusal (the user may have been
    removed since the socket joined, even a moment ago). Blocking (database)."""
    answers = rooms_authorize(
        asks=[Ask(user_id=r.user_id, room_id=r.room_id, action=Action.READ) for r in requests]
    )
    pages: dict[tuple, Page] = {}
    outcomes: list[Page | Refused] = []
    for request, answer in zip(requests, answers, strict=True):
        if isinstance(answer, Refused):
            outcomes.append(answer)
            continue
        key = request.page_key()
        if key not in pages:
            pages[key] = messages_page(
                room_id=request.room_id,
                limit=request.limit,
                before=request.before,
                after=request.after,
                before_seq=request.before_seq,
                after_seq=request.after_seq,
                max_bytes=request.max_bytes,
            )
        outcomes.append(pages[key])
    return outcomes


class HistoryReader(Batcher[PageRequest, Page]):
    """This worker's history requests, batched (one per event loop)."""

    def __init__(self, *, max_batch: int = 500) -> None:
        super().__init__(
            run=lambda batch: pages_read(requests=batch), what="history page", max_batch=max_batch
        )

    async def read(self, request: PageRequest) -> Page:
        """The page; raises Refused."""
        return await self.submit(request)
