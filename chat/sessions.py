"""Sessions and presence, kept in the database so every worker sees the same state.

One `ChatSession` row per socket. The user's `ChatUser` row is locked while a session opens
or closes, which makes the per-user connection cap and "first socket in / last socket out"
exact even when a user's sockets are on different workers.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import datetime

from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.db import transaction
from django.db.models import Count, Max, Min
from django.utils import timezone

from chat.access import Action, Refused, room_authorize
from chat.auth import Identity
from chat.models import ChatSession, ChatUser, Endpoint, Role, Room, RoomKind, RoomMember
from chat.protocol import HEALTH_ROOM_PREFIX, Close, iso


class SessionRefused(Exception):
    def __init__(self, close: Close):
        super().__init__(close.name)
        self.close = close


@dataclass(frozen=True)
class SessionOpened:
    session_id: str
    connected_at: datetime
    first_in_room: bool
    # The room's assistant mode as stored (empty: the default for its kind).
    room_assistant_mode: str
    room_kind: str
    # The seq of the room's latest event as the session opened (protocol §15).
    room_last_seq: int


@dataclass(frozen=True)
class SessionClosed:
    user_id: str
    username: str
    room_id: str
    last_in_room: bool


def user_lock(*, user_id: str, username: str) -> ChatUser:
    """Lock the user's row (created if new) until the transaction ends: whatever opens,
    closes or revokes this user's sessions holds it, so those decisions are exact."""
    ChatUser.objects.bulk_create(
        [ChatUser(user_id=user_id, username=username)], ignore_conflicts=True
    )
    return ChatUser.objects.select_for_update().get(pk=user_id)


def _room_to_join(*, user_id: str, room_id: str, endpoint: Endpoint, open_rooms: bool) -> Room:
    """The room a socket may open, through the one rule (chat.access); SessionRefused
    ROOM_FORBIDDEN otherwise, the same for a room that does not exist.

    The health-analysis socket's personal room is made on demand for its user; with
    `open_rooms` (CHAT_OPEN_ROOMS) an unknown id is made a public room (v1); joining a public
    room makes the user a member."""
    if endpoint == Endpoint.HEALTH:
        action = Action.ANALYSE
        room, _ = Room.objects.get_or_create(
            name=room_id, defaults={"kind": RoomKind.PERSONAL, "created_by": user_id}
        )
        # The path is the user's own (checked against the token), so the room is theirs even
        # if its row lost its owner (an operator's edit).
        RoomMember.objects.bulk_create(
            [RoomMember(room=room, user_id=user_id, role=Role.OWNER)], ignore_conflicts=True
        )
    else:
        action = Action.JOIN
        if open_rooms and not room_id.startswith(HEALTH_ROOM_PREFIX):
            Room.objects.get_or_create(name=room_id, defaults={"kind": RoomKind.PUBLIC})
    try:
        room, member = room_authorize(user_id=user_id, room_id=room_id, action=action)
    except Refused:
        raise SessionRefused(Close.ROOM_FORBIDDEN) from None
    if member is None:  # a public room: joining makes a member
        RoomMember.objects.bulk_create(
            [RoomMember(room=room, user_id=user_id, role=Role.MEMBER)], ignore_conflicts=True
        )
    return room


def session_open(
    *,
    identity: Identity,
    room_id: str,
    endpoint: Endpoint,
    channel_name: str,
    worker_id: str,
    client_address: str,
    user_agent: str,
    max_connections: int,
    open_rooms: bool,
) -> SessionOpened:
    """Record a new socket, or raise SessionRefused: in this order, the room is forbidden
    (or does not exist), closed, the user has too many sockets, the room is full."""
    with transaction.atomic():
        user = user_lock(user_id=identity.user_id, username=identity.username)
        if user.username != identity.username:
            user.username = identity.username
            user.save(update_fields=["username"])
        room = _room_to_join(
            user_id=identity.user_id, room_id=room_id, endpoint=endpoint, open_rooms=open_rooms
        )
        if room.is_closed:
            raise SessionRefused(Close.ROOM_CLOSED)
        active = ChatSession.objects.filter(disconnected_at__isnull=True)
        if active.filter(user=user).count() >= max_connections:
            raise SessionRefused(Close.TOO_MANY_CONNECTIONS)
        first_in_room = not active.filter(user=user, room=room).exists()
        if first_in_room and room.max_users is not None:
            room = Room.objects.select_for_update().get(pk=room.pk)
            users = active.filter(room=room).values("user").distinct().count()
            if users >= room.max_users:
                raise SessionRefused(Close.ROOM_FULL)
        session = ChatSession.objects.create(
            session_id=uuid.uuid4(),
            user=user,
            username=identity.username,
            room=room,
            endpoint=endpoint,
            channel_name=channel_name,
            worker_id=worker_id,
            client_address=client_address[:64],
            user_agent=user_agent[:512],
        )
    return SessionOpened(
        session_id=str(session.session_id),
        connected_at=session.connected_at,
        first_in_room=first_in_room,
        room_assistant_mode=room.assistant_mode,
        room_kind=room.kind,
        room_last_seq=room.last_seq,
    )


@dataclass(frozen=True)
class SessionLiveness:
    session_id: str
    last_seen: datetime
    # Frames the socket has sent since it opened (a total, so writes may coalesce).
    messages_sent: int


def sessions_touch(*, sessions: list[SessionLiveness]) -> None:
    """Batched liveness of open sessions, in one statement (ended sessions are left as
    `session_close` wrote them)."""
    if not sessions:
        return
    rows = [
        ChatSession(session_id=s.session_id, last_seen=s.last_seen, messages_sent=s.messages_sent)
        for s in sessions
    ]
    ChatSession.objects.filter(disconnected_at__isnull=True).bulk_update(
        rows, ["last_seen", "messages_sent"], batch_size=1000
    )


