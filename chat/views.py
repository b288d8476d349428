"""HTTP companions of the chat (protocol §8): presence across all workers, Bearer token."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET

from chat.auth import AuthFailure, verify_token
from chat.protocol import ERROR_MESSAGES, ROOM_ID_RE, Close, ErrorCode
from chat.sessions import chat_stats, room_presence

_STATUS = {4001: 401, 4003: 401, 4013: 503}


def _auth_error(request: HttpRequest) -> JsonResponse | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    close = None
    if scheme.lower() != "bearer" or not token.strip():
        close = Close.NO_TOKEN
    else:
        try:
            verify_token(token.strip())
        except AuthFailure as refusal:
            close = refusal.close
    if close is None:
        return None
    code = close.value.error
    response = JsonResponse(
        {"error_code": str(code), "message": ERROR_MESSAGES[code]}, status=_STATUS[close.value.code]
    )
    response["WWW-Authenticate"] = "Bearer"
    return response


@require_GET
def stats(request: HttpRequest) -> JsonResponse:
    return _auth_error(request) or JsonResponse(chat_stats())


@require_GET
def room_users(request: HttpRequest, room_id: str) -> JsonResponse:
    if error := _auth_error(request):
        return error
    if not ROOM_ID_RE.fullmatch(room_id):
        code = ErrorCode.INVALID_ROOM
        return JsonResponse({"error_code": str(code), "message": ERROR_MESSAGES[code]}, status=404)
    return JsonResponse({"room_id": room_id, "users": room_presence(room_id=room_id)})
