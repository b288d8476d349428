"""Loaded with `-p tests.bootstrap` before pytest-django reads the settings: the test
environment is the embedded default (SQLite, in-memory layer, local-memory cache) in Firebase
Auth Emulator mode. Tests of the signed-token path switch emulator mode off themselves."""

import os

os.environ["DEBUG"] = "1"
os.environ["FIREBASE_AUTH_EMULATOR_HOST"] = "127.0.0.1:9099"
os.environ["FIREBASE_PROJECT_ID"] = "clarity-test"
os.environ.setdefault("SECRET_KEY", "test-only-secret-key")
# The assistant answers every message by default (protocol §7); tests of the chat itself
# are clearer without it, and the assistant's tests turn it on for their rooms.
os.environ["ASSISTANT_MODE"] = "off"
os.environ["ASSISTANT_PROVIDER"] = "builtin"
for name in (
    "REDIS_URL",
    "DATABASE_URL",
    "FIREBASE_CREDENTIALS",
    "FIREBASE_CHECK_REVOKED",
    "GEMINI_API_KEY",
    "GOOGLE_CLOUD_PROJECT",
):
    os.environ.pop(name, None)
