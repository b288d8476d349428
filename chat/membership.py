"""Rooms and their members (protocol §11): the services behind the rooms API, the admin and
`manage.py createroom`.

Who may do what is decided by `chat.access` alone: every service asks it (`room_authorize`, or
`decide` on rows already loaded) before it reads or writes, and raises its `Refused`. Bad input
raises `InvalidRequest`. Each write runs in one transaction that locks what its answer rests
on: a room's membership changes lock the room's row (exact member caps, never zero owners),
and a removal also locks the removed user's `ChatUser` row, the lock `chat.sessions` holds
while it opens a socket, so the sockets it returns to revoke are all there are.

Operators (the admin) act outside the member rule: `as_operator=True` skips it and the
per-user caps (their actions are audited by issue 12), never the input checks.

Blocking (database) except `room_sockets_revoke`: call the others from a thread.
"""

from __future__ import annotations

import logging
import secrets
import unicodedata
from typing import Any

from channels.layers import get_channel_layer
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import (
    Case,
    Count,
    F,
    FilteredRelation,
    IntegerField,
    OuterRef,
    Q,
    QuerySet,
    Subquery,
    Value,
    When,
)
from django.db.models.functions import Coalesce

from chat.access import Action, Refused, Subject, decide, room_authorize
from chat.auth import display_name
from chat.history import message_frame
from chat.models import ChatMessage, ChatSession, ChatUser, Role, Room, RoomKind, RoomMember
from chat.protocol import AI_USER_ID, HEALTH_ROOM_PREFIX, ROOM_ID_RE, ErrorCode
from chat.sessions import sessions_wait_ended, user_lock

logger = logging.getLogger(__name__)

TITLE_MAX_CHARS = 100
# A room's `unread_count` counts at most this many messages (a client shows "999+"): a
# member who never read a busy room costs the rooms list a bounded index scan.
UNREAD_COUNT_MAX = 999
UID_MAX_CHARS = 128  # Firebase's limit, and ChatUser.user_id's


class InvalidRequest(Exception):
    """Input no rule needs to look at: `details` = {"errors": [{loc, msg, type}]}, the shape
    of the socket's MESSAGE_PARSE_ERROR (the input itself is never echoed)."""

    def __init__(self, details: dict[str, Any]):
        super().__init__(details)
        self.details = details

    @classmethod
    def at(cls, loc: list[str | int], msg: str) -> InvalidRequest:
        return cls({"errors": [{"loc": loc, "msg": msg, "type": "value_error"}]})


class LimitReached(Refused):
    """NOT_ALLOWED because a per-user or per-room cap (settings) is reached."""

    def __init__(self, *, limit: str, maximum: int):
        super().__init__(ErrorCode.NOT_ALLOWED)
        self.details = {"limit": limit, "max": maximum}


# --- input checks -----------------------------------------------------------------------------


def _text_problem(value: str) -> str | None:
    if any(unicodedata.category(char) == "Cc" for char in value):
        return "must not contain control characters"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must not contain unpaired surrogates"
    return None


def _checked_uid(uid: Any, loc: list[str | int]) -> str:
    """A uid someone else may be (a newline would break `Room.direct_pair`; `AI` is the
    assistant's)."""
    if not isinstance(uid, str) or not 1 <= len(uid) <= UID_MAX_CHARS:
        raise InvalidRequest.at(loc, f"must be a user id of 1-{UID_MAX_CHARS} characters")
    if problem := _text_problem(uid):
        raise InvalidRequest.at(loc, problem)
    if uid == AI_USER_ID:
        raise InvalidRequest.at(loc, "the assistant cannot be a member")
    return uid


def _checked_title(title: Any, loc: list[str | int]) -> str:
    title = title.strip() if isinstance(title, str) else ""
    if not 1 <= len(title) <= TITLE_MAX_CHARS:
        raise InvalidRequest.at(loc, f"must be 1-{TITLE_MAX_CHARS} characters")
    if problem := _text_problem(title):
        raise InvalidRequest.at(loc, problem)
    return title


def _checked_role(role: Any) -> str | None:
    if role is not None and role not in Role.values:
        raise InvalidRequest.at(["role"], f"must be one of {', '.join(Role.values)}")
    return role


