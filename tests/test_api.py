"""The rooms API and the HTTP companions under the membership rule (protocol §8, §11):
`chat/api.py`, `chat/membership.py`, `chat/views.py`, the admin's membership inline and
`manage.py createroom`.

Routes by roles as one table; then the hostile cases; then a removal closing the removed
user's sockets, with the sockets and the HTTP request in one event loop."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote

import pytest
from asgiref.sync import sync_to_async
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import AsyncClient

from chat.access import Action, Refused, room_authorize
from chat.membership import (
    member_put,
    member_remove,
    room_create,
    room_create_private,
    room_direct_open,
    rooms_of_user,
)
from chat.models import ChatMessage, ChatSession, ChatUser, Room, RoomKind, RoomMember
from chat.protocol import ERROR_MESSAGES, HEALTH_ROOM_PREFIX, ROOM_ID_RE, ErrorCode
from tests.conftest import act_as_daphne, token_for

pytestmark = pytest.mark.django_db


def auth(uid: str, **claims) -> dict[str, str]:
    return {"Authorization": f"Bearer {token_for(uid, claims=claims or None)}"}


def send(client, method: str, path: str, uid: str | None, body=None, **headers):
    """One request as `uid` (None: no token); `body`: JSON-encoded unless bytes."""
    if uid is not None:
        headers |= auth(uid)
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body)
    call = getattr(client, method.lower())
    if body is None or method == "GET":
        return call(path, headers=headers)
    return call(path, data=body, content_type="application/json", headers=headers)


def members_url(room_id: str, uid: str) -> str:
    return f"/api/v1/rooms/{quote(room_id, safe='')}/members/{quote(uid, safe='')}"


def membership_url(room_id: str) -> str:
    return f"/api/v1/rooms/{quote(room_id, safe='')}/membership"


def users_url(room_id: str) -> str:
    return f"/api/v1/ws/chat/users/{quote(room_id, safe='')}"


# --- rooms for the table, made through the services --------------------------------------------

# The actors of a managed room: olive owns it, mona moderates, mel and meg are members, bert is
# banned, nick is no member. A direct room is dora's and dan's.
ACTORS = {
    "owner": "olive",
    "moderator": "mona",
    "member": "mel",
    "non-member": "nick",
    "banned": "bert",
}


def seed_private() -> str:
    room = room_create_private(
        user_id="olive", name="Care team", members=["mona", "mel", "meg", "bert"]
    )
    room_id = room["room_id"]
    member_put(actor_id="olive", room_id=room_id, user_id="mona", role="moderator")
    # Bans are for public rooms; an operator may ban anywhere (a private room's removal
    # deletes the row, which refuses the same way).
    member_remove(actor_id="op", room_id=room_id, user_id="bert", as_operator=True, ban=True)
    return room_id


def seed_public() -> str:
    room_create(room_id="town-square", kind=RoomKind.PUBLIC, title="Town square", owner_id="olive")
    member_put(actor_id="olive", room_id="town-square", user_id="mona", role="moderator")
    for uid in ("mel", "meg", "bert"):
        member_put(actor_id="mona", room_id="town-square", user_id=uid, role=None)
    member_remove(actor_id="mona", room_id="town-square", user_id="bert")  # a ban
    return "town-square"


def seed_direct() -> str:
    room, _ = room_direct_open(user_id="dora", other_user_id="dan")
    return room["room_id"]


SEEDS = {
    "private": seed_private,
    "public": seed_public,
    "direct": seed_direct,
    "missing": lambda: "no-such-room",
    "invalid id": lambda: "bad room!",
}

# What each action asks, for a room and an actor.
ACTIONS = {
    "read presence": lambda room, actor, other: ("GET", users_url(room), None),
    "add a user": lambda room, actor, other: ("PUT", members_url(room, "newt"), None),
    "make moderator": lambda room, actor, other: (
        "PUT",
        members_url(room, other),
        {"role": "moderator"},
    ),
    "remove a member": lambda room, actor, other: ("DELETE", members_url(room, other), None),
    "remove the owner": lambda room, actor, other: ("DELETE", members_url(room, "olive"), None),
    "leave": lambda room, actor, other: ("DELETE", members_url(room, actor), None),
    "mute": lambda room, actor, other: ("PATCH", membership_url(room), {"muted": True}),
}

# status by actor: owner, moderator, member, non-member, banned (protocol §11).
MANAGED = {
    "private": {
        "read presence": (200, 200, 200, 404, 404),
        "add a user": (200, 200, 403, 404, 404),
        "make moderator": (200, 403, 403, 404, 404),
        "remove a member": (200, 200, 403, 404, 404),
        "remove the owner": (403, 403, 403, 404, 404),  # the owner's own: the last owner leaving
        "leave": (403, 200, 200, 404, 404),
        "mute": (200, 200, 200, 404, 404),
    },
    "public": {
        # A public room is there for every signed-in user but those banned from it to join;
        # who is in it is for its members (joining makes one).
        "read presence": (200, 200, 200, 404, 404),
        "add a user": (200, 200, 403, 403, 404),
        "make moderator": (200, 403, 403, 403, 404),
        "remove a member": (200, 200, 403, 403, 404),
        "remove the owner": (403, 403, 403, 403, 404),
        "leave": (403, 200, 200, 403, 404),
        "mute": (200, 200, 200, 403, 404),
    },
}
# A direct room: its members (dora) and everyone else; no roles, no member changes.
DIRECT = {
    "read presence": (200, 404),
    "add a user": (403, 404),
    "make moderator": (403, 404),
    "remove a member": (403, 404),
    "remove the owner": (403, 404),
    "leave": (403, 404),
    "mute": (200, 404),
}

MATRIX = (
    [
        (kind, action, role, statuses[index])
        for kind, table in MANAGED.items()
        for action, statuses in table.items()
        for index, role in enumerate(ACTORS)
    ]
    + [
        ("direct", action, role, statuses[index])
        for action, statuses in DIRECT.items()
        for index, role in enumerate(("member", "non-member"))
    ]
    + [
        (kind, action, role, 404)
        for kind in ("missing", "invalid id")
        for action in ACTIONS
        for role in ("owner", "non-member")
    ]
)


@pytest.mark.parametrize(("kind", "action", "role", "status"), MATRIX)
def test_route_by_role(client, kind, action, role, status):
    room_id = SEEDS[kind]()
    actor = "dora" if (kind, role) == ("direct", "member") else ACTORS[role]
    other = "dan" if kind == "direct" else "meg"
    method, path, body = ACTIONS[action](room_id, actor, other)

    response = send(client, method, path, actor, body)

    assert response.status_code == status, response.content
    if status != 200:
        code = ErrorCode.ROOM_FORBIDDEN if status == 404 else ErrorCode.NOT_ALLOWED
        assert response.json() == {
            "error_code": code,
            "message": ERROR_MESSAGES[code],
            "details": None,
        }


def test_rooms_list_and_create_by_role(client):
    """The two room routes that name no room: every signed-in user has a list and may make
    rooms (their own)."""
    seed_private()
    for uid, rooms in (("olive", 1), ("mel", 1), ("bert", 0), ("nick", 0)):
        response = send(client, "GET", "/api/v1/rooms", uid)
        assert response.status_code == 200 and len(response.json()) == rooms, uid
    created = send(client, "POST", "/api/v1/rooms", "nick", {"name": "Mine", "kind": "private"})
    assert created.status_code == 201


# --- what the routes answer -------------------------------------------------------------------


def test_create_private_room(client):
    response = send(
        client,
        "POST",
        "/api/v1/rooms",
        "alice",
        {"name": "  Sleep study  ", "kind": "private", "members": ["bob", "carol"]},
    )
    assert response.status_code == 201
    room = response.json()
    assert ROOM_ID_RE.fullmatch(room["room_id"])
    assert not room["room_id"].startswith(HEALTH_ROOM_PREFIX)
    assert room == {
        "room_id": room["room_id"],
        "name": "Sleep study",
        "kind": "private",
        "role": "owner",
        "muted": False,
        "unread_count": 0,
        "last_read_seq": None,
        "last_message": None,
    }
    roles = dict(RoomMember.objects.filter(room_id=room["room_id"]).values_list("user_id", "role"))
    assert roles == {"alice": "owner", "bob": "member", "carol": "member"}
    # Another room, another opaque id.
    again = send(
        client, "POST", "/api/v1/rooms", "alice", {"name": "Sleep study", "kind": "private"}
    )
    assert again.json()["room_id"] != room["room_id"]


def test_rooms_list_entries(client):
    private = seed_private()
    direct, _ = room_direct_open(user_id="mel", other_user_id="dan")
    ChatUser.objects.create(user_id="dan", username="Dan D.")
    seed_public()
    ChatMessage.objects.create(room_id=private, user_id="olive", username="Olive", content="hi")
    Room.objects.create(name=f"{HEALTH_ROOM_PREFIX}mel", kind=RoomKind.PERSONAL)
    RoomMember.objects.create(room_id=f"{HEALTH_ROOM_PREFIX}mel", user_id="mel", role="owner")

    rooms = send(client, "GET", "/api/v1/rooms", "mel").json()

    # The room with the latest message first, then the others, last joined first; the
    # personal room is never listed.
    assert [room["room_id"] for room in rooms] == [private, "town-square", direct["room_id"]]
    by_id = {room["room_id"]: room for room in rooms}
    assert by_id[private]["last_message"]["content"] == "hi"
    assert by_id[private]["last_message"]["type"] == "message"
    assert by_id[private]["role"] == "member"
    assert by_id[direct["room_id"]]["name"] == "Dan D."
    assert by_id[direct["room_id"]]["kind"] == "direct"
    assert by_id["town-square"]["name"] == "Town square"
    # The direct room as dan sees it: named after mel, who has no user row yet (no socket
    # so far): the name a token without one would give.
    (for_dan,) = send(client, "GET", "/api/v1/rooms", "dan").json()
    assert for_dan["name"] == "User_mel"
    # bert is banned from the public room: not in his list.
    assert [room["room_id"] for room in send(client, "GET", "/api/v1/rooms", "bert").json()] == []


def test_public_rooms(client):
    seed_public()
    room_create(room_id="closed-hall", kind=RoomKind.PUBLIC)
    Room.objects.filter(pk="closed-hall").update(is_closed=True)
    seed_private()

    (room,) = send(client, "GET", "/api/v1/rooms?kind=public", "nick").json()
    assert room == {
        "room_id": "town-square",
        "name": "Town square",
        "kind": "public",
        "description": "",
        "member_count": 4,  # olive, mona, mel, meg; bert's ban does not count
        "is_member": False,
    }
    assert send(client, "GET", "/api/v1/rooms?kind=public", "mel").json()[0]["is_member"] is True
    assert send(client, "GET", "/api/v1/rooms?kind=public", "bert").json() == []
    for kind in ("private", "", "PUBLIC", "direct"):
        response = send(client, "GET", f"/api/v1/rooms?kind={kind}", "nick")
        assert response.status_code == 400
        assert response.json()["error_code"] == "INVALID_REQUEST"


def test_member_entries(client):
    room_id = seed_private()
    added = send(client, "PUT", members_url(room_id, "newt"), "mona", b"")
    assert added.status_code == 200
    assert added.json() == {
        "room_id": room_id,
        "user_id": "newt",
        "role": "member",
        "muted": False,
        "banned": False,
    }
    # Putting it again changes nothing.
    assert send(client, "PUT", members_url(room_id, "newt"), "mona", {}).json() == added.json()
    promoted = send(client, "PUT", members_url(room_id, "newt"), "olive", {"role": "owner"})
    assert promoted.json()["role"] == "owner"
    muted = send(client, "PATCH", membership_url(room_id), "newt", {"muted": True})
    assert muted.json() == {**added.json(), "role": "owner", "muted": True}
    assert RoomMember.objects.get(room_id=room_id, user_id="newt").muted is True
    removed = send(client, "DELETE", members_url(room_id, "mel"), "mona")
    assert removed.status_code == 200
    assert removed.json() == {
        "room_id": room_id,
        "user_id": "mel",
        "removed": True,
        "sockets_closed": 0,
    }
    assert not RoomMember.objects.filter(room_id=room_id, user_id="mel").exists()


# --- hostile cases ----------------------------------------------------------------------------


@pytest.mark.parametrize("action", list(ACTIONS))
def test_a_private_room_and_no_room_answer_alike(client, action):
    room_id = seed_private()
    answers = []
    for room in (room_id, "no-such-room", "bad room!"):
        method, path, body = ACTIONS[action](room, "nick", "meg")
        response = send(client, method, path, "nick", body)
        answers.append((response.status_code, response.content, sorted(response.headers)))
    assert answers[0] == answers[1] == answers[2]
    assert answers[0][0] == 404


def test_moderators_cannot_remove_owners_or_make_moderators(client):
    room_id = seed_private()
    assert send(client, "DELETE", members_url(room_id, "olive"), "mona").status_code == 403
    for role in ("moderator", "owner"):
        assert (
            send(client, "PUT", members_url(room_id, "meg"), "mona", {"role": role}).status_code
            == 403
        )
        assert (
            send(client, "PUT", members_url(room_id, "newt"), "mona", {"role": role}).status_code
            == 403
        )
    assert RoomMember.objects.get(room_id=room_id, user_id="olive").role == "owner"
    assert RoomMember.objects.get(room_id=room_id, user_id="meg").role == "member"
    assert not RoomMember.objects.filter(room_id=room_id, user_id="newt").exists()
    # ... and cannot make themselves owner either.
    assert (
        send(client, "PUT", members_url(room_id, "mona"), "mona", {"role": "owner"}).status_code
        == 403
    )


def test_the_last_owner_cannot_leave_or_be_demoted(client):
    room_id = seed_private()
    assert send(client, "DELETE", members_url(room_id, "olive"), "olive").status_code == 403
    demote = send(client, "PUT", members_url(room_id, "olive"), "olive", {"role": "member"})
    assert demote.status_code == 403
    # Once another owner is named, the first may step down or leave.
    assert (
        send(client, "PUT", members_url(room_id, "mona"), "olive", {"role": "owner"}).status_code
        == 200
    )
    assert demote.json()["error_code"] == "NOT_ALLOWED"
    demoted = send(client, "PUT", members_url(room_id, "olive"), "olive", {"role": "member"})
    assert demoted.status_code == 200 and demoted.json()["role"] == "member"
    assert send(client, "DELETE", members_url(room_id, "mona"), "mona").status_code == 403
    assert send(client, "DELETE", members_url(room_id, "olive"), "olive").status_code == 200


def test_direct_room_is_one_per_pair(client):
    first = send(client, "POST", "/api/v1/rooms/direct", "alice", {"user_id": "bob"})
    assert first.status_code == 201
    again = send(client, "POST", "/api/v1/rooms/direct", "alice", {"user_id": "bob"})
    assert again.status_code == 200
    other_side = send(client, "POST", "/api/v1/rooms/direct", "bob", {"user_id": "alice"})
    assert other_side.status_code == 200
    room_id = first.json()["room_id"]
    assert again.json()["room_id"] == other_side.json()["room_id"] == room_id
    assert first.json()["kind"] == "direct" and first.json()["role"] == "member"
    assert Room.objects.filter(kind=RoomKind.DIRECT).count() == 1
    members = set(RoomMember.objects.filter(room_id=room_id).values_list("user_id", "role"))
    assert members == {("alice", "member"), ("bob", "member")}
    for uid in ("alice", "AI", "", "x" * 129, "two\nlines"):
        refused = send(client, "POST", "/api/v1/rooms/direct", "alice", {"user_id": uid})
        assert refused.status_code == 400, uid
        assert refused.json()["error_code"] == "INVALID_REQUEST"
    # Nobody adds to or removes from it, its members included.
    assert send(client, "PUT", members_url(room_id, "carol"), "alice").status_code == 403
    assert send(client, "DELETE", members_url(room_id, "bob"), "alice").status_code == 403
    assert send(client, "DELETE", members_url(room_id, "alice"), "alice").status_code == 403


def test_direct_room_race_reads_the_winner(monkeypatch):
    """Two first calls at once: the loser's insert hits the unique pair and it re-reads."""
    winner, _ = room_direct_open(user_id="bob", other_user_id="alice")
    from chat import membership

    real_filter = Room.objects.filter
    calls = []

    def miss_once(*args, **kwargs):
        # The loser looked before the winner's commit: it saw no room.
        if "direct_pair" in kwargs and not calls:
            calls.append(1)
            return real_filter(pk="nothing-here")
        return real_filter(*args, **kwargs)

    monkeypatch.setattr(membership.Room.objects, "filter", miss_once)
    room, created = room_direct_open(user_id="alice", other_user_id="bob")
    assert (room["room_id"], created) == (winner["room_id"], False)


