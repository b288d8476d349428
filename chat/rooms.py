"""Room ids, their channel-layer groups, and who may join which room."""

from __future__ import annotations

from chat.protocol import HEALTH_ROOM_PREFIX, ROOM_ID_RE, Close


def room_group(room_id: str) -> str:
    """The channel-layer group of a room (room ids are valid group-name characters)."""
    return f"room.{room_id}"


def room_id_problem(*, room_id: str, user_id: str) -> Close | None:
    """Why this user may not open this room id, or None."""
    if not ROOM_ID_RE.fullmatch(room_id):
        return Close.INVALID_ROOM
    if room_id.startswith(HEALTH_ROOM_PREFIX) and room_id != f"{HEALTH_ROOM_PREFIX}{user_id}":
        return Close.INVALID_ROOM
    return None
