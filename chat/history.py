"""Stored chat messages: writing them, paging them, and their wire form."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.db import connection, transaction

from chat.models import ChatMessage
from chat.protocol import MessageType, encode, frame, iso
from chat.sequence import seqs_give_back, seqs_take


@dataclass(frozen=True)
class Stored:
    """A message as stored: its `message` frame, and whether this call stored it (`new`) or
    found the same user's message with the same client id already in the room (idempotent
    send, protocol §15: not stored again)."""

    frame: dict[str, Any]
    new: bool


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
    fields = {"room_id": room_id, "user_id": user_id, "username": username, "content": content}
    fields |= {"metadata": metadata, "client_message_id": client_message_id}
    return messages_store(messages=[fields])[0].frame


def messages_store(*, messages: list[dict[str, Any]]) -> list[Stored]:
    """Store several chat messages in one transaction, in order, each taking the next seq of
    its room (chat.sequence). A message whose client id its user already sent in its room
    (before, or earlier in this batch) is not stored again: its Stored is the earlier one's.
    RoomGone if a room was deleted meanwhile (nothing is stored)."""
    rows: list[ChatMessage | None] = [None] * len(messages)
    new = [False] * len(messages)
    with transaction.atomic():
        for room_id, indexes in _by_room(messages).items():
            first = seqs_take(room_id=room_id, count=len(indexes))  # the room is ours now
            earlier = _sent_before(room_id=room_id, batch=[messages[i] for i in indexes])
            fresh: list[ChatMessage] = []
            for i in indexes:
                key = (messages[i]["user_id"], messages[i]["client_message_id"])
                if key in earlier:
                    rows[i] = earlier[key]
                    continue
                row = ChatMessage(**messages[i], seq=first + len(fresh))
                row.latest_seq = row.seq
                fresh.append(row)
                rows[i], new[i] = row, True
                if key[1] is not None:
                    earlier[key] = row
            seqs_give_back(room_id=room_id, count=len(indexes) - len(fresh))
            _rows_insert(fresh)
    return [Stored(message_frame(row), is_new) for row, is_new in zip(rows, new, strict=True)]


def _by_room(messages: list[dict[str, Any]]) -> dict[str, list[int]]:
    rooms: dict[str, list[int]] = {}
    for i, fields in enumerate(messages):
        rooms.setdefault(fields["room_id"], []).append(i)
    return rooms


def _sent_before(
    *, room_id: str, batch: list[dict[str, Any]]
) -> dict[tuple[str, str], ChatMessage]:
    """The room's stored messages whose (user, client id) is one of `batch`'s. Read while the
    caller holds the room (chat.sequence): no other transaction can store one meanwhile.
    One indexed SELECT of ids (on every message that has a client id, so the ORM's cost of
    building a query is not paid); the rows themselves only for a repeat."""
    client_ids = {fields["client_message_id"] for fields in batch} - {None}
    if not client_ids:
        return {}
    users = {fields["user_id"] for fields in batch if fields["client_message_id"] is not None}
    quote = connection.ops.quote_name
    marks = ", ".join(["%s"] * len(client_ids))
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {quote('id')}, {quote('user_id')}, {quote('client_message_id')}"
            f" FROM {quote(ChatMessage._meta.db_table)}"
            f" WHERE {quote('room_id')} = %s AND {quote('client_message_id')} IN ({marks})"
            f" ORDER BY {quote('id')}",
            [room_id, *client_ids],
        )
        found = [row for row in cursor.fetchall() if row[1] in users]
    if not found:
        return {}
    rows = ChatMessage.objects.in_bulk([pk for pk, _, _ in found])
    earlier: dict[tuple[str, str], ChatMessage] = {}
    for pk, user_id, client_id in found:
        earlier.setdefault((user_id, client_id), rows[pk])
    return earlier


# Every column of a stored message but its id, in the model's order.
_INSERTED = [field for field in ChatMessage._meta.concrete_fields if not field.primary_key]


def _rows_insert(rows: list[ChatMessage]) -> None:
    """Insert new messages (setting their ids): what `bulk_create` does, as one
    `INSERT ... RETURNING` written once, without the ORM's cost of building the statement on
    every call (it was most of a stored message's CPU). Values are prepared by the fields
    themselves, so each backend gets them as the ORM would send them."""
    if not rows:
        return
    quote = connection.ops.quote_name
    columns = ", ".join(quote(field.column) for field in _INSERTED)
    one = "(" + ", ".join(["%s"] * len(_INSERTED)) + ")"
    params = [
        field.get_db_prep_save(field.pre_save(row, add=True), connection)
        for row in rows
        for field in _INSERTED
    ]
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {quote(ChatMessage._meta.db_table)} ({columns})"
            f" VALUES {', '.join([one] * len(rows))} RETURNING {quote('id')}",
            params,
        )
        ids = [pk for (pk,) in cursor.fetchall()]
    for row, pk in zip(rows, ids, strict=True):
        row.pk = pk
        row._state.adding = False


def message_frame(message: ChatMessage) -> dict[str, Any]:
    """The `message` frame of a stored message; its timestamp is when it was stored. An
    edited message shows its current content and `metadata.edited_at`; a deleted one keeps
    its place with `content: null` and only `metadata.deleted_at` (protocol §12). `seq` is the
    room's seq when it was stored; `changed_seq` the seq of its latest edit or deletion, null
    if it has none (protocol §15)."""
    content: str | None = message.content
    metadata = message.metadata
    if message.deleted_at is not None:
        content, metadata = None, {"deleted_at": iso(message.deleted_at)}
    elif message.edited_at is not None:
        metadata = {**(metadata or {}), "edited_at": iso(message.edited_at)}
    payload = frame(
        MessageType.MESSAGE,
        message_id=str(message.pk),
        content=content,
        user_id=message.user_id,
        username=message.username,
        metadata=metadata,
        client_message_id=message.client_message_id,
        room_id=message.room_id,
        seq=message.seq,
        changed_seq=message.latest_seq if message.latest_seq != message.seq else None,
    )
    payload["timestamp"] = iso(message.created_at)
    return payload


def messages_page(
    *,
    room_id: str,
    limit: int,
    before: int | None = None,
    after: int | None = None,
    before_seq: int | None = None,
    after_seq: int | None = None,
    max_bytes: int,
) -> tuple[list[dict[str, Any]], bool]:
    """Up to `limit` message frames, oldest first, and whether more lie beyond the page.

    Default, `before` (a message id) and `before_seq`: the newest messages (older than the
    bound); `after` (a message id): the oldest messages newer than it (catching up after a
    reconnect); `after_seq`: every message stored **or changed** after that seq, in its
    current state, in the order of its latest seq (`changed_seq`, else `seq`: the next page
    starts after the last entry's). At most `max_bytes` of encoded messages (fewer
    messages, and `has_more`, if they would not fit).
    """
    messages = ChatMessage.objects.filter(room_id=room_id)
    if after is not None or after_seq is not None:
        if after_seq is not None:
            newer = messages.filter(latest_seq__gt=after_seq).order_by("latest_seq")
        else:
            newer = messages.filter(id__gt=after).order_by("id")
        page = list(newer[: limit + 1])
        has_more = len(page) > limit
        page = page[:limit]
    elif before is None and before_seq is None:
        return newest_pages(room_ids=[room_id], limit=limit, max_bytes=max_bytes)[room_id]
    else:
        if before is not None:
            messages = messages.filter(id__lt=before)
        if before_seq is not None:
            messages = messages.filter(seq__lt=before_seq)
        page = list(messages.order_by("-id")[: limit + 1])
        has_more = len(page) > limit
        page = page[:limit][::-1]
    frames = [message_frame(message) for message in page]
    newest_last = after is None and after_seq is None
    return fit_page(frames, has_more, max_bytes=max_bytes, keep_newest=newest_last)


# Rooms per statement of `newest_pages` (SQLite allows 500 terms in a compound SELECT).
NEWEST_PAGES_ROOMS = 200


def newest_pages(
    *, room_ids: list[str], limit: int, max_bytes: int
) -> dict[str, tuple[list[dict[str, Any]], bool]]:
    """`messages_page`'s default page (the newest `limit` messages, oldest first, and
    whether older ones exist) of each room, read in one statement for up to
    NEWEST_PAGES_ROOMS rooms (a batch of joins reads hundreds: one query per room was most
    of its database time). Each room's part is its own `ORDER BY id DESC LIMIT` on the
    (room, id) index, so a long history is never scanned."""
    table = ChatMessage._meta.db_table
    quote = connection.ops.quote_name
    part = (
        f"SELECT * FROM (SELECT * FROM {quote(table)} WHERE {quote('room_id')} = %s"
        f" ORDER BY {quote('id')} DESC LIMIT %s) AS {quote('page')}"
    )
    found: dict[str, list[ChatMessage]] = {room_id: [] for room_id in room_ids}
    rooms = list(found)
    for start in range(0, len(rooms), NEWEST_PAGES_ROOMS):
        chunk = rooms[start : start + NEWEST_PAGES_ROOMS]
        sql = " UNION ALL ".join([part] * len(chunk))
        for row in ChatMessage.objects.raw(sql, [v for r in chunk for v in (r, limit + 1)]):
            found[row.room_id].append(row)
    pages = {}
    for room_id, rows in found.items():
        rows.sort(key=lambda row: row.pk, reverse=True)  # (UNION ALL keeps no order)
        frames = [message_frame(message) for message in rows[:limit][::-1]]
        pages[room_id] = fit_page(frames, len(rows) > limit, max_bytes=max_bytes, keep_newest=True)
    return pages


# Room for the history frame's own fields around its messages (room id, request id, ...).
HISTORY_ENVELOPE_BYTES = 1024


def fit_page(
    frames: list[dict[str, Any]], has_more: bool, *, max_bytes: int, keep_newest: bool
) -> tuple[list[dict[str, Any]], bool]:
    """Drop messages from the far end of a page until the history frame fits in `max_bytes`
    (the largest WebSocket message the server sends; beyond it the socket would close
    1011). The dropped ones are still there to page to: `has_more` becomes true."""
    budget = max_bytes - HISTORY_ENVELOPE_BYTES
    if len(encode(frames).encode()) <= budget:
        return frames, has_more
    sizes = [len(encode(message).encode()) + 1 for message in frames]
    kept = list(zip(frames, sizes, strict=True))
    total = sum(sizes)
    while kept and total > budget:
        _, size = kept.pop(0 if keep_newest else -1)
        total -= size
    return [message for message, _ in kept], True
