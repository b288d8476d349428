"""What the HTTP views share (protocol §8, §11): Bearer authentication and JSON errors.

Used by the HTTP companions (`chat.views`) and the rooms API (`chat.api`), so both answer an
unauthenticated request the same way. Tokens come only from the `Authorization` header (a
query string ends up in access logs) and are never echoed or logged.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, JsonResponse

from chat.auth import AuthFailure, Identity, bearer_credential, verify_token
from chat.protocol import ERROR_MESSAGES, Close, ErrorCode

# The status of each authentication refusal (by its WebSocket close).
_AUTH_STATUS = {Close.NO_TOKEN: 401, Close.INVALID_TOKEN: 401, Close.AUTH_UNAVAILABLE: 503}


class HttpError(Exception):
    """A request refused before or outside the services: answered as a JSON error."""

    def __init__(self, status: int, code: ErrorCode, details: dict[str, Any] | None = None):
        super().__init__(code)
        self.status = status
        self.code = code
        self.details = details

    def response(self) -> JsonResponse:
        return error_response(self.status, self.code, self.details)


def error_response(
    status: int, code: ErrorCode, details: dict[str, Any] | None = None
) -> JsonResponse:
    """`{error_code, message, details}`; a 401 also names the scheme (RFC 6750)."""
    body = {"error_code": str(code), "message": ERROR_MESSAGES[code], "details": details}
    response = JsonResponse(body, status=status)
    if status == 401:
        response["WWW-Authenticate"] = "Bearer"
    return response


def method_not_allowed(allowed: list[str]) -> JsonResponse:
    response = error_response(405, ErrorCode.INVALID_REQUEST, {"allowed_methods": allowed})
    response["Allow"] = ", ".join(allowed)
    return response


def request_identity(request: HttpRequest) -> Identity:
    """The caller, from a verified `Authorization: Bearer` token; HttpError 401
    (AUTH_REQUIRED, AUTH_INVALID) or 503 (AUTH_UNAVAILABLE) otherwise. Blocking (token
    verification): async views call it through `sync_to_async`."""
    token = bearer_credential(request.headers.get("Authorization", ""))
    try:
        if token is None:
            raise AuthFailure(Close.NO_TOKEN)
        return verify_token(token)
    except AuthFailure as refusal:
        raise HttpError(_AUTH_STATUS[refusal.close], refusal.close.value.error) from None
