"""Who may do what in a room (protocol §11): the one authorization rule.

Every way to read or write a room asks `decide` — through `room_authorize` (or
`rooms_authorize` for a batch), which loads the room and the user's membership — before
touching anything: the socket join, history pages,
presence over HTTP, the rooms API, and the admin's membership changes. Deny by default:
a room that does not exist, a private or direct room the user is not a member of, and a room
the user is banned from all answer the same `ROOM_FORBIDDEN`, so a refusal never tells
whether the room exists. Only a user who may see the room can learn that they lack a role
(`NOT_ALLOWED`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from chat.models import Role, Room, RoomKind, RoomMember
from chat.protocol import ErrorCode


class Action(StrEnum):
    JOIN = "join"  # open a chat socket: presence, history, post, type
    READ = "read"  # a history page, the room's presence over HTTP
    ANALYSE = "analyse"  # the health-analysis socket of the user's personal room
    ADD_MEMBER = "add_member"  # add a user, or lift a ban
    SET_ROLE = "set_role"  # change an existing member's role
    REMOVE_MEMBER = "remove_member"  # remove someone else (a ban in a public room)
    LEAVE = "leave"  # remove oneself
    MUTE = "mute"  # one's own push setting
    EDIT_MESSAGE = "edit_message"  # replace a message's content: its author only
    DELETE_MESSAGE = "delete_message"  # its author, or a moderator or owner of the room


class Refused(Exception):
    """The rule said no: `code` is ROOM_FORBIDDEN (as if the room did not exist) or
    NOT_ALLOWED (the user sees the room but lacks the role)."""

    def __init__(self, code: ErrorCode):
        super().__init__(code)
        self.code = code


MANAGERS = frozenset({Role.OWNER, Role.MODERATOR})
# Kinds whose member list can change through the API (direct: fixed pair; personal: one user).
MANAGED_KINDS = frozenset({RoomKind.PUBLIC, RoomKind.PRIVATE})


@dataclass(frozen=True)
class Subject:
    """What the rule needs to know about the member an action is aimed at."""

    member: RoomMember | None  # their current row, if any
    role: str | None = None  # the role asked for (ADD_MEMBER, SET_ROLE)
    owners: int = 0  # owners the room has now (the last one cannot go)
    author: str | None = None  # the message's author (EDIT_MESSAGE, DELETE_MESSAGE)


def sees(*, room: Room | None, member: RoomMember | None, action: Action) -> bool:
    """Whether the user may see the room at all: the ROOM_FORBIDDEN line."""
    if room is None or (member is not None and member.banned):
        return False
    if room.kind == RoomKind.PERSONAL:
        # Only its own user, and only through the health-analysis socket: never listed,
        # never joined as a chat room.
        return action == Action.ANALYSE and member is not None
    if action == Action.ANALYSE:
        return False
    if member is not None:
        return True
    # A public room is there for anyone to join (and to be told they lack a role in), but
    # what is said and who is in it are for its members: join first.
    return room.kind == RoomKind.PUBLIC and action != Action.READ


def decide(
    *,
    room: Room | None,
    member: RoomMember | None,
    action: Action,
    subject: Subject | None = None,
) -> ErrorCode | None:
    """None if `member` (the acting user's row, or None) may do `action` in `room`; else
    the refusal's code. Pure: no queries."""
    if not sees(room=room, member=member, action=action):
        return ErrorCode.ROOM_FORBIDDEN
    if action in (Action.JOIN, Action.READ, Action.ANALYSE):
        return None
    if member is None:
        return ErrorCode.NOT_ALLOWED  # a public room seen from outside
    if action == Action.MUTE:
        return None
    if action in (Action.EDIT_MESSAGE, Action.DELETE_MESSAGE):
        if subject is not None and subject.author == member.user_id:
            return None
        moderates = member.role in MANAGERS and room.kind in MANAGED_KINDS
        return None if action == Action.DELETE_MESSAGE and moderates else ErrorCode.NOT_ALLOWED
    if room.kind not in MANAGED_KINDS:
        return ErrorCode.NOT_ALLOWED
    subject = subject or Subject(member=None)
    target = subject.member
    last_owner = target is not None and target.role == Role.OWNER and subject.owners <= 1
    if action == Action.LEAVE:
        return ErrorCode.NOT_ALLOWED if last_owner else None
    if member.role not in MANAGERS:
        return ErrorCode.NOT_ALLOWED
    if action == Action.ADD_MEMBER:
        wants_role = subject.role not in (None, Role.MEMBER)
        return ErrorCode.NOT_ALLOWED if wants_role and member.role != Role.OWNER else None
    if action == Action.SET_ROLE:
        if member.role != Role.OWNER or target is None:
            return ErrorCode.NOT_ALLOWED
        demoted = subject.role != Role.OWNER
        return ErrorCode.NOT_ALLOWED if last_owner and demoted else None
    if action == Action.REMOVE_MEMBER:
        if target is not None and target.role == Role.OWNER and member.role != Role.OWNER:
            return ErrorCode.NOT_ALLOWED  # moderators cannot remove owners
        return ErrorCode.NOT_ALLOWED if last_owner else None
    return ErrorCode.NOT_ALLOWED


@dataclass(frozen=True)
class Ask:
    """One question for the rule: may `user_id` do `action` in `room_id`?"""

    user_id: str
    room_id: str
    action: Action
    subject: Subject | None = None


def rooms_authorize(*, asks: list[Ask]) -> list[tuple[Room, RoomMember | None] | Refused]:
    """Each ask's answer, in order: the room and the user's membership, or the refusal.
    Loads every room and membership the asks name in two queries (a batch of socket joins
    asks together), then applies `decide` to each. Blocking (database): call it from a
    thread, inside the caller's transaction when the answers must hold for what follows."""
    if not asks:
        return []
    rooms = Room.objects.in_bulk({ask.room_id for ask in asks})
    wanted = {(ask.room_id, ask.user_id) for ask in asks if ask.room_id in rooms}
    members = {}
    if wanted:
        rows = RoomMember.objects.filter(
            room_id__in={room for room, _ in wanted}, user_id__in={user for _, user in wanted}
        )
        members = {(m.room_id, m.user_id): m for m in rows if (m.room_id, m.user_id) in wanted}
    answers: list[tuple[Room, RoomMember | None] | Refused] = []
    for ask in asks:
        room = rooms.get(ask.room_id)
        member = members.get((ask.room_id, ask.user_id))
        refusal = decide(room=room, member=member, action=ask.action, subject=ask.subject)
        answers.append(Refused(refusal) if refusal is not None else (room, member))
    return answers


def room_authorize(
    *, user_id: str, room_id: str, action: Action, subject: Subject | None = None
) -> tuple[Room, RoomMember | None]:
    """`rooms_authorize` for one ask; raises Refused if the rule says no."""
    (answer,) = rooms_authorize(
        asks=[Ask(user_id=user_id, room_id=room_id, action=action, subject=subject)]
    )
    if isinstance(answer, Refused):
        raise answer
    return answer