def test_removal_from_a_public_room_is_a_ban(client):
    room_id = seed_public()
    assert send(client, "DELETE", members_url(room_id, "meg"), "mona").status_code == 200
    row = RoomMember.objects.get(room_id=room_id, user_id="meg")
    assert row.banned
    with pytest.raises(Refused) as refused:
        room_authorize(user_id="meg", room_id=room_id, action=Action.JOIN)
    assert refused.value.code == ErrorCode.ROOM_FORBIDDEN
    assert send(client, "GET", users_url(room_id), "meg").status_code == 404
    # A manager adds her again: the ban is lifted.
    lifted = send(client, "PUT", members_url(room_id, "meg"), "mona")
    assert lifted.status_code == 200 and lifted.json()["banned"] is False
    room_authorize(user_id="meg", room_id=room_id, action=Action.JOIN)
    # Leaving a public room is no ban: the row goes, joining again is allowed.
    assert send(client, "DELETE", members_url(room_id, "mel"), "mel").status_code == 200
    assert not RoomMember.objects.filter(room_id=room_id, user_id="mel").exists()
    room_authorize(user_id="mel", room_id=room_id, action=Action.JOIN)
    # A user who never joined can be banned in advance.
    assert send(client, "DELETE", members_url(room_id, "troll"), "mona").status_code == 200
    with pytest.raises(Refused):
        room_authorize(user_id="troll", room_id=room_id, action=Action.JOIN)


