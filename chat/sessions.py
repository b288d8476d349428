"""Sessions and presence, kept in the database so every worker sees the same state.

One `ChatSession` row per socket. The user's `ChatUser` row is locked while a session opens
or closes, which makes the per-user connection cap and "first socket in / last socket out"
exact even when a user's sockets are on different workers.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.db import transaction
from django.db.models import Count, Max, Min
from django.utils import timezone

from chat.access import Action, Ask, Refused, rooms_authorize
from chat.auth import Identity
from chat.models import ChatSession, ChatUser, Endpoint, Role, Room, RoomKind, RoomMember
from chat.protocol import HEALTH_ROOM_PREFIX, Close, iso
from chat.rows import rows_insert, rows_update


class SessionRefused(Exception):
    def __init__(self, close: Close):
        super().__init__(close.name)
        self.close = close


@dataclass(frozen=True)
class SessionOpened:
    session_id: str
    connected_at: datetime
    # The user's first socket in the room, to be announced (not when back within a
    # stopping worker's rejoin grace: the room never saw them go).
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
    channel_name: str
    last_in_room: bool


@dataclass(frozen=True)
class SessionEnd:
    """A session to end, and how it ended."""

    session_id: str
    close_code: int | None
    close_reason: str
    # The socket's final liveness; None: as last written (a reaped session).
    last_seen: datetime | None = None
    messages_sent: int | None = None
    # Seconds the user has to come back before the room is told they left, if this is their
    # last socket in it (a stopping worker's close: CHAT_SHUTDOWN_REJOIN_GRACE); 0: at once.
    leave_grace: float = 0.0


def users_lock(*, names: dict[str, str]) -> tuple[dict[str, ChatUser], set[str]]:
    """Lock these users' rows (made if new, with the name given) until the transaction ends,
    in user id order, so two batches on two workers never wait for each other in a circle:
    whatever opens, closes or revokes a user's sessions holds its row, so those decisions
    are exact. The rows by user id, and the ids of the rows made now."""
    locked = ChatUser.objects.select_for_update().filter(pk__in=names).order_by("pk")
    users = {user.pk: user for user in locked}
    made = set(names) - set(users)
    if made:
        rows_insert(
            rows=[ChatUser(user_id=uid, username=names[uid]) for uid in sorted(made)],
            ignore_conflicts=True,  # made meanwhile by another worker: then it is theirs
        )
        again = ChatUser.objects.select_for_update().filter(pk__in=made).order_by("pk")
        users |= {user.pk: user for user in again}
    return users, made


def user_lock(*, user_id: str, username: str) -> ChatUser:
    """`users_lock` for one user."""
    users, _ = users_lock(names={user_id: username})
    return users[user_id]


@dataclass(frozen=True)
class SessionRequest:
    """A socket asking to open its session."""

    identity: Identity
    room_id: str
    endpoint: Endpoint
    channel_name: str
    client_address: str
    user_agent: str


def _rooms_to_join(
    *, requests: list[SessionRequest], open_rooms: bool
) -> list[tuple[Room, RoomMember | None] | SessionRefused]:
    """The room each socket may open and the user's membership, through the one rule
    (chat.access); SessionRefused ROOM_FORBIDDEN otherwise, the same for a room that does
    not exist.

    The health-analysis socket's personal room is made on demand for its user; with
    `open_rooms` (CHAT_OPEN_ROOMS) an unknown id is made a public room (v1)."""
    asks = []
    for request in requests:
        user_id, room_id = request.identity.user_id, request.room_id
        if request.endpoint == Endpoint.HEALTH:
            room, _ = Room.objects.get_or_create(
                name=room_id, defaults={"kind": RoomKind.PERSONAL, "created_by": user_id}
            )
            # The path is the user's own (checked against the token), so the room is theirs
            # even if its row lost its owner (an operator's edit).
            RoomMember.objects.bulk_create(
                [RoomMember(room=room, user_id=user_id, role=Role.OWNER)], ignore_conflicts=True
            )
        asks.append(
            Ask(
                user_id=user_id,
                room_id=room_id,
                action=Action.ANALYSE if request.endpoint == Endpoint.HEALTH else Action.JOIN,
            )
        )
    if open_rooms:
        unknown = {
            ask.room_id
            for ask in asks
            if ask.action == Action.JOIN and not ask.room_id.startswith(HEALTH_ROOM_PREFIX)
        }
        Room.objects.bulk_create(
            [Room(name=room_id, kind=RoomKind.PUBLIC) for room_id in sorted(unknown)],
            ignore_conflicts=True,  # those that exist stay as they are
        )
    return [
        SessionRefused(Close.ROOM_FORBIDDEN) if isinstance(answer, Refused) else answer
        for answer in rooms_authorize(asks=asks)
    ]


def sessions_open(
    *,
    requests: list[SessionRequest],
    worker_id: str,
    max_connections: int,
    open_rooms: bool,
) -> list[SessionOpened | SessionRefused]:
    """Record new sockets, in one transaction (a batch of joins, chat.joins): for each
    request, in order, its session or why it is refused — the room is forbidden (or does
    not exist), closed, the user has too many sockets, the room is full. A refused request
    leaves no session, membership or user row behind (a room made on demand stays); a
    request sees the sessions opened before it in the batch.

    Locks, always in this order (as the membership services take them): the users' rows,
    in user id order, then the capped rooms' rows (`max_users`), in room id order."""
    with transaction.atomic():
        names = {request.identity.user_id: request.identity.username for request in requests}
        users, made = users_lock(names=names)
        for user in users.values():  # the name the user's token carries now
            if user.username != names[user.pk]:
                user.username = names[user.pk]
                user.save(update_fields=["username"])
        rooms = _rooms_to_join(requests=requests, open_rooms=open_rooms)
        capped = sorted(
            {a[0].pk for a in rooms if not isinstance(a, SessionRefused) and a[0].max_users}
        )
        if capped:
            locked = Room.objects.select_for_update().filter(pk__in=capped).order_by("pk")
            fresh = {room.pk: room for room in locked}
            rooms = [
                answer
                if isinstance(answer, SessionRefused) or answer[0].pk not in fresh
                else (fresh[answer[0].pk], answer[1])
                for answer in rooms
            ]
        active = ChatSession.objects.filter(disconnected_at__isnull=True)
        open_now: dict[str, list[str]] = {user_id: [] for user_id in users}
        for user_id, room_id in active.filter(user_id__in=users).values_list("user_id", "room_id"):
            open_now[user_id].append(room_id)
        # Departures not announced yet (a stopping worker closed the user's last socket in
        # the room): a user back within the grace was never shown as gone, so is not
        # shown as joining either.
        pending = _departures_pending(user_ids=list(users))
        returned: set[tuple[str, str]] = set()
        sessions: list[ChatSession] = []
        new_members: list[RoomMember] = []
        outcomes: list[SessionOpened | SessionRefused] = []
        for request, answer in zip(requests, rooms, strict=True):
            user = users[request.identity.user_id]
            if isinstance(answer, SessionRefused):
                outcomes.append(answer)
                continue
            room, member = answer
            if room.is_closed:
                outcomes.append(SessionRefused(Close.ROOM_CLOSED))
                continue
            mine = open_now[user.pk]
            if len(mine) >= max_connections:
                outcomes.append(SessionRefused(Close.TOO_MANY_CONNECTIONS))
                continue
            first_in_room = room.pk not in mine
            if first_in_room and room.max_users is not None:
                here = set(active.filter(room=room).values_list("user_id", flat=True))
                here |= {s.user_id for s in sessions if s.room_id == room.pk}
                if len(here) >= room.max_users:
                    outcomes.append(SessionRefused(Close.ROOM_FULL))
                    continue
            if member is None:  # a public room: joining makes a member
                new_members.append(RoomMember(room=room, user_id=user.pk, role=Role.MEMBER))
            session = ChatSession(
                session_id=uuid.uuid4(),
                user=user,
                username=request.identity.username,
                room=room,
                endpoint=request.endpoint,
                channel_name=request.channel_name,
                worker_id=worker_id,
                client_address=request.client_address[:64],
                user_agent=request.user_agent[:512],
            )
            sessions.append(session)
            mine.append(room.pk)
            if first_in_room and (user.pk, room.pk) in pending:
                returned.add((user.pk, room.pk))
            outcomes.append(
                SessionOpened(
                    session_id=str(session.session_id),
                    connected_at=session.connected_at,
                    first_in_room=first_in_room and (user.pk, room.pk) not in returned,
                    room_assistant_mode=room.assistant_mode,
                    room_kind=room.kind,
                    room_last_seq=room.last_seq,
                )
            )
        rows_insert(rows=new_members, ignore_conflicts=True)
        rows_insert(rows=sessions)
        _departures_cancel(session_ids=[pk for place in returned for pk in pending[place]])
        unused = made - {session.user_id for session in sessions}
        if unused:  # (rows that have sessions are another worker's, made meanwhile)
            ChatUser.objects.filter(pk__in=unused, sessions__isnull=True).delete()
    return outcomes


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


