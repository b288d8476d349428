"""Authentication (protocol §2, §10): who may open a socket, and for how long.

Everything runs through the real ASGI application and consumer. The only thing faked is the
outside world, at the HTTP layer with `responses`: Google's token-certificate endpoint (signed
tokens), Google's OAuth token endpoint and Firebase's identitytoolkit API (revocation checks).
Every test runs inside a `responses` mock with nothing else registered, so no test can reach
the network.

Sections: token makers · fixtures · emulator mode · signed tokens · certificate endpoint ·
revocation · in-band refresh · expiry without refresh · system check · logging.
"""

from __future__ import annotations

import base64
import datetime as dt
import email.utils
import hashlib
import hmac
import io
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import firebase_admin
import jwt
import pytest
import requests
import responses
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from django.core.checks import run_checks
from firebase_admin import _auth_utils, _token_gen

from chat.auth import EMULATOR_ENV, emulator_mode
from chat.checks import emulator_only_in_debug
from chat.devtokens import emulator_token
from tests.conftest import ChatClient, open_socket, read_join, token_for

PROJECT = "clarity-test"  # set by tests/bootstrap.py
ISSUER = f"https://securetoken.google.com/{PROJECT}"
CERT_URL = _token_gen.ID_TOKEN_CERT_URI
OAUTH_TOKEN_URL = "https://oauth2.googleapis.com/token"
LOOKUP_URL = f"https://identitytoolkit.googleapis.com/v1/projects/{PROJECT}/accounts:lookup"
KID = "test-key-1"

sockets = pytest.mark.django_db(transaction=True)


# --- Token makers ---------------------------------------------------------------------------


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def b64json(data: dict) -> str:
    return b64url(json.dumps(data, separators=(",", ":")).encode())


def claims_for(uid: str = "alice", *, lifetime: int = 3600, **overrides: Any) -> dict:
    """Firebase ID-token claims for this project, issued now; `overrides` replace or add."""
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": PROJECT,
        "auth_time": now,
        "user_id": uid,
        "sub": uid,
        "iat": now,
        "exp": now + lifetime,
        "firebase": {"identities": {}, "sign_in_provider": "password"},
    }
    claims.update(overrides)
    return claims


def unsigned_token(claims: dict, **header: Any) -> str:
    """An `alg: none` JWT, as the Firebase Auth Emulator issues them (no signature)."""
    return f"{b64json({'alg': 'none', 'typ': 'JWT', **header})}.{b64json(claims)}."


@dataclass(frozen=True)
class SigningKey:
    """An RSA key and the self-signed certificate Google would publish for it."""

    private_key: rsa.RSAPrivateKey
    cert_pem: str

    def sign(self, claims: dict, kid: str = KID) -> str:
        return jwt.encode(claims, self.private_key, algorithm="RS256", headers={"kid": kid})

    def private_pem(self) -> str:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()


def make_signing_key(common_name: str) -> SigningKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return SigningKey(key, cert.public_bytes(serialization.Encoding.PEM).decode())


def hs256_token(claims: dict, secret: bytes, kid: str = KID) -> str:
    """The classic algorithm-confusion forgery: HMAC keyed with the *public* certificate."""
    signing_input = f"{b64json({'alg': 'HS256', 'typ': 'JWT', 'kid': kid})}.{b64json(claims)}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def iso_z(epoch: int) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat().replace("+00:00", "Z")


# --- Socket helpers -------------------------------------------------------------------------


async def assert_refused(
    token: str | None,
    error_code: str = "AUTH_INVALID",
    close_code: int = 4003,
    **kwargs: Any,
) -> dict:
    """Open a socket with this token: the server must send one error frame, then close."""
    client = await open_socket(token=token, **kwargs)
    return await client.expect_refusal(error_code, close_code)


def presence_username(client: ChatClient, user_id: str) -> str:
    [user] = [u for u in client.presence["users"] if u["user_id"] == user_id]
    return user["username"]


# --- Fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def google_key() -> SigningKey:
    return make_signing_key("securetoken.system.gserviceaccount.com")


