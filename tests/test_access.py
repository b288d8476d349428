"""The one authorization rule (protocol §11): `chat.access.decide`, as a table.

`decide` is pure: these tests build unsaved rows and have no database (pytest-django would
fail any query), so a rule that started querying would fail here too.

The table is written from the protocol, not from the code: every kind, actor and action, with
each action aimed at an ordinary member (or, for `leave`, at the actor, in a room that has
another owner). The variations below it are the cases the protocol names: moderators cannot
remove owners, only owners make moderators or owners, the last owner cannot leave or be
demoted.
"""

from __future__ import annotations

import pytest

from chat.access import Action, Subject, decide
from chat.models import Role, Room, RoomKind, RoomMember
from chat.protocol import ErrorCode

F = ErrorCode.ROOM_FORBIDDEN  # as if the room did not exist
N = ErrorCode.NOT_ALLOWED  # sees the room, lacks the role
OK = None

ACTORS = ("none", "member", "moderator", "owner", "banned")
ROLES = (Role.MEMBER, Role.MODERATOR, Role.OWNER)

# fmt: off
                                              # none      member    moderator owner     banned
MATRIX: dict[tuple[RoomKind, Action], tuple] = {
    (RoomKind.PUBLIC, Action.JOIN):            (OK,       OK,       OK,       OK,       F),
    # Reading (history, who is in it over HTTP) is for members: a public room is joined first.
    (RoomKind.PUBLIC, Action.READ):            (F,        OK,       OK,       OK,       F),
    (RoomKind.PUBLIC, Action.ANALYSE):         (F,        F,        F,        F,        F),
    (RoomKind.PUBLIC, Action.ADD_MEMBER):      (N,        N,        OK,       OK,       F),
    (RoomKind.PUBLIC, Action.SET_ROLE):        (N,        N,        N,        OK,       F),
    (RoomKind.PUBLIC, Action.REMOVE_MEMBER):   (N,        N,        OK,       OK,       F),
    (RoomKind.PUBLIC, Action.LEAVE):           (N,        OK,       OK,       OK,       F),
    (RoomKind.PUBLIC, Action.MUTE):            (N,        OK,       OK,       OK,       F),
    (RoomKind.PUBLIC, Action.EDIT_MESSAGE):    (N,        N,        N,        N,        F),
    (RoomKind.PUBLIC, Action.DELETE_MESSAGE):  (N,        N,        OK,       OK,       F),

    (RoomKind.PRIVATE, Action.JOIN):           (F,        OK,       OK,       OK,       F),
    (RoomKind.PRIVATE, Action.READ):           (F,        OK,       OK,       OK,       F),
    (RoomKind.PRIVATE, Action.ANALYSE):        (F,        F,        F,        F,        F),
    (RoomKind.PRIVATE, Action.ADD_MEMBER):     (F,        N,        OK,       OK,       F),
    (RoomKind.PRIVATE, Action.SET_ROLE):       (F,        N,        N,        OK,       F),
    (RoomKind.PRIVATE, Action.REMOVE_MEMBER):  (F,        N,        OK,       OK,       F),
    (RoomKind.PRIVATE, Action.LEAVE):          (F,        OK,       OK,       OK,       F),
    (RoomKind.PRIVATE, Action.MUTE):           (F,        OK,       OK,       OK,       F),
    (RoomKind.PRIVATE, Action.EDIT_MESSAGE):   (F,        N,        N,        N,        F),
    (RoomKind.PRIVATE, Action.DELETE_MESSAGE): (F,        N,        OK,       OK,       F),

    # A direct room: a fixed pair, no roles to change, nobody to add or remove.
    (RoomKind.DIRECT, Action.JOIN):            (F,        OK,       OK,       OK,       F),
    (RoomKind.DIRECT, Action.READ):            (F,        OK,       OK,       OK,       F),
    (RoomKind.DIRECT, Action.ANALYSE):         (F,        F,        F,        F,        F),
    (RoomKind.DIRECT, Action.ADD_MEMBER):      (F,        N,        N,        N,        F),
    (RoomKind.DIRECT, Action.SET_ROLE):        (F,        N,        N,        N,        F),
    (RoomKind.DIRECT, Action.REMOVE_MEMBER):   (F,        N,        N,        N,        F),
    (RoomKind.DIRECT, Action.LEAVE):           (F,        N,        N,        N,        F),
    (RoomKind.DIRECT, Action.MUTE):            (F,        OK,       OK,       OK,       F),
    (RoomKind.DIRECT, Action.EDIT_MESSAGE):    (F,        N,        N,        N,        F),
    (RoomKind.DIRECT, Action.DELETE_MESSAGE):  (F,        N,        N,        N,        F),

    # A personal room: its user's health analysis, never listed, never a chat room.
    (RoomKind.PERSONAL, Action.JOIN):          (F,        F,        F,        F,        F),
    (RoomKind.PERSONAL, Action.READ):          (F,        F,        F,        F,        F),
    (RoomKind.PERSONAL, Action.ANALYSE):       (F,        OK,       OK,       OK,       F),
    (RoomKind.PERSONAL, Action.ADD_MEMBER):    (F,        F,        F,        F,        F),
    (RoomKind.PERSONAL, Action.SET_ROLE):      (F,        F,        F,        F,        F),
    (RoomKind.PERSONAL, Action.REMOVE_MEMBER): (F,        F,        F,        F,        F),
    (RoomKind.PERSONAL, Action.LEAVE):         (F,        F,        F,        F,        F),
    (RoomKind.PERSONAL, Action.MUTE):          (F,        F,        F,        F,        F),
    (RoomKind.PERSONAL, Action.EDIT_MESSAGE):  (F,        F,        F,        F,        F),
    (RoomKind.PERSONAL, Action.DELETE_MESSAGE): (F,       F,        F,        F,        F),
}
# fmt: on


