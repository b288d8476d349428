"""The browser client: its page at `/`, and the development sign-in that hands it emulator
tokens.

The client itself is static (`chat/static/chat/`: ES modules, no build step). It recovers by
the rooms' sequence numbers (protocol §15, `connection.js`): it shows messages in seq order,
each once; fetches `history` `after_seq` (pages of `historyMaxLimit`) after a reconnect, on
`resync`, and when a gap in the seqs is still open a second after it opened; and sends again,
with the same client `message_id`, a message whose echo had not come when the socket dropped.
How it signs in depends on the server's mode:

- emulator mode with DEBUG (the embedded default): a "Dev sign-in" form posts a name to
  `/dev/token`, which answers an emulator token for a uid derived from that name;
- real Firebase with `FIREBASE_WEB_API_KEY` set: Google sign-in through the Firebase JS SDK,
  loaded from `FIREBASE_JS_SDK_URL`;
- otherwise the page says that sign-in is not configured.
"""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.template.loader import render_to_string
from django.templatetags.static import static
from django.urls import reverse
from django.utils.text import slugify
from django.views.decorators.csrf import csrf_exempt, csrf_protect
from django.views.decorators.http import require_GET, require_POST

from chat.auth import emulator_mode
from chat.devtokens import emulator_token
from chat.protocol import AI_USER_ID, CONTENT_MAX_CHARS, HISTORY_MAX_LIMIT, ROOM_ID_RE, Close
from chat.replies import MENTION

DEV_NAME_MAX_CHARS = 50
DEV_TOKEN_LIFETIME = 3600
SAMPLE_DATA = "chat/sample-health.json"

# What a client does after each of the server's closes (protocol §10's "client should", §16).
# A close in none of these groups (idle timeout 1000, shutdown 4012, unavailable 4013) is
# retried with backoff, then the client catches up with `history` `after_seq`.
CLIENT_CLOSES: dict[str, tuple[Close, ...]] = {
    # not retried: a room the user may not (or no longer) be in, too many sockets, an operator
    "final": (
        Close.INVALID_ROOM,
        Close.ROOM_FORBIDDEN,
        Close.ROOM_CLOSED,
        Close.ROOM_FULL,
        Close.TOO_MANY_CONNECTIONS,
        Close.SESSION_TERMINATED,
    ),
    # of those, the room refusals: back to the rooms list
    "roomRefused": (Close.INVALID_ROOM, Close.ROOM_FORBIDDEN, Close.ROOM_CLOSED, Close.ROOM_FULL),
    # a new token, then reconnect
    "auth": (Close.NO_TOKEN, Close.INVALID_TOKEN, Close.TOKEN_EXPIRED, Close.USER_ID_MISMATCH),
    # back off: the longest wait before reconnecting
    "rateLimited": (Close.RATE_LIMITED,),
    # the socket fell behind its rooms: reconnect, then `history` `after_seq`
    "slow": (Close.SLOW_CONSUMER,),
}


def dev_sign_in_enabled() -> bool:
    return settings.DEBUG and emulator_mode()


def firebase_sign_in_enabled() -> bool:
    return not emulator_mode() and bool(settings.FIREBASE_WEB_API_KEY)


def web_push_config() -> dict[str, str] | None:
    """What the page and its service worker need for web push, if it is configured (with
    Firebase sign-in): the Firebase web app's options and the VAPID key."""
    if not firebase_sign_in_enabled():
        return None
    key, sender, app = (
        settings.FIREBASE_WEB_PUSH_KEY,
        settings.FIREBASE_MESSAGING_SENDER_ID,
        settings.FIREBASE_APP_ID,
    )
    if not (key and sender and app):
        return None
    return {
        "vapidKey": key,
        "messagingSenderId": sender,
        "appId": app,
        "serviceWorker": reverse("push-service-worker"),
    }


def dev_uid(name: str) -> str:
    """The same name always signs in as the same user ("Ana" and "ana" included)."""
    slug = slugify(name, allow_unicode=True)
    return f"dev-{slug}" if slug else ""