@pytest.fixture(scope="module")
def impostor_key() -> SigningKey:
    return make_signing_key("impostor")


@pytest.fixture(scope="module")
def service_account_key() -> SigningKey:
    return make_signing_key("verifier")


@pytest.fixture(autouse=True)
def http():
    """Every test: outbound HTTP goes to `responses` (patched process-wide, so worker threads
    too); an unregistered URL raises ConnectionError instead of reaching the network."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


def _delete_firebase_apps() -> None:
    # chat.auth caches one app per project; the app owns the SDK's certificate cache.
    for app in list(firebase_admin._apps.values()):
        firebase_admin.delete_app(app)


@pytest.fixture(autouse=True)
def fresh_firebase_apps():
    _delete_firebase_apps()
    yield
    _delete_firebase_apps()


class HttpClientLikeBody(io.BufferedReader):
    """A response body that ends the way http.client's does: `fp` becomes None once the last
    byte is read. That is the signal the SDK's CacheControl session waits for before it stores
    a response; `responses`' default BytesIO body never gives it, so without this nothing would
    ever be cached under the mock (checked against a real local HTTP server: one fetch)."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self._left = len(data)
        self.fp: io.BufferedReader | None = self

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self._left -= len(data)
        if self._left <= 0:
            self.fp = None
        return data

    def isclosed(self) -> bool:
        return self.fp is None


@dataclass
class FakeGoogle:
    """Google's ID-token certificate endpoint, as served through `responses`."""

    key: SigningKey
    cacheable: bool = True
    failure: int | Exception | None = None  # an HTTP status, or an exception to raise
    fetch_threads: list[str] = field(default_factory=list)

    def serve(self, request: requests.PreparedRequest):
        self.fetch_threads.append(threading.current_thread().name)
        if isinstance(self.failure, Exception):
            raise self.failure
        if self.failure is not None:
            return self.failure, {}, "backend error"
        headers = {"Content-Type": "application/json; charset=UTF-8"}
        if self.cacheable:
            # What Google sends; the SDK's CacheControl session needs both to cache.
            headers["Cache-Control"] = "public, max-age=19800, must-revalidate, no-transform"
            headers["Date"] = email.utils.formatdate(usegmt=True)
        return 200, headers, HttpClientLikeBody(json.dumps({KID: self.key.cert_pem}).encode())

    @property
    def fetches(self) -> int:
        return len(self.fetch_threads)

    def token(self, uid: str = "alice", **overrides: Any) -> str:
        return self.key.sign(claims_for(uid, **overrides))


@pytest.fixture
def google(http, monkeypatch, settings, google_key) -> FakeGoogle:
    """Emulator mode off: only RS256 tokens signed by `google_key` are genuine."""
    monkeypatch.delenv(EMULATOR_ENV)
    settings.FIREBASE_CHECK_REVOKED = False
    fake = FakeGoogle(google_key)
    http.add_callback(responses.GET, CERT_URL, callback=fake.serve)
    return fake


# --- 1. Emulator mode (the test default) ----------------------------------------------------