BAD_BODIES = [
    ("POST", "/api/v1/rooms", b"{"),
    ("POST", "/api/v1/rooms", b"\xff\xfe"),
    ("POST", "/api/v1/rooms", b'{"name": NaN, "kind": "private"}'),
    ("POST", "/api/v1/rooms", b"[]"),
    ("POST", "/api/v1/rooms", b""),
    ("POST", "/api/v1/rooms", {"name": "x"}),
    ("POST", "/api/v1/rooms", {"name": "x", "kind": "public"}),
    ("POST", "/api/v1/rooms", {"name": "x", "kind": "group"}),
    ("POST", "/api/v1/rooms", {"name": 5, "kind": "private"}),
    ("POST", "/api/v1/rooms", {"name": "", "kind": "private"}),
    ("POST", "/api/v1/rooms", {"name": "   ", "kind": "private"}),
    ("POST", "/api/v1/rooms", {"name": "x" * 101, "kind": "private"}),
    ("POST", "/api/v1/rooms", {"name": "a\x00b", "kind": "private"}),
    ("POST", "/api/v1/rooms", {"name": "x", "kind": "private", "members": "bob"}),
    ("POST", "/api/v1/rooms", {"name": "x", "kind": "private", "members": [1]}),
    ("POST", "/api/v1/rooms", {"name": "x", "kind": "private", "members": ["AI"]}),
    ("POST", "/api/v1/rooms", {"name": "x", "kind": "private", "members": ["alice"]}),
    ("POST", "/api/v1/rooms", {"name": "x", "kind": "private", "members": ["b", "b"]}),
    ("POST", "/api/v1/rooms/direct", {}),
    ("POST", "/api/v1/rooms/direct", {"user_id": 7}),
    ("PUT", "MEMBER", {"role": "admin"}),
    ("PUT", "MEMBER", {"role": 1}),
    ("PUT", "MEMBER", b"null"),
    ("PATCH", "MEMBERSHIP", {"muted": "yes"}),
    ("PATCH", "MEMBERSHIP", {"muted": 1}),
    ("PATCH", "MEMBERSHIP", {}),
    ("PATCH", "MEMBERSHIP", b""),
]