def client_config() -> dict[str, Any]:
    """What the page's script needs to know, rendered with `json_script`."""
    if dev_sign_in_enabled():
        sign_in: dict[str, Any] = {"method": "dev", "tokenUrl": reverse("dev-token")}
    elif firebase_sign_in_enabled():
        sign_in = {
            "method": "firebase",
            "sdkUrl": settings.FIREBASE_JS_SDK_URL.rstrip("/"),
            "apiKey": settings.FIREBASE_WEB_API_KEY,
            "authDomain": settings.FIREBASE_AUTH_DOMAIN,
            "projectId": settings.FIREBASE_PROJECT_ID,
            "webPush": web_push_config(),
        }
    else:
        sign_in = {"method": "none"}
    return {
        "signIn": sign_in,
        "socketPath": "/api/v1/ws/",
        # The rooms API (protocol §11): `rooms`, `rooms/direct` under it, Bearer token.
        "apiBase": "/api/v1/",
        "roomIdPattern": ROOM_ID_RE.pattern,
        "aiUserId": AI_USER_ID,
        "aiMention": MENTION,
        "maxMessageChars": CONTENT_MAX_CHARS,
        # the largest `history` page: the client's catch-up pages
        "historyMaxLimit": HISTORY_MAX_LIMIT,
        "closeCodes": {
            group: sorted({close.value.code for close in closes})
            for group, closes in CLIENT_CLOSES.items()
        },
        # seconds after which the server withdraws an unrefreshed is_typing:true
        "typingTimeout": settings.CHAT_TYPING_TIMEOUT,
        "sampleDataUrl": static(SAMPLE_DATA),
    }


@require_GET
def index(request: HttpRequest) -> HttpResponse:
    config = client_config()
    return render(
        request, "chat/index.html", {"config": config, "sign_in": config["signIn"]["method"]}
    )


@csrf_protect
@require_POST
def _dev_token(request: HttpRequest) -> JsonResponse:
    name = request.POST.get("name", "").strip()
    uid = dev_uid(name)
    if not uid or len(name) > DEV_NAME_MAX_CHARS:
        return JsonResponse(
            {"error": f"Enter a name of 1-{DEV_NAME_MAX_CHARS} characters with a letter or digit."},
            status=400,
        )
    return JsonResponse(
        {
            "token": emulator_token(uid=uid, name=name, lifetime=DEV_TOKEN_LIFETIME),
            "user_id": uid,
            "username": name,
        }
    )


# Exempt from the CSRF middleware only so that the mode check runs first: outside development
# the endpoint does not exist (404) whatever the request; in development `_dev_token` applies
# the CSRF check itself.
@csrf_exempt
def dev_token(request: HttpRequest) -> HttpResponse:
    """POST name=<display name> → {token, user_id, username}: an emulator token (1 hour)."""
    if not dev_sign_in_enabled():
        raise Http404
    return _dev_token(request)


@require_GET
def push_service_worker(request: HttpRequest) -> HttpResponse:
    """The page's service worker for web push (protocol §13), at the site's root so that it
    controls the whole site; 404 where web push is not configured. It shows the pushes FCM
    delivers while no page is open (the SDK does that from their `notification`), and a
    click opens the room named in their data."""
    push = web_push_config()
    if push is None:
        raise Http404
    options = {
        "apiKey": settings.FIREBASE_WEB_API_KEY,
        "authDomain": settings.FIREBASE_AUTH_DOMAIN,
        "projectId": settings.FIREBASE_PROJECT_ID,
        "messagingSenderId": push["messagingSenderId"],
        "appId": push["appId"],
    }
    sdk = settings.FIREBASE_JS_SDK_URL.rstrip("/")
    script = render_to_string(
        "chat/firebase-messaging-sw.js",
        {"sdk": json.dumps(sdk), "options": json.dumps(options)},
    )
    response = HttpResponse(script, content_type="text/javascript; charset=utf-8")
    response["Cache-Control"] = "no-cache"
    return response