def sessions_close(*, ends: list[SessionEnd]) -> list[SessionClosed | None]:
    """End sessions, in one transaction (the closes of a batch, chat.joins, or a reaped
    worker's sessions): for each, in order, what ended, or None if it had already ended (by
    its socket, a reaper or a shutdown: each session ends once, and is reported once).

    The users' rows are locked in user id order, as `sessions_open` locks them, so "last
    socket out" is exact across workers: `last_in_room` is true for one ended session per
    user and room the user has no open session left in: the last of them in `ends`."""
    if not ends:
        return []
    by_id = {end.session_id: end for end in ends}
    now = timezone.now()
    closed: dict[str, SessionClosed] = {}
    with transaction.atomic():
        users = list(
            ChatUser.objects.select_for_update()
            .filter(pk__in=ChatSession.objects.filter(session_id__in=by_id).values("user_id"))
            .order_by("pk")
            .values_list("pk", flat=True)
        )
        # These users' open sessions: those to end, and those that stay (in one query).
        still_open = {
            str(session_id): rest
            for session_id, *rest in ChatSession.objects.filter(
                user_id__in=users, disconnected_at__isnull=True
            ).values_list("session_id", "user_id", "username", "room_id", "channel_name")
        }
        ending: list[ChatSession] = []
        for end in ends:
            if end.session_id not in still_open:
                continue  # ended already (or ended twice in `ends`: once)
            user_id, username, room_id, channel_name = still_open.pop(end.session_id)
            ending.append(
                ChatSession(
                    session_id=end.session_id,
                    user_id=user_id,
                    username=username,
                    room_id=room_id,
                    channel_name=channel_name,
                    disconnected_at=now,
                    close_code=end.close_code,
                    close_reason=end.close_reason[:64],
                    last_seen=end.last_seen,
                    messages_sent=end.messages_sent or 0,
                )
            )
        still_in = {(user_id, room_id) for user_id, _, room_id, _ in still_open.values()}
        announced: set[tuple[str, str]] = set()
        # The last to end of a user's sockets in a room is out last.
        for session in reversed(ending):
            place = (session.user_id, session.room_id)
            last_in_room = place not in still_in and place not in announced
            announced.add(place)
            grace = by_id[str(session.session_id)].leave_grace
            if last_in_room and grace > 0:
                session.leave_due_at = now + timedelta(seconds=grace)
                last_in_room = False  # told later, if they are not back (`departures_due`)
            closed[str(session.session_id)] = SessionClosed(
                user_id=session.user_id,
                username=session.username,
                room_id=session.room_id,
                channel_name=session.channel_name,
                last_in_room=last_in_room,
            )
        # One statement per set of fields written: last_seen and messages_sent only where
        # given (a reaped session keeps what was last written).
        written: dict[tuple[str, ...], list[ChatSession]] = {}
        for session in ending:
            end = by_id[str(session.session_id)]
            fields = tuple(
                name
                for name in _ENDED
                if not (name == "last_seen" and end.last_seen is None)
                and not (name == "messages_sent" and end.messages_sent is None)
            )
            written.setdefault(fields, []).append(session)
        for fields, rows in written.items():
            rows_update(rows=rows, fields=fields)
    return [closed.get(end.session_id) for end in ends]