def room_id_check(*, room_id: str) -> None:
    """A room id an operator may create: the URL's rules, not the reserved prefix."""
    if not ROOM_ID_RE.fullmatch(room_id):
        raise InvalidRequest.at(["room_id"], "must be 1-64 characters of A-Z a-z 0-9 _ . -")
    if room_id.startswith(HEALTH_ROOM_PREFIX):
        raise InvalidRequest.at(["room_id"], f"{HEALTH_ROOM_PREFIX}* is reserved")


def _new_room_id() -> str:
    """An opaque id: 128 random bits, URL-safe, so valid in a room URL."""
    while True:
        room_id = secrets.token_urlsafe(16)
        if ROOM_ID_RE.fullmatch(room_id) and not room_id.startswith(HEALTH_ROOM_PREFIX):
            return room_id


def _lock_user(user_id: str) -> None:
    """The user's lock (chat.sessions.user_lock). A user who never connected gets the row a
    token without a name would give them; their first socket writes their real name."""
    user_lock(user_id=user_id, username=display_name({}, user_id))


# --- selectors --------------------------------------------------------------------------------


class CappedCount(Subquery):
    """The number of rows of a sliced subquery (`[:n]`: at most n), in the same query."""

    template = "(SELECT COUNT(*) FROM (%(subquery)s) _counted)"
    output_field = IntegerField()


def _unread(*, user_id: str) -> CappedCount:
    """A membership's unread messages (protocol §12): stored after its read position, not
    the user's own, not deleted; at most UNREAD_COUNT_MAX."""
    return CappedCount(
        ChatMessage.objects.filter(
            room_id=OuterRef("room_id"),
            seq__gt=Coalesce(OuterRef("last_read_seq"), Value(0)),
            deleted_at__isnull=True,
        )
        .exclude(user_id=user_id)
        .order_by()
        .values("id")[:UNREAD_COUNT_MAX]
    )


def _room_entries(memberships: QuerySet[RoomMember], *, user_id: str) -> list[dict[str, Any]]:
    """The rooms-list entries of `user_id`'s memberships that `chat.access` lets them read, in
    two queries whatever their number: the memberships with their rooms, last message ids
    and direct partners' names; then those messages. Most recent message first, then rooms
    without messages, most recently joined first."""
    last_message_id = ChatMessage.objects.filter(room_id=OuterRef("room_id")).order_by("-id")
    partner = RoomMember.objects.filter(room_id=OuterRef(OuterRef("room_id"))).exclude(
        user_id=user_id
    )
    partner_name = ChatUser.objects.filter(user_id__in=partner.values("user_id"))
    rows = [
        member
        for member in memberships.select_related("room")
        .annotate(
            last_message_id=Subquery(last_message_id.values("id")[:1]),
            partner_name=Case(
                When(room__kind=RoomKind.DIRECT, then=Subquery(partner_name.values("username")[:1]))
            ),
            unread_count=_unread(user_id=user_id),
        )
        .order_by(F("last_message_id").desc(nulls_last=True), "-joined_at", "room_id")
        if decide(room=member.room, member=member, action=Action.READ) is None
    ]
    message_ids = [row.last_message_id for row in rows if row.last_message_id is not None]
    messages = {
        message.pk: message_frame(message)
        for message in (ChatMessage.objects.filter(pk__in=message_ids) if message_ids else [])
    }
    return [
        {
            "room_id": row.room_id,
            "name": _room_name(row.room, user_id=user_id, partner_name=row.partner_name),
            "kind": row.room.kind,
            "role": row.role,
            "muted": row.muted,
            "unread_count": row.unread_count,
            "last_read_seq": row.last_read_seq,
            "last_message": messages.get(row.last_message_id),
        }
        for row in rows
    ]


def _room_name(room: Room, *, user_id: str, partner_name: str | None) -> str:
    """The room's title; a direct room's is the other user's name (as their tokens show it,
    else as a token without a name would: never the assistant's name)."""
    if room.title or room.kind != RoomKind.DIRECT or not room.direct_pair:
        return room.display_name
    others = [uid for uid in room.direct_pair.split("\n") if uid != user_id]
    return partner_name or display_name({}, others[0] if others else user_id)


def rooms_of_user(*, user_id: str) -> list[dict[str, Any]]:
    """The user's rooms (`GET /api/v1/rooms`): every room they are a member of and may
    read, without banned memberships and personal rooms."""
    memberships = RoomMember.objects.filter(user_id=user_id, banned=False).exclude(
        room__kind=RoomKind.PERSONAL
    )  # narrows the query; chat.access still decides each row
    return _room_entries(memberships, user_id=user_id)


