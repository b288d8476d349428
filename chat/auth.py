"""Who is on the other end of a socket: Firebase ID token extraction and verification.

Identity comes only from a verified token. Tokens are never logged.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

import firebase_admin
import google.auth.credentials
import google.auth.exceptions
from django.conf import settings
from firebase_admin import auth as firebase_auth
from firebase_admin import credentials, exceptions

from chat.protocol import AI_USER_ID, AI_USERNAME, Close

logger = logging.getLogger(__name__)

EMULATOR_ENV = "FIREBASE_AUTH_EMULATOR_HOST"

_app_lock = threading.Lock()


@dataclass(frozen=True)
class Identity:
    user_id: str
    username: str
    expires_at: datetime
    # An operator (the CHAT_STAFF_CLAIM claim is true): may read the HTTP companions' stats.
    staff: bool = False


class AuthFailure(Exception):
    """Authentication refused: the socket is told why (error frame) and closed."""

    def __init__(self, close: Close):
        super().__init__(close.name)
        self.close = close


def emulator_mode() -> bool:
    # The SDK decides from the process environment on every call; so do we, so the two
    # can never disagree about whether unsigned tokens are acceptable. Exactly the SDK's test
    # (any non-empty value, whitespace included): stripping here would let a blank-looking
    # value switch the SDK to accepting unsigned tokens while we skip exp/iat and E001.
    return os.environ.get(EMULATOR_ENV, "") != ""


def bearer_credential(authorization: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header's value; None if it is not one.
    (Sockets and the HTTP views, chat.http, read the header through this.)"""
    scheme, _, credential = authorization.partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        return None
    return credential.strip()


def token_from_scope(scope: dict[str, Any]) -> str | None:
    """The `token` query parameter, else an `Authorization: Bearer` header; None if neither."""
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    token = (query.get("token") or [""])[0].strip()
    if token:
        return token
    for name, value in scope.get("headers", []):
        if name.lower() == b"authorization" and (
            credential := bearer_credential(value.decode("latin-1"))
        ):
            return credential
    return None


class _AnonymousCredential(credentials.Base):
    """Verifying ID tokens needs only Google's public certificates, no service account."""

    def get_credential(self) -> google.auth.credentials.Credentials:
        return google.auth.credentials.AnonymousCredentials()


def firebase_app() -> firebase_admin.App:
    name = f"clarity-{settings.FIREBASE_PROJECT_ID}"
    with _app_lock:
        try:
            return firebase_admin.get_app(name)
        except ValueError:
            pass
        if settings.FIREBASE_CREDENTIALS:
            credential: credentials.Base = credentials.Certificate(settings.FIREBASE_CREDENTIALS)
        elif settings.FIREBASE_CHECK_REVOKED and not emulator_mode():
            credential = credentials.ApplicationDefault()
        else:
            credential = _AnonymousCredential()
        options = {
            "projectId": settings.FIREBASE_PROJECT_ID,
            "httpTimeout": settings.FIREBASE_HTTP_TIMEOUT,
        }
        return firebase_admin.initialize_app(credential, options, name=name)


def display_name(claims: dict[str, Any], user_id: str) -> str:
    """`name`, else `email`, else `User_` + 8 characters of the uid; never the assistant's
    name (in any case), which gets a suffix so nobody can pass for the assistant."""
    username = ""
    for claim in ("name", "email"):
        value = claims.get(claim)
        if isinstance(value, str) and value.strip():
            username = value.strip()
            break
    username = username or f"User_{user_id[:8]}"
    if _looks_like(username, AI_USERNAME):
        username = f"{username} (user)"
    return username


def _looks_like(name: str, reserved: str) -> bool:
    """Equal once compatibility forms (full-width letters), invisible format characters
    (zero-width spaces, joiners), spaces and case are set aside, or written with Greek or
    Cyrillic look-alikes of the Latin letters."""
    folded = unicodedata.normalize("NFKC", name)
    folded = "".join(
        char for char in folded if unicodedata.category(char) != "Cf" and not char.isspace()
    )
    folded = folded.casefold().translate(_CONFUSABLES)
    return folded == reserved.casefold()


# Greek and Cyrillic letters that render as the Latin a and i (after casefolding).
_CONFUSABLES = str.maketrans(
    {"\u03b1": "a", "\u0430": "a", "\u03b9": "i", "\u0456": "i", "\u04cf": "i", "\u026a": "i"}
)


def identity_from_claims(claims: dict[str, Any]) -> Identity:
    user_id = str(claims["sub"])
    if user_id == AI_USER_ID:
        raise AuthFailure(Close.INVALID_TOKEN)  # the assistant's uid is reserved
    return Identity(
        user_id=user_id,
        username=display_name(claims, user_id),
        expires_at=datetime.fromtimestamp(int(claims["exp"]), UTC),
        staff=claims.get(settings.CHAT_STAFF_CLAIM) is True,
    )


def _check_times(claims: dict[str, Any], skew: int) -> None:
    """exp/iat checks the SDK skips for emulator tokens."""
    now = time.time()
    exp, iat = claims.get("exp"), claims.get("iat")
    if not isinstance(exp, int | float) or isinstance(exp, bool) or exp + skew <= now:
        raise AuthFailure(Close.INVALID_TOKEN)
    if not isinstance(iat, int | float) or isinstance(iat, bool) or iat - skew > now:
        raise AuthFailure(Close.INVALID_TOKEN)


def verify_token(token: str) -> Identity:
    """Verify a Firebase ID token (blocking: certificate fetch, revocation lookup)."""
    skew = settings.FIREBASE_CLOCK_SKEW_SECONDS
    try:
        claims = firebase_auth.verify_id_token(
            token,
            app=firebase_app(),
            check_revoked=settings.FIREBASE_CHECK_REVOKED,
            clock_skew_seconds=skew,
        )
    except firebase_auth.CertificateFetchError:
        logger.warning("auth unavailable: could not fetch Google's token certificates")
        raise AuthFailure(Close.AUTH_UNAVAILABLE) from None
    except (
        firebase_auth.InvalidIdTokenError,  # includes expired and revoked
        firebase_auth.UserDisabledError,
        firebase_auth.UserNotFoundError,
        ValueError,
    ) as exc:
        logger.info("auth refused: %s", type(exc).__name__)
        raise AuthFailure(Close.INVALID_TOKEN) from None
    except (exceptions.FirebaseError, google.auth.exceptions.GoogleAuthError) as exc:
        # Firebase down, or no usable credentials for the revocation lookup.
        logger.warning("auth unavailable: %s", type(exc).__name__)
        raise AuthFailure(Close.AUTH_UNAVAILABLE) from None
    if emulator_mode():
        _check_times(claims, skew)
    return identity_from_claims(claims)


async def authenticate(token: str | None) -> Identity:
    """Verify off the event loop; raises AuthFailure with the close to use."""
    if not token:
        raise AuthFailure(Close.NO_TOKEN)
    return await asyncio.to_thread(verify_token, token)