@sockets
class TestEmulatorMode:
    async def test_valid_token_joins_as_its_subject(self, clients):
        client = await clients.join(uid="alice", name="Alice Liddell")
        assert client.ack["user_id"] == "alice"
        assert client.ack["session_id"]
        assert presence_username(client, "alice") == "Alice Liddell"

    @pytest.mark.parametrize(
        ("claims", "username"),
        [
            ({"name": "Bob Builder", "email": "bob@example.com"}, "Bob Builder"),
            ({"email": "bob@example.com"}, "bob@example.com"),
            ({"name": "   ", "email": "bob@example.com"}, "bob@example.com"),
            ({}, "User_bob12345"),
        ],
        ids=["name", "email", "blank-name-falls-back-to-email", "uid-prefix"],
    )
    async def test_username_comes_from_the_token(self, clients, claims, username):
        uid = "bob1234567890xyz"
        client = await read_join(
            await clients.open(token=unsigned_token(claims_for(uid, **claims)), public_room=True)
        )
        assert client.ack["user_id"] == uid
        assert presence_username(client, uid) == username

    async def test_username_is_announced_to_others(self, clients):
        alice = await clients.join(uid="alice")
        await clients.open(token=emulator_token(uid="carol1234567", email="carol@example.com"))
        joined = await alice.recv_type("user_joined")
        assert joined["user_id"] == "carol1234567"
        assert joined["username"] == "carol@example.com"

    async def test_bearer_header_instead_of_query_param(self, clients):
        header = f"Bearer {token_for('alice')}".encode()
        client = await read_join(
            await clients.open(headers=[(b"authorization", header)], public_room=True)
        )
        assert client.ack["user_id"] == "alice"

    async def test_query_param_takes_precedence_over_header(self, clients):
        header = f"Bearer {token_for('mallory')}".encode()
        client = await read_join(
            await clients.open(
                token=token_for("alice"), headers=[(b"authorization", header)], public_room=True
            )
        )
        assert client.ack["user_id"] == "alice"

    async def test_missing_token(self):
        error = await assert_refused(None, "AUTH_REQUIRED", 4001)
        assert error["message"] == "Authentication token is required"

    @pytest.mark.parametrize(
        "header", [b"Bearer", b"Bearer   ", b"Basic YWxpY2U6c2VjcmV0", b"alice-token"]
    )
    async def test_authorization_header_without_bearer_token(self, header):
        await assert_refused(None, "AUTH_REQUIRED", 4001, headers=[(b"authorization", header)])

    async def test_empty_query_param(self):
        await assert_refused(None, "AUTH_REQUIRED", 4001, path="/api/v1/ws/lobby?token=")

    @pytest.mark.parametrize(
        "token",
        ["garbage", "a.b.c", "eyJhbGciOiJub25lIn0.e30.", "x" * 5000],
        ids=["word", "three-dots", "header-only", "huge"],
    )
    async def test_garbage_token(self, token):
        error = await assert_refused(token)
        assert error["message"] == "Invalid or expired token"

    async def test_expired_token(self):
        old = int(time.time()) - 7200
        await assert_refused(token_for("alice", issued_at=old, lifetime=3600))

    async def test_expired_within_clock_skew_is_accepted(self, clients, settings):
        settings.FIREBASE_CLOCK_SKEW_SECONDS = 10
        token = token_for("alice", issued_at=int(time.time()) - 3605, lifetime=3600)
        client = await read_join(await clients.open(token=token, public_room=True))
        assert client.ack["user_id"] == "alice"

    async def test_issued_in_the_future_beyond_skew(self, settings):
        settings.FIREBASE_CLOCK_SKEW_SECONDS = 10
        await assert_refused(token_for("alice", issued_at=int(time.time()) + 120))

    async def test_issued_in_the_future_within_skew_is_accepted(self, clients, settings):
        settings.FIREBASE_CLOCK_SKEW_SECONDS = 10
        client = await read_join(
            await clients.open(
                token=token_for("alice", issued_at=int(time.time()) + 5), public_room=True
            )
        )
        assert client.ack["user_id"] == "alice"

    @pytest.mark.parametrize(
        "overrides",
        [
            {"aud": "other-project"},
            {"iss": "https://securetoken.google.com/other-project"},
            {"iss": "https://evil.example.com/clarity-test"},
            {"aud": "other-project", "iss": "https://securetoken.google.com/other-project"},
            {"sub": ""},
            {"sub": 12345},
            {"sub": "x" * 129},
            {"exp": "never"},
            {"iat": None},
        ],
        ids=[
            "wrong-audience",
            "wrong-issuer",
            "foreign-issuer",
            "other-project",
            "empty-sub",
            "non-string-sub",
            "sub-too-long",
            "non-numeric-exp",
            "no-iat",
        ],
    )
    async def test_bad_claims(self, overrides):
        await assert_refused(unsigned_token(claims_for("alice", **overrides)))

    async def test_missing_sub(self):
        claims = claims_for("alice")
        del claims["sub"]
        await assert_refused(unsigned_token(claims))

    async def test_missing_exp(self):
        claims = claims_for("alice")
        del claims["exp"]
        await assert_refused(unsigned_token(claims))

    async def test_whitespace_emulator_host_still_checks_expiry(self, monkeypatch):
        # Regression: chat.auth used to strip the variable, the SDK does not. With " " the SDK
        # accepted unsigned tokens while we skipped the exp/iat checks (and the system check).
        monkeypatch.setenv(EMULATOR_ENV, " ")
        await assert_refused(token_for("alice", issued_at=0, lifetime=60))