def public_rooms(*, user_id: str) -> list[dict[str, Any]]:
    """The public rooms the user may join (`GET /api/v1/rooms?kind=public`): not closed, not
    banned from; with their member counts (banned rows not counted), in one query."""
    rooms = (
        Room.objects.filter(kind=RoomKind.PUBLIC, is_closed=False)
        .annotate(
            mine=FilteredRelation("members", condition=Q(members__user_id=user_id)),
            my_member_id=F("mine__id"),
            my_role=F("mine__role"),
            my_banned=F("mine__banned"),
            member_count=Count("members", filter=Q(members__banned=False)),
        )
        .order_by("name")
    )
    entries = []
    for room in rooms:
        member = None
        if room.my_member_id is not None:
            member = RoomMember(
                pk=room.my_member_id,
                room=room,
                user_id=user_id,
                role=room.my_role,
                banned=room.my_banned,
            )
        if decide(room=room, member=member, action=Action.JOIN) is not None:
            continue
        entries.append(
            {
                "room_id": room.name,
                "name": room.display_name,
                "kind": room.kind,
                "description": room.description,
                "member_count": room.member_count,
                "is_member": member is not None,
            }
        )
    return entries


def _member_entry(member: RoomMember) -> dict[str, Any]:
    return {
        "room_id": member.room_id,
        "user_id": member.user_id,
        "role": member.role,
        "muted": member.muted,
        "banned": member.banned,
    }


# --- services ---------------------------------------------------------------------------------


def _room_for(
    *,
    actor_id: str,
    room_id: str,
    action: Action,
    subject: Subject | None = None,
    as_operator: bool,
) -> Room:
    """The room, if the rule (or the operator path) lets `actor_id` do `action`; else Refused."""
    if as_operator:
        room = Room.objects.filter(pk=room_id).first()
        if room is None:
            raise Refused(ErrorCode.ROOM_FORBIDDEN)
        return room
    room, _ = room_authorize(user_id=actor_id, room_id=room_id, action=action, subject=subject)
    return room


def _owners(room_id: str) -> int:
    return RoomMember.objects.filter(room_id=room_id, role=Role.OWNER, banned=False).count()


def _lock_room(room_id: str) -> None:
    """Serialise the membership changes of one room (nothing if it does not exist)."""
    list(Room.objects.select_for_update().filter(pk=room_id).values_list("pk"))


def room_create(*, room_id: str, kind: str, title: str = "", owner_id: str | None = None) -> Room:
    """An operator's room (admin, `manage.py createroom`): public or private, with an
    optional owner. InvalidRequest for a bad or reserved id, another kind, or an id in use."""
    room_id_check(room_id=room_id)
    if kind not in (RoomKind.PUBLIC, RoomKind.PRIVATE):
        raise InvalidRequest.at(["kind"], "must be public or private")
    if title:
        title = _checked_title(title, ["name"])
    if owner_id is not None:
        owner_id = _checked_uid(owner_id, ["owner"])
    with transaction.atomic():
        if Room.objects.filter(pk=room_id).exists():
            raise InvalidRequest.at(["room_id"], "a room with this id exists")
        room = Room.objects.create(name=room_id, kind=kind, title=title)
        if owner_id is not None:
            RoomMember.objects.create(room=room, user_id=owner_id, role=Role.OWNER)
    return room