# What ending a session writes.
_ENDED = (
    "disconnected_at",
    "close_code",
    "close_reason",
    "leave_due_at",
    "last_seen",
    "messages_sent",
)


def room_sockets(*, room_id: str) -> int:
    """How many sockets are open in the room now, across all workers."""
    return ChatSession.objects.filter(room_id=room_id, disconnected_at__isnull=True).count()


def room_presence(*, room_id: str) -> list[dict]:
    """Everyone in the room now, one entry per user, across all workers."""
    return rooms_presence(room_ids=[room_id])[room_id]


def rooms_presence(*, room_ids: list[str]) -> dict[str, list[dict]]:
    """`room_presence` of each room, in one query (a batch of joins reads hundreds)."""
    rows = (
        ChatSession.objects.filter(room_id__in=room_ids, disconnected_at__isnull=True)
        .values("room_id", "user_id")
        .annotate(
            username=Max("username"),
            connection_count=Count("session_id"),
            connected_at=Min("connected_at"),
            last_seen=Max("last_seen"),
        )
        .order_by("connected_at", "user_id")
    )
    presence: dict[str, list[dict]] = {room_id: [] for room_id in room_ids}
    for row in rows:
        presence[row["room_id"]].append(
            {
                "user_id": row["user_id"],
                "username": row["username"],
                "connection_count": row["connection_count"],
                "connected_at": iso(row["connected_at"]),
                "last_seen": iso(row["last_seen"]),
            }
        )
    return presence


