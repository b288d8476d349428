"""HTTP companions of the chat (protocol §8, §11): presence across all workers.

`/stats` is for operators: a token with the CHAT_STAFF_CLAIM claim, or Django staff signed in
to the admin. Anyone else signed in gets 403 NOT_ALLOWED (the route is public knowledge; the
refusal reveals nothing about any room). `/users/{room_id}` answers whoever `chat.access` lets
read the room, and 404 ROOM_FORBIDDEN to everyone else, whether the room exists or not.
"""

from __future__ import annotations

from typing import Any

from asgiref.sync import sync_to_async
from django.contrib import admin
from django.http import HttpRequest, JsonResponse

from chat.access import Action, room_authorize
from chat.api import endpoint
from chat.auth import Identity
from chat.http import HttpError, error_response, method_not_allowed, request_identity
from chat.protocol import ErrorCode
from chat.sessions import chat_stats, room_presence


def _operator(request: HttpRequest) -> bool:
    """Whether the caller is an operator; HttpError 401/503 if they are not signed in. Staff
    count as the admin counts them (with ADMIN_REQUIRE_2FA, signed in with their device)."""
    if admin.site.has_permission(request):
        return True
    return request_identity(request).staff


def stats(request: HttpRequest) -> JsonResponse:
    if request.method != "GET":
        return method_not_allowed(["GET"])
    try:
        if not _operator(request):
            return error_response(403, ErrorCode.NOT_ALLOWED)
    except HttpError as error:
        return error.response()
    return JsonResponse(chat_stats())


async def _room_users(request: HttpRequest, identity: Identity, room_id: str) -> tuple[int, Any]:
    def read() -> list[dict]:
        room_authorize(user_id=identity.user_id, room_id=room_id, action=Action.READ)
        return room_presence(room_id=room_id)

    return 200, {"room_id": room_id, "users": await sync_to_async(read)()}


# Method, Bearer token, room id and refusals answered as the rooms API answers them.
room_users = endpoint(GET=_room_users)
