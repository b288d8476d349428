"""Room ids, their channel-layer groups, and who may join which room."""

from __future__ import annotations

import hashlib
import re
import time
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

from chat.batching import TurnBatcher
from chat.protocol import ROOM_ID_RE, Close, MessageType, encode, frame


def room_group(room_id: str) -> str:
    """The channel-layer group of a room (room ids are valid group-name characters)."""
    return f"room.{room_id}"


def user_group(user_id: str) -> str:
    """The group of all of one user's sockets (uids may hold characters group names can't)."""
    return "user." + hashlib.sha256(user_id.encode()).hexdigest()[:40]


def worker_group(worker_id: str) -> str:
    """The group of one worker's sockets (told to close when it shuts down)."""
    return "worker." + re.sub(r"[^A-Za-z0-9_.-]", "-", worker_id)


def room_id_problem(*, room_id: str) -> Close | None:
    """INVALID_ROOM if this is no room id at all; who may open a valid one is chat.access's
    question (asked when the session opens)."""
    return None if ROOM_ID_RE.fullmatch(room_id) else Close.INVALID_ROOM


def room_event(*payloads: dict[str, Any], exclude_user: str | None = None) -> dict[str, Any]:
    """A channel-layer message delivering frames to a room, in order: encoded once, by the
    sender; frames that go together (a join's notices) travel as one message. Each frame
    says whose sockets it skips (`exclude_user`), so events can be joined (`room_events_join`)."""
    return {
        "type": "chat.frame",
        # (text, frame type for metrics without decoding the text, error code or None,
        #  the user whose sockets skip it or None)
        "frames": [(encode(p), p["type"], p.get("error_code"), exclude_user) for p in payloads],
        "sent_at": time.time(),  # for the delivery delay (chat.overload)
    }


def room_events_join(events: list[dict[str, Any]]) -> dict[str, Any]:
    """One event delivering the frames of several room events, in order (the first's
    `sent_at`): one delivery per socket instead of one per event."""
    first, *rest = events
    if not rest:
        return first
    return {**first, "frames": [item for event in events for item in event["frames"]]}


class GroupEvents(TurnBatcher[tuple[Any, str], dict[str, Any], None]):
    """This worker's events to channel-layer groups (one per event loop): those to one group
    in one event-loop turn go as one event (`room_events_join`, order kept), on the next
    turn — one delivery per socket instead of one per event: the join and leave notices of
    a room whose members rejoin together (chat.joins). Each caller gets the outcome of that
    one `group_send`."""

    def __init__(self) -> None:
        async def run(key: tuple[Any, str], events: list[dict[str, Any]]) -> list[None]:
            layer, group = key
            await layer.group_send(group, room_events_join(events))
            return [None] * len(events)

        super().__init__(run=run)

    async def send(self, *, layer: Any, group: str, event: dict[str, Any]) -> None:
        await self.submit((layer, group), event)


def membership_notice(*, user_id: str, username: str, joined: bool) -> dict[str, Any]:
    """What the room's other members get on a user's first socket in / last socket out."""
    verb = "joined" if joined else "left"
    return room_event(
        frame(MessageType.SYSTEM, content=f"{username} {verb} the chat", level="info"),
        frame(
            MessageType.USER_JOINED if joined else MessageType.USER_LEFT,
            user_id=user_id,
            username=username,
            status="online" if joined else "offline",
        ),
        exclude_user=user_id,
    )


def room_saved(sender: type, *, instance: Any, created: bool, **kwargs: Any) -> None:
    """post_save of a Room (the admin): tell its open sockets, on every worker, once the
    change is committed. Sockets read the room's settings when they join and keep them."""
    if created:
        return

    def notify() -> None:
        event = {
            "type": "room.settings",
            "assistant_mode": instance.assistant_mode,
            "kind": instance.kind,
        }
        async_to_sync(get_channel_layer().group_send)(room_group(instance.pk), event)

    transaction.on_commit(notify)