# --- 2. Signed tokens (emulator mode off) ---------------------------------------------------


def _expired(claims: dict) -> None:
    claims.update(iat=claims["iat"] - 7200, exp=claims["iat"] - 3600, auth_time=claims["iat"])


def _future_iat(claims: dict) -> None:
    claims.update(iat=claims["iat"] + 600, exp=claims["exp"] + 600)


@sockets
class TestSignedTokens:
    async def test_valid_token_joins(self, clients, google):
        token = google.token("alice", name="Alice Liddell")
        client = await read_join(await clients.open(token=token, public_room=True))
        assert client.ack["user_id"] == "alice"
        assert presence_username(client, "alice") == "Alice Liddell"

    async def test_valid_token_in_bearer_header(self, clients, google):
        header = f"Bearer {google.token('alice')}".encode()
        client = await read_join(
            await clients.open(headers=[(b"authorization", header)], public_room=True)
        )
        assert client.ack["user_id"] == "alice"

    @pytest.mark.parametrize(
        "change",
        [
            _expired,
            _future_iat,
            lambda c: c.update(aud="other-project"),
            lambda c: c.update(iss="https://securetoken.google.com/other-project"),
            lambda c: c.update(sub=""),
            lambda c: c.pop("exp"),
        ],
        ids=["expired", "iat-in-future", "wrong-audience", "wrong-issuer", "empty-sub", "no-exp"],
    )
    async def test_genuinely_signed_but_bad_claims(self, google, change):
        claims = claims_for("alice")
        change(claims)
        await assert_refused(google.key.sign(claims))

    async def test_signed_by_another_key_with_the_same_kid(self, google, impostor_key):
        await assert_refused(impostor_key.sign(claims_for("alice")))
        assert google.fetches == 1  # it was checked against Google's certificate

    async def test_unknown_kid(self, google):
        await assert_refused(google.key.sign(claims_for("alice"), kid="not-a-google-key"))

    async def test_tampered_payload(self, google):
        header, _, signature = google.token("alice").split(".")
        forged = f"{header}.{b64json(claims_for('mallory'))}.{signature}"
        await assert_refused(forged)

    async def test_signature_stripped(self, google):
        header, payload, _ = google.token("alice").split(".")
        await assert_refused(f"{header}.{payload}.")

    # The critical one: the emulator's unsigned tokens must be worthless in production.
    @pytest.mark.parametrize(
        "header", [{}, {"kid": KID}], ids=["alg-none", "alg-none-with-google-kid"]
    )
    async def test_unsigned_token_refused_when_emulator_mode_is_off(self, google, header):
        await assert_refused(unsigned_token(claims_for("alice"), **header))
        await assert_refused(emulator_token(uid="alice"))

    async def test_hs256_keyed_with_the_public_certificate(self, google):
        forged = hs256_token(claims_for("alice"), google.key.cert_pem.encode())
        await assert_refused(forged)


# --- 2b. Google's certificate endpoint ------------------------------------------------------