def session_workers() -> set[str]:
    """Workers that own at least one open session."""
    return set(
        ChatSession.objects.filter(disconnected_at__isnull=True)
        .values_list("worker_id", flat=True)
        .distinct()
    )


REAP_BATCH = 500


def sessions_reap(*, worker_id: str) -> list[SessionClosed]:
    """End every open session of a dead worker (reason `worker_lost`), a batch of
    `sessions_close` at a time: when several live workers reap the same dead one at once,
    each session is ended (and each departure reported) once."""
    ids = [
        str(session_id)
        for session_id in ChatSession.objects.filter(
            worker_id=worker_id, disconnected_at__isnull=True
        ).values_list("session_id", flat=True)
    ]
    reaped: list[SessionClosed] = []
    for first in range(0, len(ids), REAP_BATCH):
        ends = [
            SessionEnd(session_id=session_id, close_code=None, close_reason="worker_lost")
            for session_id in ids[first : first + REAP_BATCH]
        ]
        reaped += [closed for closed in sessions_close(ends=ends) if closed is not None]
    return reaped


def _departures_pending(*, user_ids: list[str]) -> dict[tuple[str, str], list]:
    """These users' departures not announced yet: (user, room) -> the sessions holding them."""
    pending: dict[tuple[str, str], list] = {}
    rows = ChatSession.objects.filter(user_id__in=user_ids, leave_due_at__isnull=False)
    for pk, user_id, room_id in rows.values_list("pk", "user_id", "room_id"):
        pending.setdefault((user_id, room_id), []).append(pk)
    return pending


def _departures_cancel(*, session_ids: list) -> None:
    """Their users are back in these rooms: these departures are never announced."""
    if session_ids:
        ChatSession.objects.filter(pk__in=session_ids).update(leave_due_at=None)


def departures_due(*, now: datetime | None = None) -> list[SessionClosed]:
    """The departures whose grace is over (users a stopping worker closed who have not come
    back): each reported once, as a last-out `SessionClosed`, and no longer pending. Under
    the users' locks, in user id order (as joins take them), so a user who comes back at the
    same moment is either announced as gone and then as joining, or neither. Any worker's
    housekeeping calls it; at most REAP_BATCH per call."""
    now = timezone.now() if now is None else now
    due = ChatSession.objects.filter(leave_due_at__lte=now)
    users = sorted(set(due.values_list("user_id", flat=True)[:REAP_BATCH]))
    if not users:
        return []
    with transaction.atomic():
        list(ChatUser.objects.select_for_update().filter(pk__in=users).order_by("pk"))
        rows = list(due.filter(user_id__in=users))  # again, under the locks
        still_in = set(
            ChatSession.objects.filter(user_id__in=users, disconnected_at__isnull=True).values_list(
                "user_id", "room_id"
            )
        )
        ChatSession.objects.filter(pk__in=[row.pk for row in rows]).update(leave_due_at=None)
    gone: dict[tuple[str, str], SessionClosed] = {}
    for row in rows:
        place = (row.user_id, row.room_id)
        if place not in still_in:
            gone[place] = SessionClosed(
                user_id=row.user_id,
                username=row.username,
                room_id=row.room_id,
                channel_name=row.channel_name,
                last_in_room=True,
            )
    return list(gone.values())


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