def room_of(kind: str) -> Room:
    return Room(name="r", kind=kind)


def row(room: Room | None, role: str = Role.MEMBER, *, uid: str = "actor", banned=False):
    member = RoomMember(user_id=uid, role=role, banned=banned)
    if room is not None:
        member.room = room
    return member


def actor_row(room: Room | None, actor: str) -> RoomMember | None:
    if actor == "none":
        return None
    if actor == "banned":
        return row(room, Role.MEMBER, banned=True)
    return row(room, actor)


def default_subject(room: Room | None, action: Action, actor: RoomMember | None):
    """What each action of the table is aimed at."""
    target = row(room, Role.MEMBER, uid="target")
    if action == Action.ADD_MEMBER:
        return Subject(member=None)  # a newcomer, as a member
    if action == Action.SET_ROLE:
        return Subject(member=target, role=Role.MODERATOR, owners=1)  # making a moderator
    if action == Action.REMOVE_MEMBER:
        return Subject(member=target, owners=1)
    if action == Action.LEAVE:
        return Subject(member=actor, owners=2)  # oneself; the room has another owner
    if action in (Action.EDIT_MESSAGE, Action.DELETE_MESSAGE):
        return Subject(member=None, author="target")  # someone else's message
    return None


@pytest.mark.parametrize("kind", [RoomKind.PUBLIC, RoomKind.PRIVATE, RoomKind.DIRECT])
@pytest.mark.parametrize("action", [Action.EDIT_MESSAGE, Action.DELETE_MESSAGE])
def test_a_member_changes_their_own_messages_a_banned_one_does_not(kind, action):
    room = room_of(kind)
    own = Subject(member=None, author="actor")
    assert decide(room=room, member=row(room), action=action, subject=own) is None
    banned = row(room, banned=True)
    assert decide(room=room, member=banned, action=action, subject=own) == F


def test_the_table_covers_every_kind_and_action():
    assert set(MATRIX) == {(kind, action) for kind in RoomKind for action in Action}