@pytest.mark.parametrize(("method", "path", "body"), BAD_BODIES)
def test_malformed_bodies_are_invalid_requests(client, method, path, body):
    room_id = seed_private()
    path = {"MEMBER": members_url(room_id, "meg"), "MEMBERSHIP": membership_url(room_id)}.get(
        path, path
    )
    actor = "olive" if path != "/api/v1/rooms" else "alice"
    response = send(client, method, path, actor, body)
    assert response.status_code == 400, response.content
    error = response.json()
    assert error["error_code"] == "INVALID_REQUEST"
    assert error["message"] == "Invalid request"
    assert error["details"]["errors"], error
    assert set(error["details"]["errors"][0]) == {"loc", "msg", "type"}


def test_bad_uids_in_the_path_are_invalid_requests(client):
    room_id = seed_private()
    for uid in ("AI", "x" * 129):
        for method in ("PUT", "DELETE"):
            response = send(client, method, members_url(room_id, uid), "olive")
            assert response.status_code == 400, (method, uid)


ROUTES = [
    ("GET", "/api/v1/rooms"),
    ("POST", "/api/v1/rooms"),
    ("POST", "/api/v1/rooms/direct"),
    ("PUT", "/api/v1/rooms/any/members/bob"),
    ("DELETE", "/api/v1/rooms/any/members/bob"),
    ("PATCH", "/api/v1/rooms/any/membership"),
    ("GET", "/api/v1/ws/chat/stats"),
    ("GET", "/api/v1/ws/chat/users/any"),
]