@sockets
class TestCertificateEndpoint:
    async def test_certificates_fetched_from_a_worker_thread_through_the_mock(
        self, clients, google
    ):
        await read_join(await clients.open(token=google.token("alice"), public_room=True))
        assert google.fetches == 1
        assert google.fetch_threads[0] != threading.main_thread().name

    async def test_certificates_cached_across_connections(self, clients, google):
        first = await read_join(await clients.open(token=google.token("alice"), public_room=True))
        second = await read_join(await clients.open(token=google.token("bob"), public_room=True))
        assert (first.ack["user_id"], second.ack["user_id"]) == ("alice", "bob")
        assert google.fetches == 1  # the SDK honoured Cache-Control

    async def test_without_cache_headers_every_connection_fetches(self, clients, google):
        # Documents the SDK: caching depends on Google's Cache-Control *and* Date headers.
        google.cacheable = False
        await read_join(await clients.open(token=google.token("alice"), public_room=True))
        await read_join(await clients.open(token=google.token("bob"), public_room=True))
        assert google.fetches == 2

    @pytest.mark.parametrize(
        "failure",
        [500, 503, 404, requests.ConnectionError("connection refused"), requests.Timeout()],
        ids=["500", "503", "404", "connection-error", "timeout"],
    )
    async def test_endpoint_unreachable_is_unavailable_not_invalid(self, google, failure):
        google.failure = failure
        error = await assert_refused(google.token("alice"), "AUTH_UNAVAILABLE", 4013)
        assert error["message"] == "Authentication unavailable"
        assert google.fetches >= 1

    async def test_recovers_when_the_endpoint_comes_back(self, clients, google):
        google.failure = 500
        await assert_refused(google.token("alice"), "AUTH_UNAVAILABLE", 4013)
        google.failure = None
        client = await read_join(await clients.open(token=google.token("alice"), public_room=True))
        assert client.ack["user_id"] == "alice"

    async def test_refresh_during_outage_keeps_the_session(self, clients, google):
        google.cacheable = False
        client = await read_join(await clients.open(token=google.token("alice"), public_room=True))
        google.failure = requests.ConnectionError("connection refused")
        await client.send({"type": "auth", "token": google.token("alice")})
        await client.expect_error("AUTH_UNAVAILABLE")
        await client.send({"type": "heartbeat"})
        assert (await client.recv())["type"] == "heartbeat_ack"


# --- 2c. Revocation (FIREBASE_CHECK_REVOKED) ------------------------------------------------


@dataclass
class FakeIdentityToolkit:
    """Firebase's accounts:lookup, as the revocation check calls it."""

    users: dict[str, dict] = field(default_factory=dict)
    failure: Exception | None = None
    lookups: list[list[str]] = field(default_factory=list)

    def lookup(self, request: requests.PreparedRequest):
        assert request.headers["Authorization"] == "Bearer test-access-token"
        uids = json.loads(request.body)["localId"]
        self.lookups.append(uids)
        if self.failure is not None:
            raise self.failure
        found = [{"localId": uid, **self.users[uid]} for uid in uids if uid in self.users]
        return 200, {}, json.dumps({"users": found} if found else {})


def service_account_file(directory, key: SigningKey, name: str) -> str:
    """A throwaway service account's JSON file (its tokens come from OAUTH_TOKEN_URL)."""
    account = {
        "type": "service_account",
        "project_id": PROJECT,
        "private_key_id": "sa-key-1",
        "private_key": key.private_pem(),
        "client_email": f"{name}@{PROJECT}.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": OAUTH_TOKEN_URL,
    }
    path = directory / "service-account.json"
    path.write_text(json.dumps(account))
    return str(path)


@pytest.fixture
def toolkit(google, http, settings, tmp_path, service_account_key) -> FakeIdentityToolkit:
    """Revocation checks on, with a (throwaway) service account to call Firebase with."""
    settings.FIREBASE_CREDENTIALS = service_account_file(tmp_path, service_account_key, "verifier")
    settings.FIREBASE_CHECK_REVOKED = True
    http.add(
        responses.POST,
        OAUTH_TOKEN_URL,
        json={"access_token": "test-access-token", "expires_in": 3600, "token_type": "Bearer"},
    )
    fake = FakeIdentityToolkit()
    http.add_callback(responses.POST, LOOKUP_URL, callback=fake.lookup)
    return fake