@pytest.mark.parametrize(
    ("kind", "action", "actor", "expected"),
    [
        pytest.param(kind, action, actor, outcome, id=f"{kind}-{action}-{actor}")
        for (kind, action), outcomes in MATRIX.items()
        for actor, outcome in zip(ACTORS, outcomes, strict=True)
    ],
)
def test_matrix(kind, action, actor, expected):
    room = room_of(kind)
    member = actor_row(room, actor)
    subject = default_subject(room, action, member)
    assert decide(room=room, member=member, action=action, subject=subject) == expected


@pytest.mark.parametrize("kind", list(RoomKind))
@pytest.mark.parametrize("action", list(Action))
@pytest.mark.parametrize("role", ROLES)
def test_a_ban_refuses_everything_whatever_the_role(kind, action, role):
    room = room_of(kind)
    banned = row(room, role, banned=True)
    for subject in (None, default_subject(room, action, banned), Subject(member=None)):
        assert decide(room=room, member=banned, action=action, subject=subject) == F


@pytest.mark.parametrize("action", list(Action))
@pytest.mark.parametrize("actor", ACTORS)
def test_no_room_is_forbidden_for_every_action(action, actor):
    member = actor_row(None, actor)
    subject = default_subject(None, action, member)
    assert decide(room=None, member=member, action=action, subject=subject) == F
    assert decide(room=None, member=member, action=action) == F


# --- who may act on whom ---------------------------------------------------------------------

MANAGED = [RoomKind.PUBLIC, RoomKind.PRIVATE]


@pytest.mark.parametrize("kind", MANAGED)
@pytest.mark.parametrize(
    ("actor_role", "target_role", "owners", "expected"),
    [
        (Role.MODERATOR, Role.OWNER, 1, N),  # moderators cannot remove owners
        (Role.MODERATOR, Role.OWNER, 3, N),  # however many there are
        (Role.MODERATOR, Role.MODERATOR, 1, OK),
        (Role.MODERATOR, Role.MEMBER, 1, OK),
        (Role.OWNER, Role.OWNER, 2, OK),  # an owner may remove another owner
        (Role.OWNER, Role.MODERATOR, 1, OK),
        (Role.MEMBER, Role.MEMBER, 1, N),
        (Role.MEMBER, Role.OWNER, 1, N),
    ],
)
def test_removing_someone(kind, actor_role, target_role, owners, expected):
    room = room_of(kind)
    subject = Subject(member=row(room, target_role, uid="target"), owners=owners)
    verdict = decide(
        room=room, member=row(room, actor_role), action=Action.REMOVE_MEMBER, subject=subject
    )
    assert verdict == expected


@pytest.mark.parametrize("kind", MANAGED)
@pytest.mark.parametrize("actor_role", [Role.MODERATOR, Role.OWNER])
def test_removing_a_non_member_is_a_managers_call(kind, actor_role):
    """(A public room's removal of an outsider is a ban that keeps them out.)"""
    room = room_of(kind)
    subject = Subject(member=None, owners=1)
    verdict = decide(
        room=room, member=row(room, actor_role), action=Action.REMOVE_MEMBER, subject=subject
    )
    assert verdict is OK