CREDENTIALS = {
    "none": (None, "AUTH_REQUIRED"),
    "empty bearer": (lambda: "Bearer ", "AUTH_REQUIRED"),
    "basic": (lambda: "Basic abc", "AUTH_REQUIRED"),
    "garbage": (lambda: "Bearer garbage", "AUTH_INVALID"),
    "expired": (lambda: f"Bearer {token_for('alice', lifetime=-3600)}", "AUTH_INVALID"),
    "the assistant's uid": (lambda: f"Bearer {token_for('AI')}", "AUTH_INVALID"),
}


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize("credential", list(CREDENTIALS))
def test_every_route_needs_a_valid_token(client, method, path, credential):
    make_header, code = CREDENTIALS[credential]
    header = make_header() if make_header else None
    headers = {"Authorization": header} if header else {}
    response = send(client, method, path, None, {"name": "x", "kind": "private"}, **headers)
    assert response.status_code == 401
    assert response.json() == {"error_code": code, "message": ERROR_MESSAGES[code], "details": None}
    assert response["WWW-Authenticate"] == "Bearer"
    secret = (header or "").partition(" ")[2].strip()
    assert not secret or secret.encode() not in response.content


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("DELETE", "/api/v1/rooms"),
        ("GET", "/api/v1/rooms/direct"),
        ("GET", "/api/v1/rooms/any/members/bob"),
        ("POST", "/api/v1/rooms/any/members/bob"),
        ("PUT", "/api/v1/rooms/any/membership"),
        ("POST", "/api/v1/ws/chat/stats"),
        ("DELETE", "/api/v1/ws/chat/users/any"),
    ],
)
def test_wrong_methods_are_json_405(client, method, path):
    response = send(client, method, path, "alice")
    assert response.status_code == 405
    assert response.json()["error_code"] == "INVALID_REQUEST"
    assert response["Allow"] == ", ".join(response.json()["details"]["allowed_methods"])


