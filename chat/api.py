"""The rooms API (protocol §11): thin views over `chat.membership`.

Every URL is one `endpoint`: the handler of each of its methods, and around them, in this
order: a method it lacks → 405; Bearer authentication (`chat.http`) → 401 / 503; a room id in
the path that is no room id → 404 ROOM_FORBIDDEN, as for a room the caller may not see; the
JSON body, parsed strictly → 400 INVALID_REQUEST; then the service, whose refusals
(`chat.access.Refused`) become 404 ROOM_FORBIDDEN or 403 NOT_ALLOWED. Bad input is answered
before the rule is asked, the same whether or not the room exists, so a 400 reveals nothing.

CSRF: exempt, because nothing here rides on cookies. The caller is known only from the
`Authorization` header, which a browser never adds to a request on its own, and a cross-site
page cannot set it without a CORS preflight this server does not grant.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal, TypeVar

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from chat.access import Refused
from chat.auth import Identity
from chat.devices import TOKEN_PATTERN, device_register, device_remove, push_preferences
from chat.http import HttpError, error_response, method_not_allowed, request_identity
from chat.membership import (
    InvalidRequest,
    member_put,
    member_remove,
    membership_mute,
    public_rooms,
    room_create_private,
    room_direct_open,
    room_sockets_revoke,
    rooms_of_user,
)
from chat.models import RoomKind
from chat.protocol import ROOM_ID_RE, ErrorCode, FrameError, decode_json, validation_errors

Handler = Callable[..., Awaitable[tuple[int, Any]]]


# --- request bodies -------------------------------------------------------------------------


class Body(BaseModel):
    """A JSON request body: no type coercion; unknown keys ignored (as in frames, §5)."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class RoomCreateIn(Body):
    name: str
    kind: Literal["private"]
    members: list[str] = Field(default_factory=list)


class DirectRoomIn(Body):
    user_id: str


class MemberIn(Body):
    role: str | None = None  # which roles exist is chat.membership's check


class MembershipIn(Body):
    muted: bool


class DeviceIn(Body):
    token: Annotated[str, Field(pattern=TOKEN_PATTERN)]
    platform: Literal["android", "ios", "web"]


class DeviceRemoveIn(Body):
    token: Annotated[str, Field(pattern=TOKEN_PATTERN)]


class PushPreferencesIn(Body):
    previews: bool


def _invalid(msg: str, type_: str) -> InvalidRequest:
    return InvalidRequest({"errors": [{"loc": [], "msg": msg, "type": type_}]})


BodyT = TypeVar("BodyT", bound=Body)


def parse_body(request: HttpRequest, schema: type[BodyT], *, empty_ok: bool = False) -> BodyT:
    """The body as `schema`, or InvalidRequest: not UTF-8, not strict JSON (no NaN, no
    overflowing numbers), not an object, or not the schema. Its size is bounded by Django's
    DATA_UPLOAD_MAX_MEMORY_SIZE. `empty_ok`: no body at all is `{}`."""
    try:
        raw = request.body
    except RequestDataTooBig:
        raise _invalid("Body too large", "too_large") from None
    if not raw.strip() and empty_ok:
        data: Any = {}
    else:
        try:
            data = decode_json(raw.decode("utf-8"))
        except (UnicodeDecodeError, FrameError):
            raise _invalid("Body must be JSON", "json_invalid") from None
    if not isinstance(data, dict):
        raise _invalid("Body must be a JSON object", "dict_type")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequest({"errors": validation_errors(exc)}) from None


# --- the endpoint wrapper -------------------------------------------------------------------


def _refusal_response(refusal: Refused) -> JsonResponse:
    if refusal.code == ErrorCode.ROOM_FORBIDDEN:
        return error_response(404, ErrorCode.ROOM_FORBIDDEN)
    return error_response(403, refusal.code, getattr(refusal, "details", None))


def endpoint(**handlers: Handler):
    """The view of one URL: `handlers` by method, each `(request, identity, **url kwargs) ->
    (status, body)`; everything else (see the module's docstring) is done here."""
    allowed = sorted(handlers)

    @csrf_exempt
    async def view(request: HttpRequest, **kwargs: str) -> JsonResponse:
        handler = handlers.get(request.method or "")
        if handler is None:
            return method_not_allowed(allowed)
        try:
            identity = await sync_to_async(request_identity)(request)
            room_id = kwargs.get("room_id")
            if room_id is not None and not ROOM_ID_RE.fullmatch(room_id):
                raise Refused(ErrorCode.ROOM_FORBIDDEN)
            status, body = await handler(request, identity, **kwargs)
        except HttpError as error:
            return error.response()
        except InvalidRequest as error:
            return error_response(400, ErrorCode.INVALID_REQUEST, error.details)
        except Refused as refusal:
            return _refusal_response(refusal)
        return JsonResponse(body, status=status, safe=False)

    return view