def session_close(
    *,
    session_id: str,
    close_code: int | None,
    close_reason: str,
    last_seen: datetime,
    messages_sent: int,
) -> SessionClosed | None:
    """End a session; None if it was already ended (e.g. by the reaper)."""
    with transaction.atomic():
        session = ChatSession.objects.select_related("user").filter(session_id=session_id).first()
        if session is None:
            return None
        ChatUser.objects.select_for_update().get(pk=session.user_id)
        ended = ChatSession.objects.filter(
            session_id=session_id, disconnected_at__isnull=True
        ).update(
            disconnected_at=timezone.now(),
            last_seen=last_seen,
            close_code=close_code,
            close_reason=close_reason[:64],
            messages_sent=messages_sent,
        )
        if not ended:
            return None
        still_here = ChatSession.objects.filter(
            user_id=session.user_id, room_id=session.room_id, disconnected_at__isnull=True
        ).exists()
    return SessionClosed(
        user_id=session.user_id,
        username=session.username,
        room_id=session.room_id,
        last_in_room=not still_here,
    )


def room_presence(*, room_id: str) -> list[dict]:
    """Everyone in the room now, one entry per user, across all workers."""
    rows = (
        ChatSession.objects.filter(room_id=room_id, disconnected_at__isnull=True)
        .values("user_id")
        .annotate(
            username=Max("username"),
            connection_count=Count("session_id"),
            connected_at=Min("connected_at"),
            last_seen=Max("last_seen"),
        )
        .order_by("connected_at", "user_id")
    )
    return [
        {
            "user_id": row["user_id"],
            "username": row["username"],
            "connection_count": row["connection_count"],
            "connected_at": iso(row["connected_at"]),
            "last_seen": iso(row["last_seen"]),
        }
        for row in rows
    ]


@dataclass(frozen=True)
class SessionReaped:
    user_id: str
    username: str
    room_id: str
    channel_name: str
    last_in_room: bool


def session_workers() -> set[str]:
    """Workers that own at least one open session."""
    return set(
        ChatSession.objects.filter(disconnected_at__isnull=True)
        .values_list("worker_id", flat=True)
        .distinct()
    )


def sessions_reap(*, worker_id: str) -> list[SessionReaped]:
    """End every open session of a dead worker (reason `worker_lost`).

    Each user's sessions are ended under that user's lock, so when several live workers reap
    the same dead one at once, each session is ended (and each departure reported) once.
    """
    reaped: list[SessionReaped] = []
    open_sessions = ChatSession.objects.filter(worker_id=worker_id, disconnected_at__isnull=True)
    for user_id in set(open_sessions.values_list("user_id", flat=True)):
        with transaction.atomic():
            ChatUser.objects.select_for_update().get(pk=user_id)
            sessions = list(open_sessions.filter(user_id=user_id))
            ChatSession.objects.filter(pk__in=[s.pk for s in sessions]).update(
                disconnected_at=timezone.now(), close_reason="worker_lost"
            )
            still_in = set(
                ChatSession.objects.filter(
                    user_id=user_id, disconnected_at__isnull=True
                ).values_list("room_id", flat=True)
            )
            announced: set[str] = set()
            for session in sessions:
                last = session.room_id not in still_in and session.room_id not in announced
                announced.add(session.room_id)
                reaped.append(
                    SessionReaped(
                        user_id=user_id,
                        username=session.username,
                        room_id=session.room_id,
                        channel_name=session.channel_name,
                        last_in_room=last,
                    )
                )
    return reaped


def session_channels(*, session_ids: list[str]) -> list[str]:
    """Channel names of the given sessions that are still open."""
    return list(
        ChatSession.objects.filter(
            session_id__in=session_ids, disconnected_at__isnull=True
        ).values_list("channel_name", flat=True)
    )


def chat_stats() -> dict:
    """Users, sockets and members per room, across all workers."""
    active = ChatSession.objects.filter(disconnected_at__isnull=True)
    rooms = (
        active.values("room_id").annotate(members=Count("user", distinct=True)).order_by("room_id")
    )
    return {
        "total_users": active.values("user").distinct().count(),
        "total_connections": active.count(),
        "rooms": {row["room_id"]: row["members"] for row in rooms},
    }


def sessions_terminate(*, session_ids: list[str]) -> int:
    """Ask the workers holding these sessions to close them (SESSION_TERMINATED, 4010).

    The message goes to each socket's own channel, so it reaches whichever worker holds it.
    """
    layer = get_channel_layer()
    channels = session_channels(session_ids=session_ids)
    for channel in channels:
        async_to_sync(layer.send)(channel, {"type": "session.terminate"})
    return len(channels)


# How often `sessions_wait_ended` looks whether the sessions have ended.
ENDED_POLL_SECONDS = 0.05


def _sessions_open(*, channels: list[str]) -> int:
    return ChatSession.objects.filter(
        channel_name__in=channels, disconnected_at__isnull=True
    ).count()


async def sessions_wait_ended(*, channels: list[str], timeout: float) -> int:
    """Wait, at most `timeout` seconds, until the sessions of these sockets' channels have
    ended (the sockets closed, on whichever worker held them); how many are still open. A
    member's removal and a user's erasure wait with it after telling the sockets to close."""
    still_open = database_sync_to_async(_sessions_open)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    remaining = await still_open(channels=channels)
    while remaining and loop.time() < deadline:
        await asyncio.sleep(ENDED_POLL_SECONDS)
        remaining = await still_open(channels=channels)
    return remaining


def sessions_open_on(*, worker_id: str) -> bool:
    return ChatSession.objects.filter(worker_id=worker_id, disconnected_at__isnull=True).exists()
