"""Firebase Auth Emulator tokens for development, tests and the benchmark.

They are unsigned (`alg: none`) and accepted only when FIREBASE_AUTH_EMULATOR_HOST is set.
"""

from __future__ import annotations

import base64
import json
import time

from django.conf import settings


def _b64(data: dict) -> str:
    raw = json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def emulator_token(
    *,
    uid: str,
    name: str | None = None,
    email: str | None = None,
    lifetime: int = 3600,
    issued_at: int | None = None,
    project_id: str | None = None,
    claims: dict | None = None,
) -> str:
    """An ID token shaped like the Firebase Auth Emulator's; `claims`: custom claims, e.g.
    the operator claim (CHAT_STAFF_CLAIM)."""
    project = project_id or settings.FIREBASE_PROJECT_ID
    iat = int(time.time()) if issued_at is None else issued_at
    payload: dict = {
        **(claims or {}),
        "iss": f"https://securetoken.google.com/{project}",
        "aud": project,
        "auth_time": iat,
        "user_id": uid,
        "sub": uid,
        "iat": iat,
        "exp": iat + lifetime,
        "firebase": {"identities": {}, "sign_in_provider": "custom"},
    }
    if name is not None:
        payload["name"] = name
    if email is not None:
        payload["email"] = email
    return f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(payload)}."