@sockets
class TestRevocation:
    async def test_active_user_joins(self, clients, google, toolkit):
        toolkit.users["alice"] = {"validSince": str(int(time.time()) - 3600)}
        client = await read_join(await clients.open(token=google.token("alice"), public_room=True))
        assert client.ack["user_id"] == "alice"
        assert toolkit.lookups == [["alice"]]

    async def test_revoked_token(self, google, toolkit):
        token = google.token("alice")
        toolkit.users["alice"] = {"validSince": str(int(time.time()) + 1)}  # revoked after iat
        await assert_refused(token)
        assert toolkit.lookups == [["alice"]]

    async def test_disabled_user(self, google, toolkit):
        toolkit.users["alice"] = {"disabled": True}
        await assert_refused(google.token("alice"))
        assert toolkit.lookups == [["alice"]]

    async def test_deleted_user(self, google, toolkit):
        await assert_refused(google.token("alice"))
        assert toolkit.lookups == [["alice"]]

    async def test_identitytoolkit_unreachable_is_unavailable(self, google, toolkit):
        toolkit.failure = requests.ConnectionError("connection refused")
        await assert_refused(google.token("alice"), "AUTH_UNAVAILABLE", 4013)


# --- 3. In-band token refresh ---------------------------------------------------------------


@sockets
class TestTokenRefresh:
    async def test_same_user_gets_auth_ack(self, clients):
        client = await clients.join(uid="alice")
        now = int(time.time())
        await client.send({"type": "auth", "token": token_for("alice", issued_at=now)})
        ack = await client.recv()
        assert ack["type"] == "auth_ack", ack
        assert ack["user_id"] == "alice"
        assert ack["expires_at"] == iso_z(now + 3600)
        assert ack["expires_at"].endswith("Z")
        assert ack["message_id"] is None

    async def test_same_user_signed_refresh(self, clients, google):
        client = await read_join(await clients.open(token=google.token("alice"), public_room=True))
        await client.send({"type": "auth", "token": google.token("alice")})
        assert (await client.recv())["type"] == "auth_ack"

    async def test_another_users_token_closes(self, clients):
        client = await clients.join(uid="alice")
        await client.send({"type": "auth", "token": token_for("mallory")})
        await client.expect_refusal("AUTH_INVALID", 4003)

    @pytest.mark.parametrize(
        "token",
        [
            "garbage",
            token_for("alice", issued_at=1_000_000_000, lifetime=3600),
            unsigned_token(claims_for("alice", aud="other-project")),
        ],
        ids=["garbage", "expired", "wrong-audience"],
    )
    async def test_invalid_refresh_closes(self, clients, token):
        client = await clients.join(uid="alice")
        await client.send({"type": "auth", "token": token})
        await client.expect_refusal("AUTH_INVALID", 4003)

    async def test_unsigned_refresh_refused_when_emulator_mode_is_off(self, clients, google):
        client = await read_join(await clients.open(token=google.token("alice"), public_room=True))
        await client.send({"type": "auth", "token": emulator_token(uid="alice")})
        await client.expect_refusal("AUTH_INVALID", 4003)

    async def test_auth_frame_without_token_is_a_parse_error(self, clients):
        client = await clients.join(uid="alice")
        await client.send({"type": "auth"})
        await client.expect_error("MESSAGE_PARSE_ERROR")
        await client.send({"type": "auth", "token": "   "})
        await client.expect_error("MESSAGE_PARSE_ERROR")
        await client.send({"type": "heartbeat"})
        assert (await client.recv())["type"] == "heartbeat_ack"


# --- 4. System check ------------------------------------------------------------------------