def room_create_private(*, user_id: str, name: str, members: list[str]) -> dict[str, Any]:
    """A private room with a server-made opaque id: the caller owns it, `members` are
    members. InvalidRequest: a bad name, a bad, repeated or reserved uid, the caller among
    `members`, or more members than a room may have; LimitReached: the caller has made
    CHAT_MAX_ROOMS_PER_USER private rooms."""
    title = _checked_title(name, ["name"])
    if not isinstance(members, list):
        raise InvalidRequest.at(["members"], "must be a list of user ids")
    cap = settings.CHAT_MAX_MEMBERS_PER_ROOM
    if len(members) + 1 > cap:
        raise InvalidRequest.at(["members"], f"a room has at most {cap} members, you included")
    seen: set[str] = set()
    for index, uid in enumerate(members):
        uid = _checked_uid(uid, ["members", index])
        if uid == user_id:
            raise InvalidRequest.at(["members", index], "you are the owner already")
        if uid in seen:
            raise InvalidRequest.at(["members", index], "listed twice")
        seen.add(uid)
    with transaction.atomic():
        _lock_user(user_id)  # the cap below holds across workers
        made = Room.objects.filter(kind=RoomKind.PRIVATE, created_by=user_id).count()
        if made >= settings.CHAT_MAX_ROOMS_PER_USER:
            raise LimitReached(limit="rooms_per_user", maximum=settings.CHAT_MAX_ROOMS_PER_USER)
        room = Room.objects.create(
            name=_new_room_id(), kind=RoomKind.PRIVATE, title=title, created_by=user_id
        )
        RoomMember.objects.bulk_create(
            [RoomMember(room=room, user_id=user_id, role=Role.OWNER)]
            + [RoomMember(room=room, user_id=uid, role=Role.MEMBER) for uid in members]
        )
        (entry,) = _room_entries(
            RoomMember.objects.filter(room=room, user_id=user_id), user_id=user_id
        )
    logger.info("room created room=%s kind=private members=%d", room.name, len(members) + 1)
    return entry


def room_direct_open(*, user_id: str, other_user_id: str) -> tuple[dict[str, Any], bool]:
    """The direct room of the caller and `other_user_id`, made on the first call (both
    members), the same room every time after; and whether this call made it.
    InvalidRequest: oneself, the assistant, a bad uid; LimitReached: the caller has opened
    CHAT_MAX_DIRECT_ROOMS_PER_USER direct rooms."""
    other_user_id = _checked_uid(other_user_id, ["user_id"])
    if other_user_id == user_id:
        raise InvalidRequest.at(["user_id"], "a direct room needs another user")
    pair = "\n".join(sorted((user_id, other_user_id)))
    created = False
    with transaction.atomic():
        _lock_user(user_id)  # the cap below holds across workers
        room = Room.objects.filter(direct_pair=pair).first()
        if room is None:
            opened = Room.objects.filter(kind=RoomKind.DIRECT, created_by=user_id).count()
            if opened >= settings.CHAT_MAX_DIRECT_ROOMS_PER_USER:
                raise LimitReached(
                    limit="direct_rooms_per_user",
                    maximum=settings.CHAT_MAX_DIRECT_ROOMS_PER_USER,
                )
            try:
                with transaction.atomic():
                    room = Room.objects.create(
                        name=_new_room_id(),
                        kind=RoomKind.DIRECT,
                        direct_pair=pair,
                        created_by=user_id,
                    )
                    RoomMember.objects.bulk_create(
                        [RoomMember(room=room, user_id=uid) for uid in (user_id, other_user_id)]
                    )
                created = True
            except IntegrityError:
                # The other user opened it at the same moment (unique direct_pair).
                room = Room.objects.get(direct_pair=pair)
        room_authorize(user_id=user_id, room_id=room.name, action=Action.READ)
        (entry,) = _room_entries(
            RoomMember.objects.filter(room=room, user_id=user_id), user_id=user_id
        )
    if created:
        logger.info("room created room=%s kind=direct", room.name)
    return entry, created


def member_put(
    *,
    actor_id: str,
    room_id: str,
    user_id: str,
    role: str | None,
    as_operator: bool = False,
) -> dict[str, Any]:
    """Add `user_id` to the room (or lift their ban) with `role` (default member), or
    change an existing member's role: chat.access's ADD_MEMBER or SET_ROLE. Putting what is
    already there changes nothing. LimitReached: a private room at CHAT_MAX_MEMBERS_PER_ROOM."""
    user_id = _checked_uid(user_id, ["user_id"])
    role = _checked_role(role)
    with transaction.atomic():
        _lock_room(room_id)
        target = RoomMember.objects.filter(room_id=room_id, user_id=user_id).first()
        adds = target is None or target.banned
        changes_role = not adds and role is not None and role != target.role
        room = _room_for(
            actor_id=actor_id,
            room_id=room_id,
            action=Action.SET_ROLE if changes_role else Action.ADD_MEMBER,
            subject=Subject(member=target, role=role, owners=_owners(room_id)),
            as_operator=as_operator,
        )
        cap = settings.CHAT_MAX_MEMBERS_PER_ROOM
        capped = adds and room.kind == RoomKind.PRIVATE and not as_operator
        if capped and RoomMember.objects.filter(room=room, banned=False).count() >= cap:
            raise LimitReached(limit="members_per_room", maximum=cap)
        if target is None:
            target = RoomMember.objects.create(room=room, user_id=user_id, role=role or Role.MEMBER)
        elif adds or changes_role:
            target.role = role or (Role.MEMBER if adds else target.role)
            target.banned = False
            target.save(update_fields=["role", "banned"])
    return _member_entry(target)