@pytest.mark.parametrize("kind", MANAGED)
@pytest.mark.parametrize(
    ("action", "actor_role", "target_role", "new_role", "expected"),
    [
        # Only owners make moderators or owners, by adding or by changing a role.
        (Action.SET_ROLE, Role.OWNER, Role.MEMBER, Role.MODERATOR, OK),
        (Action.SET_ROLE, Role.OWNER, Role.MEMBER, Role.OWNER, OK),
        (Action.SET_ROLE, Role.OWNER, Role.MODERATOR, Role.MEMBER, OK),
        (Action.SET_ROLE, Role.MODERATOR, Role.MEMBER, Role.MODERATOR, N),
        (Action.SET_ROLE, Role.MODERATOR, Role.MEMBER, Role.OWNER, N),
        (Action.SET_ROLE, Role.MODERATOR, Role.OWNER, Role.MEMBER, N),  # nor demote owners
        (Action.SET_ROLE, Role.MEMBER, Role.MEMBER, Role.MODERATOR, N),
        (Action.ADD_MEMBER, Role.OWNER, None, Role.MODERATOR, OK),
        (Action.ADD_MEMBER, Role.OWNER, None, Role.OWNER, OK),
        (Action.ADD_MEMBER, Role.MODERATOR, None, Role.MODERATOR, N),
        (Action.ADD_MEMBER, Role.MODERATOR, None, Role.OWNER, N),
        (Action.ADD_MEMBER, Role.MODERATOR, None, Role.MEMBER, OK),
        (Action.ADD_MEMBER, Role.MODERATOR, None, None, OK),
        (Action.ADD_MEMBER, Role.MEMBER, None, Role.MEMBER, N),
        (Action.ADD_MEMBER, Role.MEMBER, None, Role.OWNER, N),
    ],
)
def test_making_moderators_and_owners(kind, action, actor_role, target_role, new_role, expected):
    room = room_of(kind)
    target = row(room, target_role, uid="target") if target_role else None
    subject = Subject(member=target, role=new_role, owners=2)
    assert decide(room=room, member=row(room, actor_role), action=action, subject=subject) == (
        expected
    )


@pytest.mark.parametrize("kind", MANAGED)
def test_a_member_cannot_promote_themselves(kind):
    room = room_of(kind)
    me = row(room, Role.MEMBER)
    for role in (Role.MODERATOR, Role.OWNER):
        subject = Subject(member=me, role=role, owners=1)
        assert decide(room=room, member=me, action=Action.SET_ROLE, subject=subject) == N
        assert decide(room=room, member=me, action=Action.ADD_MEMBER, subject=subject) == N


@pytest.mark.parametrize("kind", MANAGED)
def test_a_role_is_changed_only_on_a_member(kind):
    room = room_of(kind)
    subject = Subject(member=None, role=Role.MODERATOR, owners=1)
    verdict = decide(
        room=room, member=row(room, Role.OWNER), action=Action.SET_ROLE, subject=subject
    )
    assert verdict == N


@pytest.mark.parametrize("kind", MANAGED)
@pytest.mark.parametrize("actor_role", [Role.MODERATOR, Role.OWNER])
def test_managers_lift_a_ban(kind, actor_role):
    room = room_of(kind)
    subject = Subject(member=row(room, Role.MEMBER, uid="target", banned=True), owners=1)
    verdict = decide(
        room=room, member=row(room, actor_role), action=Action.ADD_MEMBER, subject=subject
    )
    assert verdict is OK


@pytest.mark.parametrize("kind", MANAGED)
@pytest.mark.parametrize(
    ("role", "owners", "expected"),
    [
        (Role.OWNER, 1, N),  # the last owner cannot leave without naming another
        (Role.OWNER, 2, OK),
        (Role.MODERATOR, 1, OK),
        (Role.MEMBER, 1, OK),
    ],
)
def test_the_last_owner_cannot_leave(kind, role, owners, expected):
    room = room_of(kind)
    me = row(room, role)
    subject = Subject(member=me, owners=owners)
    assert decide(room=room, member=me, action=Action.LEAVE, subject=subject) == expected


@pytest.mark.parametrize("kind", MANAGED)
@pytest.mark.parametrize(
    ("new_role", "owners", "expected"),
    [
        (Role.MODERATOR, 1, N),  # the last owner cannot be demoted
        (Role.MEMBER, 1, N),
        (Role.OWNER, 1, OK),  # staying owner is no demotion
        (Role.MODERATOR, 2, OK),
        (Role.MEMBER, 2, OK),
    ],
)
def test_the_last_owner_cannot_be_demoted(kind, new_role, owners, expected):
    room = room_of(kind)
    me = row(room, Role.OWNER)
    subject = Subject(member=me, role=new_role, owners=owners)
    assert decide(room=room, member=me, action=Action.SET_ROLE, subject=subject) == expected