class TestSystemCheck:
    def test_emulator_mode_without_debug_is_an_error(self, settings):
        settings.DEBUG = False
        assert [e.id for e in emulator_only_in_debug(None)] == ["chat.E001"]
        assert "chat.E001" in [e.id for e in run_checks(tags=["clarity"])]

    def test_emulator_mode_with_debug_is_fine(self, settings):
        settings.DEBUG = True
        assert emulator_only_in_debug(None) == []
        assert run_checks(tags=["clarity"]) == []

    def test_real_firebase_without_debug_is_fine(self, settings, monkeypatch):
        monkeypatch.delenv(EMULATOR_ENV)
        settings.DEBUG = False
        settings.ADMIN_REQUIRE_2FA = True  # its default without DEBUG (else: chat.W001)
        assert run_checks(tags=["clarity"]) == []

    def test_whitespace_emulator_host_counts_as_emulator_mode(self, settings, monkeypatch):
        monkeypatch.setenv(EMULATOR_ENV, " ")
        settings.DEBUG = False
        settings.ADMIN_REQUIRE_2FA = True
        assert [e.id for e in run_checks(tags=["clarity"])] == ["chat.E001"]

    @pytest.mark.parametrize("value", [None, "", " ", "127.0.0.1:9099"])
    def test_emulator_mode_agrees_with_the_sdk(self, monkeypatch, value):
        if value is None:
            monkeypatch.delenv(EMULATOR_ENV)
        else:
            monkeypatch.setenv(EMULATOR_ENV, value)
        assert emulator_mode() == _auth_utils.is_emulated()


# --- 5. Tokens are never logged -------------------------------------------------------------


@pytest.fixture
def all_logs(caplog):
    """caplog at DEBUG for every logger, including ours, which do not propagate to root."""
    own = [logging.getLogger(name) for name in ("chat", "django")]
    saved = [(logger, logger.level) for logger in own]
    for logger in own:
        logger.addHandler(caplog.handler)
        logger.setLevel(logging.DEBUG)
    caplog.set_level(logging.DEBUG)
    yield caplog
    for logger, level in saved:
        logger.removeHandler(caplog.handler)
        logger.setLevel(level)


def assert_not_logged(caplog, tokens: list[str]) -> None:
    texts = [caplog.text]
    for record in caplog.records:
        texts.append(record.getMessage())
        texts.append(repr(record.args))
        if record.exc_info and record.exc_info[1] is not None:
            texts.append(repr(record.exc_info[1]))
    logged = "\n".join(texts)
    for token in tokens:
        for part in [token, *[p for p in token.split(".") if len(p) >= 16]]:
            assert part not in logged, f"token material logged: {part[:24]}…"


@sockets
class TestTokensNeverLogged:
    async def test_emulator_tokens(self, clients, all_logs):
        valid = token_for("alice")
        header_token = token_for("bob")
        refresh = token_for("alice", issued_at=int(time.time()) - 1)
        garbage = "garbage-token-3b9f1c7e5d2a4b6c8e0f"
        expired = token_for("carol", issued_at=1_000_000_000)
        foreign = unsigned_token(claims_for("dave", aud="other-project"))

        client = await read_join(await clients.open(token=valid, public_room=True))
        await client.send({"type": "auth", "token": refresh})
        assert (await client.recv())["type"] == "auth_ack"
        await read_join(
            await clients.open(
                headers=[(b"authorization", f"Bearer {header_token}".encode())], public_room=True
            )
        )
        await client.recv_type("user_joined")  # bob's arrival, announced to alice
        for bad in (garbage, expired, foreign):
            await assert_refused(bad)
        await client.send({"type": "auth", "token": garbage})
        await client.expect_refusal("AUTH_INVALID", 4003)

        assert any(r.name.startswith("chat") for r in all_logs.records), "capture is broken"
        assert_not_logged(all_logs, [valid, header_token, refresh, garbage, expired, foreign])

    async def test_signed_tokens(self, clients, google, impostor_key, all_logs):
        valid = google.token("alice")
        forged = impostor_key.sign(claims_for("mallory"))
        unsigned = unsigned_token(claims_for("mallory"), kid=KID)
        await read_join(await clients.open(token=valid, public_room=True))
        await assert_refused(forged)
        await assert_refused(unsigned)
        google.failure = 500
        outage = google.token("bob")
        _delete_firebase_apps()  # drop the cached certificates so the outage is seen
        await assert_refused(outage, "AUTH_UNAVAILABLE", 4013)

        assert any(r.name.startswith("chat") for r in all_logs.records), "capture is broken"
        assert_not_logged(all_logs, [valid, forged, unsigned, outage])