def member_remove(
    *,
    actor_id: str,
    room_id: str,
    user_id: str,
    as_operator: bool = False,
    ban: bool | None = None,
) -> list[str]:
    """Remove `user_id` from the room: LEAVE when they are the actor, else REMOVE_MEMBER.
    Someone else's removal from a public room is a ban (the row stays, banned, so joining
    again is refused until a manager adds them); otherwise the row goes. `ban` (operators)
    chooses instead of that rule. Removing a non-member changes nothing, except that banning
    them keeps them out of a public room.

    Returns the channel names of the user's sockets open in the room, to pass to
    `room_sockets_revoke`. The removal and that list are made under the user's lock, the one
    `chat.sessions.sessions_open` takes, so no socket can join in between and be missed."""
    user_id = _checked_uid(user_id, ["user_id"])
    action = Action.LEAVE if actor_id == user_id else Action.REMOVE_MEMBER

    def authorized() -> tuple[Room, RoomMember | None]:
        target = RoomMember.objects.filter(room_id=room_id, user_id=user_id).first()
        subject = Subject(member=target, owners=_owners(room_id))
        room = _room_for(
            actor_id=actor_id,
            room_id=room_id,
            action=action,
            subject=subject,
            as_operator=as_operator,
        )
        return room, target

    with transaction.atomic():
        # Asked once before locking, so a refused caller creates no user row; asked again
        # under the locks (user, then room: the order sessions_open takes them), where the
        # answer holds.
        authorized()
        _lock_user(user_id)
        _lock_room(room_id)
        room, target = authorized()
        if ban is None:
            ban = action == Action.REMOVE_MEMBER and room.kind == RoomKind.PUBLIC
        if ban:
            RoomMember.objects.update_or_create(
                room=room, user_id=user_id, defaults={"banned": True}
            )
        elif target is not None:
            target.delete()
        channels = list(
            ChatSession.objects.filter(
                room=room, user_id=user_id, disconnected_at__isnull=True
            ).values_list("channel_name", flat=True)
        )
    logger.info(
        "member removed room=%s user=%s by=%s banned=%s sockets=%d",
        room_id,
        user_id,
        "operator" if as_operator else ("self" if action == Action.LEAVE else "manager"),
        ban,
        len(channels),
    )
    return channels


def membership_mute(
    *, user_id: str, room_id: str, muted: bool, as_operator: bool = False
) -> dict[str, Any]:
    """Mute or unmute push notifications of the room for the user (their own setting)."""
    if not isinstance(muted, bool):
        raise InvalidRequest.at(["muted"], "must be true or false")
    with transaction.atomic():
        _room_for(actor_id=user_id, room_id=room_id, action=Action.MUTE, as_operator=as_operator)
        member = (
            RoomMember.objects.select_for_update().filter(room_id=room_id, user_id=user_id).first()
        )
        if member is None:  # an operator muting for someone who is not a member
            raise Refused(ErrorCode.ROOM_FORBIDDEN)
        if member.muted != muted:
            member.muted = muted
            member.save(update_fields=["muted"])
    return _member_entry(member)


async def room_sockets_revoke(
    *, room_id: str, user_id: str, channels: list[str], timeout: float
) -> int:
    """Close a removed user's sockets in the room, on whichever worker holds them: each gets
    `room.revoke` on its own channel (→ ROOM_FORBIDDEN, close 4004). Waits, at most
    `timeout` seconds, until their sessions have ended; returns how many did."""
    if not channels:
        return 0
    layer = get_channel_layer()
    for channel in channels:
        try:
            await layer.send(channel, {"type": "room.revoke", "room_id": room_id})
        except Exception as exc:  # a full queue, the layer down: counted as not closed below
            logger.warning("room revoke not sent room=%s: %s", room_id, type(exc).__name__)
    remaining = await sessions_wait_ended(channels=channels, timeout=timeout)
    if remaining:
        logger.warning(
            "room revoke: %d of %d socket(s) still open after %ss room=%s user=%s",
            remaining,
            len(channels),
            timeout,
            room_id,
            user_id,
        )
    return len(channels) - remaining