def test_auth_unavailable_is_503(client, monkeypatch):
    from chat import auth
    from chat.protocol import Close

    def unavailable(token):
        raise auth.AuthFailure(Close.AUTH_UNAVAILABLE)

    monkeypatch.setattr("chat.http.verify_token", unavailable)
    response = send(client, "GET", "/api/v1/rooms", "alice")
    assert response.status_code == 503
    assert response.json()["error_code"] == "AUTH_UNAVAILABLE"


def test_caps(client, settings):
    settings.CHAT_MAX_ROOMS_PER_USER = 1
    settings.CHAT_MAX_DIRECT_ROOMS_PER_USER = 1
    settings.CHAT_MAX_MEMBERS_PER_ROOM = 3
    body = {"name": "One", "kind": "private", "members": ["bob"]}
    room_id = send(client, "POST", "/api/v1/rooms", "alice", body).json()["room_id"]
    over = send(client, "POST", "/api/v1/rooms", "alice", body)
    assert over.status_code == 403
    assert over.json()["details"] == {"limit": "rooms_per_user", "max": 1}
    # Members: the request itself too large is a bad request; a full room is a refusal.
    too_many = {"name": "Two", "kind": "private", "members": ["b", "c", "d"]}
    assert send(client, "POST", "/api/v1/rooms", "bob", too_many).status_code == 400
    assert send(client, "PUT", members_url(room_id, "carol"), "alice").status_code == 200
    full = send(client, "PUT", members_url(room_id, "dave"), "alice")
    assert full.status_code == 403
    assert full.json()["details"] == {"limit": "members_per_room", "max": 3}
    # Direct rooms: counted for whoever opened them.
    assert (
        send(client, "POST", "/api/v1/rooms/direct", "alice", {"user_id": "bob"}).status_code == 201
    )
    direct = send(client, "POST", "/api/v1/rooms/direct", "alice", {"user_id": "carol"})
    assert direct.status_code == 403
    assert direct.json()["details"] == {"limit": "direct_rooms_per_user", "max": 1}
    assert (
        send(client, "POST", "/api/v1/rooms/direct", "carol", {"user_id": "alice"}).status_code
        == 201
    )


@contextmanager
def counted_queries() -> Iterator[list[str]]:
    """The SQL statements run meanwhile (CaptureQueriesContext relies on the debug query log,
    which chat.apps caps)."""
    statements: list[str] = []

    def record(execute, sql, params, many, context):
        statements.append(sql)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(record):
        yield statements


@pytest.mark.parametrize("rooms", [1, 20])
def test_rooms_list_is_one_query_whatever_the_number_of_rooms(client, rooms):
    for index in range(rooms):
        room = room_create_private(user_id="alice", name=f"Room {index}", members=["bob"])
        ChatMessage.objects.create(
            room_id=room["room_id"], user_id="bob", username="Bob", content=str(index)
        )
        room_direct_open(user_id="alice", other_user_id=f"friend{index}")
        room_create(room_id=f"public-{index}", kind=RoomKind.PUBLIC)
    with counted_queries() as queries:
        listed = rooms_of_user(user_id="alice")
    assert len(listed) == 2 * rooms
    # The memberships (rooms, last message ids, partners' names), then the last messages.
    assert len(queries) == 2, queries
    with counted_queries() as queries:
        assert len(send(client, "GET", "/api/v1/rooms", "alice").json()) == 2 * rooms
    assert len(queries) == 2, queries
    with counted_queries() as queries:
        assert len(send(client, "GET", "/api/v1/rooms?kind=public", "alice").json()) == rooms
    assert len(queries) == 1, queries


# --- the HTTP companions ----------------------------------------------------------------------


def test_stats_is_for_operators(client, django_user_model):
    assert send(client, "GET", "/api/v1/ws/chat/stats", None).status_code == 401
    refused = send(client, "GET", "/api/v1/ws/chat/stats", "alice")
    assert refused.status_code == 403
    assert refused.json()["error_code"] == "NOT_ALLOWED"
    not_true = client.get("/api/v1/ws/chat/stats", headers=auth("alice", clarity_staff="true"))
    assert not_true.status_code == 403
    allowed = client.get("/api/v1/ws/chat/stats", headers=auth("olga", clarity_staff=True))
    assert allowed.status_code == 200
    assert allowed.json() == {"total_users": 0, "total_connections": 0, "rooms": {}}
    # Django staff signed in to the admin need no token; other signed-in users do.
    user = django_user_model.objects.create_user("someone", password="pw")
    client.force_login(user)
    assert client.get("/api/v1/ws/chat/stats").status_code == 401
    user.is_staff = True
    user.save()
    assert client.get("/api/v1/ws/chat/stats").status_code == 200


def test_room_users_for_those_who_may_read_the_room(client):
    room_id = seed_private()
    assert send(client, "GET", users_url(room_id), "mel").json() == {
        "room_id": room_id,
        "users": [],
    }
    for uid in ("nick", "bert"):
        response = send(client, "GET", users_url(room_id), uid)
        assert response.status_code == 404
        assert response.json()["error_code"] == "ROOM_FORBIDDEN"
    for bad in ("bad room", "x" * 65):
        assert send(client, "GET", users_url(bad), "mel").json()["error_code"] == "ROOM_FORBIDDEN"