# --- handlers -------------------------------------------------------------------------------


async def _rooms_list(request: HttpRequest, identity: Identity) -> tuple[int, Any]:
    kind = request.GET.get("kind")
    if kind is None:
        return 200, await sync_to_async(rooms_of_user)(user_id=identity.user_id)
    if kind == RoomKind.PUBLIC:
        return 200, await sync_to_async(public_rooms)(user_id=identity.user_id)
    raise InvalidRequest.at(["kind"], "must be public, or absent for your own rooms")


async def _room_create(request: HttpRequest, identity: Identity) -> tuple[int, Any]:
    body = parse_body(request, RoomCreateIn)
    room = await sync_to_async(room_create_private)(
        user_id=identity.user_id, name=body.name, members=list(body.members)
    )
    return 201, room


async def _direct_open(request: HttpRequest, identity: Identity) -> tuple[int, Any]:
    body = parse_body(request, DirectRoomIn)
    room, created = await sync_to_async(room_direct_open)(
        user_id=identity.user_id, other_user_id=body.user_id
    )
    return (201 if created else 200), room


async def _member_put(
    request: HttpRequest, identity: Identity, room_id: str, user_id: str
) -> tuple[int, Any]:
    body = parse_body(request, MemberIn, empty_ok=True)
    member = await sync_to_async(member_put)(
        actor_id=identity.user_id, room_id=room_id, user_id=user_id, role=body.role
    )
    return 200, member


async def _member_delete(
    request: HttpRequest, identity: Identity, room_id: str, user_id: str
) -> tuple[int, Any]:
    """Answers once the removed user's sockets in the room are closed (or the wait,
    CHAT_REVOKE_TIMEOUT, is over: `sockets_closed` then counts fewer than there were)."""
    channels = await sync_to_async(member_remove)(
        actor_id=identity.user_id, room_id=room_id, user_id=user_id
    )
    closed = await room_sockets_revoke(
        room_id=room_id, user_id=user_id, channels=channels, timeout=settings.CHAT_REVOKE_TIMEOUT
    )
    return 200, {"room_id": room_id, "user_id": user_id, "removed": True, "sockets_closed": closed}


async def _membership_patch(
    request: HttpRequest, identity: Identity, room_id: str
) -> tuple[int, Any]:
    body = parse_body(request, MembershipIn)
    member = await sync_to_async(membership_mute)(
        user_id=identity.user_id, room_id=room_id, muted=body.muted
    )
    return 200, member


rooms = endpoint(GET=_rooms_list, POST=_room_create)
direct_room = endpoint(POST=_direct_open)
room_member = endpoint(PUT=_member_put, DELETE=_member_delete)
room_membership = endpoint(PATCH=_membership_patch)


async def _device_post(request: HttpRequest, identity: Identity) -> tuple[int, Any]:
    """Register a push token (protocol §13); the answer never repeats it."""
    body = parse_body(request, DeviceIn)
    new = await sync_to_async(device_register)(
        user_id=identity.user_id, token=body.token, platform=body.platform
    )
    return (201 if new else 200), {"platform": body.platform, "registered": True}


async def _device_delete(request: HttpRequest, identity: Identity) -> tuple[int, Any]:
    """Remove one of the caller's push tokens, named in the body (never in the URL)."""
    body = parse_body(request, DeviceRemoveIn)
    removed = await sync_to_async(device_remove)(user_id=identity.user_id, token=body.token)
    return 200, {"removed": removed}


async def _push_get(request: HttpRequest, identity: Identity) -> tuple[int, Any]:
    return 200, await sync_to_async(push_preferences)(user_id=identity.user_id)


async def _push_patch(request: HttpRequest, identity: Identity) -> tuple[int, Any]:
    """Ask for (or stop) previews in push notifications (protocol §13)."""
    body = parse_body(request, PushPreferencesIn)
    return 200, await sync_to_async(push_preferences)(
        user_id=identity.user_id, previews=body.previews
    )


devices = endpoint(POST=_device_post, DELETE=_device_delete)
push_settings = endpoint(GET=_push_get, PATCH=_push_patch)