# --- operators: createroom and the admin ------------------------------------------------------


def test_createroom_command():
    out = io.StringIO()
    call_command("createroom", "lobby", "--kind", "public", "--name", "Lobby", stdout=out)
    assert "Created public room lobby" in out.getvalue()
    room = Room.objects.get(pk="lobby")
    assert (room.kind, room.title) == ("public", "Lobby")
    call_command("createroom", "lobby", "--if-missing", stdout=out)
    assert "exists" in out.getvalue()
    with pytest.raises(CommandError, match="exists"):
        call_command("createroom", "lobby")
    call_command("createroom", "team", "--kind", "private", "--owner", "olive", stdout=out)
    assert RoomMember.objects.get(room_id="team").role == "owner"
    assert rooms_of_user(user_id="olive")[0]["room_id"] == "team"
    for bad in ("bad room", f"{HEALTH_ROOM_PREFIX}x", "x" * 65):
        with pytest.raises(CommandError):
            call_command("createroom", bad)
    with pytest.raises(CommandError):
        call_command("createroom", "x", "--owner", "AI")


@pytest.fixture
def admin_client_logged_in(client, django_user_model):
    client.force_login(django_user_model.objects.create_superuser("admin", "a@b.c", "pw"))
    return client


def room_form(room: Room, members: list[dict], **changes) -> dict:
    """The admin's change form for a room, with its membership inline."""
    data = {
        "name": room.name,
        "kind": room.kind,
        "title": room.title,
        "description": room.description,
        "assistant_mode": room.assistant_mode,
        "max_users": room.max_users or "",
        "created_at_0": room.created_at.strftime("%Y-%m-%d"),
        "created_at_1": room.created_at.strftime("%H:%M:%S"),
        "members-TOTAL_FORMS": len(members),
        "members-INITIAL_FORMS": sum(1 for member in members if member.get("id")),
        "members-MIN_NUM_FORMS": 0,
        "members-MAX_NUM_FORMS": 1000,
        **changes,
    }
    if room.is_closed:
        data["is_closed"] = "on"
    for index, member in enumerate(members):
        for key, value in member.items():
            if value is True:
                value = "on"
            if value is not False:
                data[f"members-{index}-{key}"] = value
        data[f"members-{index}-room"] = room.name
    return data


def inline_rows(room_id: str) -> list[dict]:
    return [
        {"id": m.pk, "user_id": m.user_id, "role": m.role, "muted": m.muted, "banned": m.banned}
        for m in RoomMember.objects.filter(room_id=room_id).order_by("pk")
    ]


def test_admin_creates_public_rooms_and_checks_ids(admin_client_logged_in):
    client = admin_client_logged_in
    room = Room(name="plaza", kind=RoomKind.PUBLIC, title="Plaza")
    response = client.post("/admin/chat/room/add/", room_form(room, []))
    assert response.status_code == 302, response.content
    assert Room.objects.get(pk="plaza").kind == "public"
    for bad_id, kind in (("bad room", "public"), (f"{HEALTH_ROOM_PREFIX}x", "public")):
        response = client.post("/admin/chat/room/add/", room_form(Room(name=bad_id, kind=kind), []))
        assert response.status_code == 200 and not Room.objects.filter(pk=bad_id).exists()
    for kind in ("direct", "personal"):
        response = client.post("/admin/chat/room/add/", room_form(Room(name="r", kind=kind), []))
        assert response.status_code == 200 and not Room.objects.filter(pk="r").exists()


def test_admin_edits_memberships_through_the_services(admin_client_logged_in):
    client = admin_client_logged_in
    room_id = seed_private()
    room = Room.objects.get(pk=room_id)
    rows = inline_rows(room_id)
    for row in rows:
        if row["user_id"] == "mel":
            row["role"] = "moderator"
        if row["user_id"] == "meg":
            row["DELETE"] = True
        if row["user_id"] == "bert":
            row["banned"] = False  # lift the ban
        if row["user_id"] == "mona":
            row["muted"] = True
    rows.append({"user_id": "newt", "role": "member", "muted": False, "banned": True})
    page = client.get(f"/admin/chat/room/{room_id}/change/")
    assert page.status_code == 200 and b"members-TOTAL_FORMS" in page.content
    response = client.post(f"/admin/chat/room/{room_id}/change/", room_form(room, rows))
    assert response.status_code == 302, response.content.decode()[-3000:]
    state = {
        m.user_id: (m.role, m.muted, m.banned) for m in RoomMember.objects.filter(room_id=room_id)
    }
    assert state == {
        "olive": ("owner", False, False),
        "mona": ("moderator", True, False),
        "mel": ("moderator", False, False),
        "bert": ("member", False, False),
        "newt": ("member", False, True),
    }


# --- removal closes the removed user's sockets ------------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_removal_answers_once_the_sockets_are_closed(clients):
    room = await sync_to_async(room_create_private)(
        user_id="alice", name="Care team", members=["bob"]
    )
    room_id = room["room_id"]
    alice = await clients.join(room_id, "alice", "Alice", public_room=False)
    bob_sockets = [await clients.join(room_id, "bob", "Bob", public_room=False) for _ in range(2)]
    bob_elsewhere = await clients.join("lobby", "bob", "Bob")
    await alice.recv_type("user_joined")
    frames: list[list] = [[], []]
    watchers = [
        asyncio.create_task(act_as_daphne(sock, seen))
        for sock, seen in zip(bob_sockets, frames, strict=True)
    ]

    response = await AsyncClient().delete(members_url(room_id, "bob"), headers=auth("alice"))

    # By the time the answer arrives, both sockets were told and closed, their sessions ended.
    assert [len(seen) for seen in frames] == [2, 2]
    for error, close in frames:
        assert error["type"] == "error" and error["error_code"] == "ROOM_FORBIDDEN"
        assert close == {"type": "websocket.close", "code": 4004, "reason": "Room not found"}
    assert response.status_code == 200
    assert response.json() == {
        "room_id": room_id,
        "user_id": "bob",
        "removed": True,
        "sockets_closed": 2,
    }
    still_open = ChatSession.objects.filter(
        room_id=room_id, user_id="bob", disconnected_at__isnull=True
    )
    assert not await sync_to_async(still_open.exists)()
    await asyncio.gather(*watchers)
    # Others in the room see bob leave; bob's socket in another room stays.
    assert (await alice.recv_type("user_left"))["user_id"] == "bob"
    await bob_elsewhere.send({"type": "heartbeat"})
    assert (await bob_elsewhere.recv_type("heartbeat_ack"))["type"] == "heartbeat_ack"
    # And he cannot come back.
    refused = await clients.open(room_id, token=token_for("bob"))
    await refused.expect_refusal("ROOM_FORBIDDEN", 4004)


@pytest.mark.django_db(transaction=True)
async def test_removal_answers_after_the_revoke_timeout_if_a_socket_stays(clients, settings):
    settings.CHAT_REVOKE_TIMEOUT = 0.3
    room = await sync_to_async(room_create_private)(
        user_id="alice", name="Care team", members=["bob"]
    )
    bob = await clients.join(room["room_id"], "bob", public_room=False)
    # Nobody plays daphne's part: the socket's session never ends.
    response = await AsyncClient().delete(
        members_url(room["room_id"], "bob"), headers=auth("alice")
    )
    assert response.status_code == 200 and response.json()["sockets_closed"] == 0
    await bob.expect_refusal("ROOM_FORBIDDEN", 4004)


@pytest.mark.django_db(transaction=True)
async def test_admin_ban_closes_the_users_sockets(clients):
    from django.contrib.auth import get_user_model

    room_id = await sync_to_async(seed_public)()
    mel = await clients.join(room_id, "mel", public_room=False)
    frames: list = []
    watcher = asyncio.create_task(act_as_daphne(mel, frames))
    admin = await sync_to_async(get_user_model().objects.create_superuser)("admin", "a@b.c", "pw")
    http = AsyncClient()
    await sync_to_async(http.force_login)(admin)

    @sync_to_async
    def ban_form() -> dict:
        rows = inline_rows(room_id)
        for row in rows:
            row["banned"] = row["banned"] or row["user_id"] == "mel"
        return room_form(Room.objects.get(pk=room_id), rows)

    response = await http.post(f"/admin/chat/room/{room_id}/change/", await ban_form())

    assert response.status_code == 302
    assert frames[0]["error_code"] == "ROOM_FORBIDDEN" and frames[1]["code"] == 4004
    await watcher
    member = await sync_to_async(RoomMember.objects.get)(room_id=room_id, user_id="mel")
    assert member.banned
    refused = await clients.open(room_id, token=token_for("mel"))
    await refused.expect_refusal("ROOM_FORBIDDEN", 4004)


@pytest.mark.django_db(transaction=True)
async def test_leaving_closes_ones_own_sockets_in_the_room(clients):
    room = await sync_to_async(room_create_private)(
        user_id="alice", name="Care team", members=["bob"]
    )
    bob = await clients.join(room["room_id"], "bob", public_room=False)
    frames: list = []
    watcher = asyncio.create_task(act_as_daphne(bob, frames))
    response = await AsyncClient().delete(members_url(room["room_id"], "bob"), headers=auth("bob"))
    assert response.status_code == 200 and response.json()["sockets_closed"] == 1
    assert frames[0]["error_code"] == "ROOM_FORBIDDEN" and frames[1]["code"] == 4004
    await watcher
