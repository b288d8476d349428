"""Clarity Chat settings.

Every knob is read from the environment here and documented once, next to its default.
Production differs from the embedded default (SQLite, in-memory channel layer, local-memory
cache) only by environment variables. The README's configuration table lists the same names.
"""

import os
from datetime import timedelta
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (1/0, true/false), got {raw!r}")


def env_number(name: str, default: float, kind: type[int] | type[float] = float):
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return kind(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be a {kind.__name__}, got {raw!r}") from exc


def env_int(name: str, default: int) -> int:
    return env_number(name, default, int)


def env_float(name: str, default: float) -> float:
    return env_number(name, default, float)


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


# --- Django core ---------------------------------------------------------------------------

# DEBUG: development mode. Off by default; the README's run command turns it on.
DEBUG = env_bool("DEBUG", False)

# SECRET_KEY: Django's signing key. Required when DEBUG is off.
SECRET_KEY = env_str("SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("SECRET_KEY must be set when DEBUG is off")
    SECRET_KEY = "dev-only-insecure-key-clarity-chat"

# ALLOWED_HOSTS: comma-separated host names this server answers for.
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])

# --- HTTPS behind the TLS proxy (deploy/nginx.conf) ----------------------------------------
# Production terminates TLS in nginx, which talks plain HTTP to the workers and says which
# scheme the client used in X-Forwarded-Proto (it sets the header itself on every location,
# replacing any a client sent). `manage.py check --deploy --fail-level WARNING` passes with
# deploy/clarity.env.example's values (tests/test_deploy.py); the migrate unit runs it before
# the workers start.

# SECURE_PROXY_SSL_HEADER: the header through which the proxy tells the client's scheme
# (`X-Forwarded-Proto`); a request is HTTPS when it says `https`. Empty (the default): the
# scheme is the worker's own. Set it only behind a proxy that always overwrites the header,
# or a client could claim HTTPS.
_proxy_ssl_header = env_str("SECURE_PROXY_SSL_HEADER")
SECURE_PROXY_SSL_HEADER = (
    ("HTTP_" + _proxy_ssl_header.upper().replace("-", "_"), "https") if _proxy_ssl_header else None
)
# SECURE_SSL_REDIRECT: answer plain-HTTP requests with a redirect to HTTPS (nginx redirects
# port 80 already; this catches anything that reached a worker another way). Off by default:
# without TLS in front, every page would redirect to an address nothing serves. The probes'
# endpoints are exempt, so the load balancer may ask a worker directly.
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", False)
SECURE_REDIRECT_EXEMPT = [r"^(healthz|readyz|metrics)$"]
# SECURE_HSTS_SECONDS: Strict-Transport-Security max-age on HTTPS responses: browsers then
# refuse plain HTTP to this host for that long (production: 31536000, a year). 0 (default):
# no header; enable it only once HTTPS works, it cannot be taken back before it expires.
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0)
# SECURE_HSTS_INCLUDE_SUBDOMAINS / SECURE_HSTS_PRELOAD: the header's includeSubDomains and
# preload directives (preload only allows submitting the domain to browsers' preload lists,
# a separate, manual step).
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
# SESSION_COOKIE_SECURE / CSRF_COOKIE_SECURE: the admin's session and CSRF cookies are sent
# over HTTPS only. Default: on unless DEBUG (browsers accept them from http://localhost).
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", not DEBUG)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", not DEBUG)
# CSRF_TRUSTED_ORIGINS: comma-separated origins (https://chat.example.com) whose forms may
# post to the admin, besides the request's own host and scheme.
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "daphne",  # first, so `runserver` serves ASGI (WebSockets included)
    # Django's admin with this project's site (chat/adminsite.py: two-factor sign-in when
    # ADMIN_REQUIRE_2FA, sign-ins audited).
    "chat.apps.ClarityAdminConfig",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_otp",
    "django_otp.plugins.otp_totp",
    "axes",
    "channels",
    "chat",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django_otp.middleware.OTPMiddleware",  # request.user.is_verified(): signed in with 2FA
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "axes.middleware.AxesMiddleware",  # last: turns a locked-out sign-in into its refusal
]

# django-axes first: it refuses a locked-out sign-in before any password is checked.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]

ROOT_URLCONF = "clarity_project.urls"
ASGI_APPLICATION = "clarity_project.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# DATABASE_URL: e.g. postgres://user:pass@127.0.0.1:5432/clarity. Unset: SQLite in db.sqlite3.
DATABASE_URL = env_str("DATABASE_URL", f"sqlite:///{BASE_DIR / 'db.sqlite3'}")
# SQLITE_BUSY_TIMEOUT: seconds a SQLite writer waits for the lock held by another worker.
SQLITE_BUSY_TIMEOUT = env_float("SQLITE_BUSY_TIMEOUT", 20.0)
# DATABASE_CONN_MAX_AGE: seconds a worker keeps its database connection open (0: a new
# connection for every database call, which costs more than the call itself). Connections
# are not health-checked before each use (that is a round trip per call): after a database
# restart, the first call on a broken connection fails and the next one reconnects.
DATABASE_CONN_MAX_AGE = env_int("DATABASE_CONN_MAX_AGE", 600)
DATABASES = {
    "default": dj_database_url.parse(
        DATABASE_URL, conn_max_age=DATABASE_CONN_MAX_AGE, conn_health_checks=False
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"]["OPTIONS"] = {
        # Several local workers may share one SQLite file: write transactions take the lock
        # up front (no deadlock-prone upgrades), readers never block the writer (WAL).
        "transaction_mode": "IMMEDIATE",
        "timeout": SQLITE_BUSY_TIMEOUT,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"

# --- Redis: channel layer, shared state and cache --------------------------------------------

# REDIS_URL: e.g. redis://127.0.0.1:6379/0. Unset: in-memory channel layer, shared state in
# this process's memory and local-memory cache (one process only: a second worker on the
# same SQLite file refuses to start, chat/embedded.py). Set: channels-redis'
# pub/sub layer, shared state in Redis (chat/shared_state/: worker liveness, rate-limit
# counters, the assistant's breaker) and Django's Redis cache (many workers).
REDIS_URL = env_str("REDIS_URL")
# REDIS_PREFIX: prefix of every Redis key this deployment writes (layer, shared state, cache),
# so several deployments or test runs can share one Redis.
REDIS_PREFIX = env_str("REDIS_PREFIX", "clarity")
# CHANNEL_LAYER_CAPACITY: messages a socket's channel may queue, in either layer. A socket
# whose queue fills up (its consumer falls behind its rooms) has them dropped and is closed
# 4009 `Client too slow` (protocol §16; chat/layers.py, chat/pubsub.py).
CHANNEL_LAYER_CAPACITY = env_int("CHANNEL_LAYER_CAPACITY", 1000)
# CHANNEL_LAYER_REDIS_CONNECTIONS: Redis connections a worker's layer sends commands on, at
# most. A burst of group sends (a restart's thousands of leave notices) waits for a free one:
# redis-py's default pool opened a connection per concurrent send, then raised "Too many
# connections" and the notices were lost.
CHANNEL_LAYER_REDIS_CONNECTIONS = env_int("CHANNEL_LAYER_REDIS_CONNECTIONS", 64)
# CHANNEL_LAYER_EXPIRY: seconds an undelivered message lives in the in-memory layer. (The
# Redis layer hands each message to its worker's queue at once.)
CHANNEL_LAYER_EXPIRY = env_int("CHANNEL_LAYER_EXPIRY", 60)
# CHANNEL_LAYER_GROUP_EXPIRY: seconds a group membership lives in the in-memory layer unless
# renewed; live sockets renew theirs every half of it. (The Redis layer's memberships live
# as long as their worker's connection to Redis.)
CHANNEL_LAYER_GROUP_EXPIRY = env_int("CHANNEL_LAYER_GROUP_EXPIRY", 3600)

if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            # channels-redis' pub/sub layer without its channel leaks, with bounded queues,
            # surviving a Redis outage or restart (chat/pubsub.py): a group message is
            # published once and each worker fans it out to its own members. channels-redis'
            # other layer (RedisChannelLayer) is not offered: a socket closing while its
            # worker waits on the shared receive can lose the next message for that worker's
            # other sockets (django/channels_redis#366), and its group_send drops silently
            # for a full receiver.
            "BACKEND": "chat.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {
                "hosts": [
                    {"address": REDIS_URL, "max_connections": CHANNEL_LAYER_REDIS_CONNECTIONS}
                ],
                "prefix": f"{REDIS_PREFIX}:layer",
                "capacity": CHANNEL_LAYER_CAPACITY,
            },
        }
    }

if REDIS_URL:
    CACHES = {
        "default": {
            # Django's own Redis cache, for Django and future use: the state the workers
            # share (liveness, rate limits, the breaker) is in chat/shared_state/, with its
            # own pools. Fail fast rather than stall a worker when Redis is unreachable.
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": f"{REDIS_PREFIX}:cache",
            "OPTIONS": {"socket_timeout": 5, "socket_connect_timeout": 2, "max_connections": 50},
        }
    }
else:
    CHANNEL_LAYERS = {
        "default": {
            # channels' in-memory layer, cheap on the fan-out path, with bounded queues
            # (chat/layers.py).
            "BACKEND": "chat.layers.InMemoryChannelLayer",
            "CONFIG": {
                "capacity": CHANNEL_LAYER_CAPACITY,
                "expiry": CHANNEL_LAYER_EXPIRY,
                "group_expiry": CHANNEL_LAYER_GROUP_EXPIRY,
            },
        }
    }
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

# --- Firebase authentication ----------------------------------------------------------------

# FIREBASE_PROJECT_ID: the Firebase project whose ID tokens are accepted (their aud/iss).
FIREBASE_PROJECT_ID = env_str("FIREBASE_PROJECT_ID", "clarity-dev")
# FIREBASE_CREDENTIALS: path of a service-account JSON file. Optional: token verification
# needs only Google's public certificates; revocation checks need credentials (this file or
# the machine's application-default credentials).
FIREBASE_CREDENTIALS = env_str("FIREBASE_CREDENTIALS")
# FIREBASE_AUTH_EMULATOR_HOST: host:port of the Firebase Auth Emulator. When set, unsigned
# emulator tokens are accepted (the SDK reads this variable itself). Development only: a
# system check refuses to start with it set and DEBUG off.
# Read unstripped, exactly as the SDK reads it.
FIREBASE_AUTH_EMULATOR_HOST = os.environ.get("FIREBASE_AUTH_EMULATOR_HOST", "")
# FIREBASE_CHECK_REVOKED: also ask Firebase whether the token was revoked or the user
# disabled. Default: on with real Firebase, off in emulator mode.
FIREBASE_CHECK_REVOKED = env_bool("FIREBASE_CHECK_REVOKED", not FIREBASE_AUTH_EMULATOR_HOST)
# FIREBASE_CLOCK_SKEW_SECONDS: tolerance for exp/iat against this server's clock (0-60).
FIREBASE_CLOCK_SKEW_SECONDS = env_int("FIREBASE_CLOCK_SKEW_SECONDS", 10)
# FIREBASE_HTTP_TIMEOUT: seconds for the SDK's HTTP calls (certificates, revocation).
FIREBASE_HTTP_TIMEOUT = env_float("FIREBASE_HTTP_TIMEOUT", 5.0)

# --- Browser client sign-in (the page at /) -------------------------------------------------

# FIREBASE_WEB_API_KEY: the Firebase web app's API key (public: it names the project to the
# Firebase JS SDK, it grants nothing). Set, outside emulator mode: the page signs in with
# Google through the Firebase JS SDK. In emulator mode with DEBUG the page has a dev sign-in
# form instead; with neither, it says sign-in is not configured.
FIREBASE_WEB_API_KEY = env_str("FIREBASE_WEB_API_KEY")
# FIREBASE_AUTH_DOMAIN: the web app's auth domain, which hosts the Google sign-in popup.
FIREBASE_AUTH_DOMAIN = env_str("FIREBASE_AUTH_DOMAIN", f"{FIREBASE_PROJECT_ID}.firebaseapp.com")
# FIREBASE_JS_SDK_URL: where browsers load the Firebase JS SDK's ES modules from (the folder
# holding firebase-app.js and firebase-auth.js): Google's CDN, or a copy you host.
FIREBASE_JS_SDK_URL = env_str("FIREBASE_JS_SDK_URL", "https://www.gstatic.com/firebasejs/13.2.0")
# FIREBASE_WEB_PUSH_KEY, FIREBASE_MESSAGING_SENDER_ID, FIREBASE_APP_ID: web push for the page
# (protocol §13): the web app's "Web Push certificates" public key (VAPID), its sender id
# and app id, from the Firebase console. All three set, with Firebase sign-in: the page
# offers to turn notifications on, registers the browser's FCM token
# (`POST /api/v1/devices`, platform web) and removes it on sign-out; its service worker
# (`/firebase-messaging-sw.js`) shows the pushes. Unset: no web push.
FIREBASE_WEB_PUSH_KEY = env_str("FIREBASE_WEB_PUSH_KEY")
FIREBASE_MESSAGING_SENDER_ID = env_str("FIREBASE_MESSAGING_SENDER_ID")
FIREBASE_APP_ID = env_str("FIREBASE_APP_ID")

# --- Chat limits (protocol §6) ---------------------------------------------------------------

# CHAT_OPEN_ROOMS: v1 rooms (protocol §11): a socket for an unknown room id creates it as a
# public room. Off by default: rooms are made through the API (private, direct) or by
# operators in the admin (public), and an unknown id is refused like a forbidden one.
CHAT_OPEN_ROOMS = env_bool("CHAT_OPEN_ROOMS", False)
# CHAT_MAX_ROOMS_PER_USER: private rooms one user may have created (protocol §11).
CHAT_MAX_ROOMS_PER_USER = env_int("CHAT_MAX_ROOMS_PER_USER", 100)
# CHAT_MAX_DIRECT_ROOMS_PER_USER: direct rooms one user may have opened.
CHAT_MAX_DIRECT_ROOMS_PER_USER = env_int("CHAT_MAX_DIRECT_ROOMS_PER_USER", 500)
# CHAT_MAX_MEMBERS_PER_ROOM: members of a private room (public rooms: unbounded, see
# Room.max_users for who may be in one at once).
CHAT_MAX_MEMBERS_PER_ROOM = env_int("CHAT_MAX_MEMBERS_PER_ROOM", 200)
# --- Push notifications (protocol §13; chat/push.py, manage.py pushworker) ---------------------

# CHAT_PUSH: queue push notifications as messages are stored (for members of private and
# direct rooms with a device, not muted, with no open socket in the room). Off by default:
# turn it on where a push worker runs (`manage.py pushworker`) with Firebase credentials
# (FIREBASE_CREDENTIALS or Application Default Credentials), or the outbox only grows.
CHAT_PUSH = env_bool("CHAT_PUSH", False)
# CHAT_PUSH_TITLE: the title of every push; the body is "New message". Nothing of the room
# (its name can be health information) or the message is sent.
CHAT_PUSH_TITLE = env_str("CHAT_PUSH_TITLE", "Clarity")
# CHAT_PUSH_PREVIEW_ALLOWED: users may ask for previews (`PATCH /api/v1/push` {previews}): the
# sender and the first 100 characters of the message, sent through Google's FCM. Off by
# default (health data); a deployment whose users' agreement covers it may allow it.
CHAT_PUSH_PREVIEW_ALLOWED = env_bool("CHAT_PUSH_PREVIEW_ALLOWED", False)
# CHAT_PUSH_COALESCE: seconds: at most one push per room per user this often.
CHAT_PUSH_COALESCE = env_float("CHAT_PUSH_COALESCE", 30)
# CHAT_PUSH_LEASE: seconds a push worker holds the pushes it claimed; a worker that dies
# mid-send leaves them to be sent again once this is over.
CHAT_PUSH_LEASE = env_float("CHAT_PUSH_LEASE", 60)
# CHAT_PUSH_MAX_ATTEMPTS: sends of one push that FCM failed (other than a dead token) before
# it is given up; retried after 30 s, 60 s, 120 s... (at most an hour).
CHAT_PUSH_MAX_ATTEMPTS = env_int("CHAT_PUSH_MAX_ATTEMPTS", 5)
# CHAT_PUSH_POLL: seconds the push worker waits when nothing is due.
CHAT_PUSH_POLL = env_float("CHAT_PUSH_POLL", 1.0)
# CHAT_MAX_DEVICES_PER_USER: push devices one user may have registered (protocol §13); a new
# one beyond it replaces the one registered longest ago.
CHAT_MAX_DEVICES_PER_USER = env_int("CHAT_MAX_DEVICES_PER_USER", 10)
# CHAT_REVOKE_TIMEOUT: seconds a member removal waits for the removed user's open sockets in
# that room, on every worker, to be closed before it answers; an erasure of a user's data
# waits as long for all of that user's sockets.
CHAT_REVOKE_TIMEOUT = env_float("CHAT_REVOKE_TIMEOUT", 5)
# CHAT_STAFF_CLAIM: the custom token claim (true) that makes a user an operator for the HTTP
# companions (`/api/v1/ws/chat/stats`); Django staff signed in to the admin are operators too.
CHAT_STAFF_CLAIM = env_str("CHAT_STAFF_CLAIM", "clarity_staff")

# CHAT_MAX_CONNECTIONS_PER_USER: sockets one user may hold, across workers and endpoints.
CHAT_MAX_CONNECTIONS_PER_USER = env_int("CHAT_MAX_CONNECTIONS_PER_USER", 3)
# CHAT_MAX_MESSAGE_SIZE: UTF-8 bytes of one inbound frame.
CHAT_MAX_MESSAGE_SIZE = env_int("CHAT_MAX_MESSAGE_SIZE", 65536)
# CHAT_MAX_HEALTH_PAYLOAD_SIZE: UTF-8 bytes of one health_insight / health_data frame.
CHAT_MAX_HEALTH_PAYLOAD_SIZE = env_int("CHAT_MAX_HEALTH_PAYLOAD_SIZE", 1_000_000)
# CHAT_WS_MAX_FRAME_SIZE: bytes of one WebSocket message daphne takes in (its
# --websocket-max-message-size and --websocket-max-frame-size, set from here by the worker
# launcher, clarity_project/serve.py). Anything larger is refused by daphne with close 1009
# before the application reads it; anything up to it reaches the application, whose limits
# above answer MESSAGE_TOO_LARGE and keep the socket. So it must be at least both of them.
# autobahn applies the same limit to the frames the server sends.
CHAT_WS_MAX_FRAME_SIZE = env_int("CHAT_WS_MAX_FRAME_SIZE", 2 * 1024 * 1024)
if max(CHAT_MAX_MESSAGE_SIZE, CHAT_MAX_HEALTH_PAYLOAD_SIZE) > CHAT_WS_MAX_FRAME_SIZE:
    raise ImproperlyConfigured(
        "CHAT_WS_MAX_FRAME_SIZE must be at least CHAT_MAX_MESSAGE_SIZE and "
        "CHAT_MAX_HEALTH_PAYLOAD_SIZE"
    )
# CHAT_MAX_OUTBOUND_BUFFER: bytes a socket may have waiting to be sent (protocol §16). The
# worker counts what the application writes to a socket while Twisted's write buffer is full
# (past 64 KiB, the kernel's send buffer full as well) and has not drained since; past this,
# the socket gets SLOW_CONSUMER and close 4009, and later frames for it are discarded
# (clarity_project/transport.py). 0 turns the bound off (unbounded, as stock daphne: for
# comparisons only).
CHAT_MAX_OUTBOUND_BUFFER = env_int("CHAT_MAX_OUTBOUND_BUFFER", 1024 * 1024)
# CHAT_SLOW_CLOSE_TIMEOUT: seconds a socket closed for slowness has to take the close (read
# what was queued before it and answer it); then the connection is aborted, its buffer freed.
CHAT_SLOW_CLOSE_TIMEOUT = env_float("CHAT_SLOW_CLOSE_TIMEOUT", 2)
# CHAT_HANDSHAKE_TIMEOUT: seconds from the first byte of an HTTP request (a WebSocket upgrade
# included) to its last header; a head still incomplete then has its connection aborted.
# (Twisted's own idle timeout restarts on every byte: a trickled head would never end.)
CHAT_HANDSHAKE_TIMEOUT = env_float("CHAT_HANDSHAKE_TIMEOUT", 10)
if min(CHAT_SLOW_CLOSE_TIMEOUT, CHAT_HANDSHAKE_TIMEOUT) <= 0:
    raise ImproperlyConfigured("CHAT_SLOW_CLOSE_TIMEOUT and CHAT_HANDSHAKE_TIMEOUT must be > 0")
# CHAT_OVERLOAD_LAG / CHAT_OVERLOAD_BACKLOG: a worker whose event loop runs, or whose room
# frames arrive, more than this many seconds late, or with more than this many messages
# waiting to be stored, counts as overloaded: `clarity_overload_ticks_total` grows and a
# warning is logged (chat/overload.py).
CHAT_OVERLOAD_LAG = env_float("CHAT_OVERLOAD_LAG", 0.1)
CHAT_OVERLOAD_BACKLOG = env_int("CHAT_OVERLOAD_BACKLOG", 200)
# CHAT_MAX_DATA_POINTS: data points in one health analysis request.
CHAT_MAX_DATA_POINTS = env_int("CHAT_MAX_DATA_POINTS", 10080)
# CHAT_ANALYSIS_RATE_LIMIT / CHAT_ANALYSIS_RATE_WINDOW: health analysis requests
# (health_insight, health_data, and any frame over CHAT_MAX_MESSAGE_SIZE) one user may send
# per rolling window (seconds), across sockets and workers, on top of the frame rate limit.
# Beyond it: RATE_LIMIT_EXCEEDED with `details.scope: "analysis"`, nothing analysed, the
# socket stays open. An honest client sends one per sync or per tap (a week of data at a
# time), a few an hour; 10 a minute leaves room for retries.
CHAT_ANALYSIS_RATE_LIMIT = env_int("CHAT_ANALYSIS_RATE_LIMIT", 10)
CHAT_ANALYSIS_RATE_WINDOW = env_int("CHAT_ANALYSIS_RATE_WINDOW", 60)
# CHAT_ANALYSIS_QUEUE: health analyses one worker takes on at once (waiting for or in an
# analysis process, or being narrated). Beyond it: SERVICE_UNAVAILABLE with
# `details.scope: "analysis"` at once, nothing queued; the client retries with backoff. Each
# waiting request holds its frame (up to CHAT_MAX_HEALTH_PAYLOAD_SIZE) in memory.
CHAT_ANALYSIS_QUEUE = env_int("CHAT_ANALYSIS_QUEUE", 8)
# CHAT_ANALYSIS_PROCESSES: child processes per worker that decode, validate and compute
# health analyses off the event loop (a week of data: tens of ms of CPU each). Started on
# the first analysis (about 0.5 s) and stopped with the worker. Measured: about 90 MB each
# after week-long analyses, plus about 12 MB for the resource tracker multiprocessing starts.
CHAT_ANALYSIS_PROCESSES = env_int("CHAT_ANALYSIS_PROCESSES", 1)
if min(CHAT_ANALYSIS_RATE_LIMIT, CHAT_ANALYSIS_QUEUE, CHAT_ANALYSIS_PROCESSES) < 1:
    raise ImproperlyConfigured(
        "CHAT_ANALYSIS_RATE_LIMIT, CHAT_ANALYSIS_QUEUE and CHAT_ANALYSIS_PROCESSES must be >= 1"
    )
# CHAT_MESSAGE_RATE_LIMIT: frames per user per rolling window, refused frames included
# (binary, too large, not JSON, invalid); one heartbeat per second per socket is exempt
# (protocol §16, chat/budgets.py). An honest client sends what its user types plus a few
# history requests: well under this.
CHAT_MESSAGE_RATE_LIMIT = env_int("CHAT_MESSAGE_RATE_LIMIT", 60)
# CHAT_RATE_LIMIT_WINDOW: seconds of the rolling rate-limit window.
CHAT_RATE_LIMIT_WINDOW = env_int("CHAT_RATE_LIMIT_WINDOW", 60)
# CHAT_RATE_LIMIT_CLOSE_FACTOR: frames (accepted and refused) beyond limit x this factor in the
# rolling window close 4029.
CHAT_RATE_LIMIT_CLOSE_FACTOR = env_int("CHAT_RATE_LIMIT_CLOSE_FACTOR", 3)

# --- Fair share (protocol §16; chat/budgets.py) -----------------------------------------------

# CHAT_INBOUND_BYTES_PER_MINUTE: bytes one user may send per rolling minute, across sockets
# and workers: every inbound frame's size, refused frames included, plus every history reply
# the user asks for (charged before it is sent, refused if it does not fit). Over it:
# RATE_LIMIT_EXCEEDED {retry_after, scope: "bytes"}; beyond CHAT_RATE_LIMIT_CLOSE_FACTOR times
# it, close 4029. An honest client spends a few KB a minute chatting, a history page of ~10-
# 100 KB per scroll and, when it sends health data, up to CHAT_MAX_HEALTH_PAYLOAD_SIZE per
# analysis: the default (16 MiB) leaves room for a dozen full analyses. 0: no byte budget.
CHAT_INBOUND_BYTES_PER_MINUTE = env_int("CHAT_INBOUND_BYTES_PER_MINUTE", 16 * 1024 * 1024)
# CHAT_RESYNC_SPREAD: seconds over which a worker whose channel layer subscribed again
# after losing Redis sends its sockets `resync` (protocol §15), each at a random moment, so
# their catch-up reads do not all reach the database at once.
CHAT_RESYNC_SPREAD = env_float("CHAT_RESYNC_SPREAD", 1.0)
# CHAT_CATCH_UP_RATE_LIMIT: catch-up reads (`history` with `after_seq`, protocol §15) per
# user per rolling minute, across sockets and workers, counted apart from
# CHAT_MESSAGE_RATE_LIMIT (still toward the byte budget): a client told `resync`, or back
# from a reconnect, fetches what it missed at once however much it chatted. One read fetches
# up to 100 messages: an honest client catching up on a busy room needs a few. Over it:
# RATE_LIMIT_EXCEEDED {retry_after, scope: "catch_up"}; beyond CHAT_RATE_LIMIT_CLOSE_FACTOR
# times it, close 4029. 0: catch-up reads count as frames.
CHAT_CATCH_UP_RATE_LIMIT = env_int("CHAT_CATCH_UP_RATE_LIMIT", 60)
# CHAT_READ_RATE_LIMIT: `read` frames (protocol §12) per user per rolling minute, across
# sockets and workers, counted apart from CHAT_MESSAGE_RATE_LIMIT (still toward the byte
# budget). A client reports what it has read as it scrolls: the browser client sends at most
# one a second while it is being read. Over it: RATE_LIMIT_EXCEEDED {retry_after, scope:
# "read"}, the position unchanged (a later `read` carries it on); beyond
# CHAT_RATE_LIMIT_CLOSE_FACTOR times it, close 4029. 0: `read` frames count as frames.
CHAT_READ_RATE_LIMIT = env_int("CHAT_READ_RATE_LIMIT", 120)
# CHAT_CONNECT_RATE_LIMIT: socket openings per user per rolling minute, across workers and
# endpoints, counted before the join does any work (no session, presence or history): over
# it, RATE_LIMIT_EXCEEDED and close 4029. The browser client opens one socket per room the
# user switches to and reconnects with backoff: an honest user opens a few a minute. 0: off.
CHAT_CONNECT_RATE_LIMIT = env_int("CHAT_CONNECT_RATE_LIMIT", 30)
# CHAT_CONNECT_RATE_LIMIT_PER_ADDRESS: socket openings per client address per rolling minute,
# counted before the token is even verified. High, because carrier NAT and hospital Wi-Fi put
# many users behind one address. 0: off.
CHAT_CONNECT_RATE_LIMIT_PER_ADDRESS = env_int("CHAT_CONNECT_RATE_LIMIT_PER_ADDRESS", 1200)
# CHAT_TRUSTED_PROXIES: comma-separated addresses or networks (CIDR) of this deployment's
# proxies. Only for a connection from one of them is the client's address read from
# X-Forwarded-For (its rightmost entry that is not a trusted proxy; chat/client_address.py),
# for sockets and HTTP alike (sessions, the per-address limit, the admin's audit and sign-in
# throttling); otherwise it is the peer's address. Empty (default): never read.
CHAT_TRUSTED_PROXIES = env_list("CHAT_TRUSTED_PROXIES", [])
# CHAT_HEARTBEAT_INTERVAL: seconds between server heartbeats.
CHAT_HEARTBEAT_INTERVAL = env_float("CHAT_HEARTBEAT_INTERVAL", 30)
# CHAT_CONNECTION_TIMEOUT: seconds of inbound silence before the server closes (1000).
CHAT_CONNECTION_TIMEOUT = env_float("CHAT_CONNECTION_TIMEOUT", 300)
# CHAT_TYPING_TIMEOUT: seconds after which an unrefreshed is_typing:true is withdrawn.
CHAT_TYPING_TIMEOUT = env_float("CHAT_TYPING_TIMEOUT", 10)
# CHAT_HISTORY_ON_JOIN: stored messages sent in the join `history` frame.
CHAT_HISTORY_ON_JOIN = env_int("CHAT_HISTORY_ON_JOIN", 50)
# CHAT_HISTORY_MAX_BYTES: encoded bytes of one `history` frame, the join's included: a page
# that would be larger holds fewer messages (has_more says there are more). A 70-byte
# request must not make the server send megabytes (protocol §16); 50 ordinary messages take
# ~10-20 KB, so the default (256 KiB) cuts only pages of very long messages.
CHAT_HISTORY_MAX_BYTES = env_int("CHAT_HISTORY_MAX_BYTES", 256 * 1024)
if CHAT_HISTORY_MAX_BYTES > CHAT_WS_MAX_FRAME_SIZE:
    raise ImproperlyConfigured("CHAT_HISTORY_MAX_BYTES must be at most CHAT_WS_MAX_FRAME_SIZE")
# CHAT_WORKER_TTL: seconds a worker's liveness key lives; a dead worker's users are shown as
# left within this plus CHAT_REAP_INTERVAL.
CHAT_WORKER_TTL = env_float("CHAT_WORKER_TTL", 15)
# CHAT_REAP_INTERVAL: seconds between a worker's liveness refreshes and its search for the
# sessions of dead workers. Must be well below CHAT_WORKER_TTL.
CHAT_REAP_INTERVAL = env_float("CHAT_REAP_INTERVAL", 5)
if CHAT_REAP_INTERVAL * 2 > CHAT_WORKER_TTL:
    raise ImproperlyConfigured("CHAT_REAP_INTERVAL must be at most half of CHAT_WORKER_TTL")

# CHAT_SHUTDOWN_GRACE: seconds a stopping worker (SIGTERM/SIGINT) waits for its sockets to
# close with 4012 and their sessions to end before it exits.
CHAT_SHUTDOWN_GRACE = env_float("CHAT_SHUTDOWN_GRACE", 10)

# CHAT_SHUTDOWN_REJOIN_GRACE: seconds a user whose socket a stopping worker closed (4012,
# "reconnect") has to come back before their rooms are told they left (`user_left`, sent by
# any worker's housekeeping, within CHAT_REAP_INTERVAL after the grace); back within it,
# neither their leaving nor their coming back is announced. A restart is not a departure.
# 0: announced at once, as any other close.
CHAT_SHUTDOWN_REJOIN_GRACE = env_float("CHAT_SHUTDOWN_REJOIN_GRACE", 15)

# --- Retention (manage.py purgechat; chat/retention.py) -------------------------------------

# CHAT_MESSAGE_RETENTION_DAYS: messages (with their earlier versions) older than this many
# days are deleted by `manage.py purgechat` (daily: deploy/clarity-chat-purge.timer). 0 (the
# default): kept forever.
CHAT_MESSAGE_RETENTION_DAYS = env_int("CHAT_MESSAGE_RETENTION_DAYS", 0)
# CHAT_SESSION_RETENTION_DAYS: sessions (connection records: client address, user agent,
# times) that ended more than this many days ago are deleted by the same command; open
# sessions never are. Separate from messages: these are the connection trail a security
# review reads, often kept for a different time. 0 (the default): kept forever.
CHAT_SESSION_RETENTION_DAYS = env_int("CHAT_SESSION_RETENTION_DAYS", 0)
if CHAT_MESSAGE_RETENTION_DAYS < 0 or CHAT_SESSION_RETENTION_DAYS < 0:
    raise ImproperlyConfigured("A retention is a number of days, 0 to keep forever")

# --- Assistant and health analysis (protocol §7) ---------------------------------------------

# ASSISTANT_PROVIDER: `builtin` (deterministic, no network; the embedded default) or `gemini`.
ASSISTANT_PROVIDER = env_str("ASSISTANT_PROVIDER", "builtin")
# ASSISTANT_MODE: the assistant mode of rooms that have none of their own (`always`,
# `mention` = messages starting with @ai, `off`). Empty (the default): by room kind, `always`
# in public rooms and `mention` in private and direct ones (protocol §11). Each room may
# override it in the admin.
ASSISTANT_MODE = env_str("ASSISTANT_MODE", "")
# ASSISTANT_USER_RATE_LIMIT / ASSISTANT_USER_RATE_WINDOW: assistant replies one user may
# cause per rolling window (seconds), across rooms, sockets and workers. Over it the message
# is stored and delivered without a reply, and the sender gets RATE_LIMIT_EXCEEDED with
# `details.scope: "assistant"`.
ASSISTANT_USER_RATE_LIMIT = env_int("ASSISTANT_USER_RATE_LIMIT", 30)
ASSISTANT_USER_RATE_WINDOW = env_int("ASSISTANT_USER_RATE_WINDOW", 3600)
# ASSISTANT_FIRST_CHUNK_TIMEOUT / ASSISTANT_TIMEOUT: seconds to wait for the first piece of
# an assistant's answer (and for each next one: a stalled stream ends like a silent one), and
# seconds the whole answer may take; past either the stream stops and the apology is stored
# (protocol §14). Clients drop a stream's partial text after FIRST_CHUNK + 5 s without a frame
# (`stream_idle_timeout` in connection_ack.server_info).
ASSISTANT_FIRST_CHUNK_TIMEOUT = env_float("ASSISTANT_FIRST_CHUNK_TIMEOUT", 20)
ASSISTANT_TIMEOUT = env_float("ASSISTANT_TIMEOUT", 60)
# ASSISTANT_STREAM_INTERVAL: seconds between two `assistant_delta` frames a worker sends to
# one room (or one user's sockets): the replies streaming there take turns, so a reply alone
# gets a frame per interval (what the model wrote meanwhile), n at once one every n
# intervals each; a reply's first words go at once (chat.deltas). Every frame goes to every
# socket in the room: 0.1 (10 a second) reads as smoothly as 0.05 and costs a busy room, and
# each phone in it, half as many deliveries (bench `stream`: with eight replies streaming,
# the room's chat p99 was 1.28x that of the room without them at 0.05, 1.14x at 0.1).
ASSISTANT_STREAM_INTERVAL = env_float("ASSISTANT_STREAM_INTERVAL", 0.1)
# ASSISTANT_STREAM_DELIVERIES: what one worker's deltas to one room may cost, in frames
# delivered per second (a frame to each of the room's sockets): a room of more than
# ASSISTANT_STREAM_DELIVERIES x ASSISTANT_STREAM_INTERVAL sockets (25) gets its delta frames
# further apart, sockets / ASSISTANT_STREAM_DELIVERIES seconds (58: 0.23 s), at most 1 s
# (chat.deltas). The sockets are counted when a reply starts (open sessions in the room).
ASSISTANT_STREAM_DELIVERIES = env_int("ASSISTANT_STREAM_DELIVERIES", 250)
# ASSISTANT_BUILTIN_WORD_DELAY: seconds between two words of the built-in assistant's
# streamed answer (a model's pace, so the embedded default shows streaming); 0: all at once.
ASSISTANT_BUILTIN_WORD_DELAY = env_float("ASSISTANT_BUILTIN_WORD_DELAY", 0.02)
# ASSISTANT_MAX_CONCURRENCY: assistant requests in flight at once per worker.
ASSISTANT_MAX_CONCURRENCY = env_int("ASSISTANT_MAX_CONCURRENCY", 8)
# ASSISTANT_CONTEXT_MESSAGES: recent room messages given to the model as context.
ASSISTANT_CONTEXT_MESSAGES = env_int("ASSISTANT_CONTEXT_MESSAGES", 20)
# ASSISTANT_BREAKER_FAILURES / ASSISTANT_BREAKER_RESET: consecutive provider failures that
# open the circuit breaker (shared by all workers, in the cache), and seconds before retrying.
ASSISTANT_BREAKER_FAILURES = env_int("ASSISTANT_BREAKER_FAILURES", 5)
ASSISTANT_BREAKER_RESET = env_float("ASSISTANT_BREAKER_RESET", 60)
# GEMINI_API_KEY: Gemini Developer API key. Unset with ASSISTANT_PROVIDER=gemini: Vertex AI
# with GOOGLE_CLOUD_PROJECT and GOOGLE_CLOUD_LOCATION (application-default credentials).
# Gemini runs in a process of each worker's own (chat/assistant/process.py), which gets every
# ASSISTANT_*, GEMINI_* and GOOGLE_* setting as the worker had it when it started the process.
GEMINI_API_KEY = env_str("GEMINI_API_KEY")
# ASSISTANT_PROCESS_NICENESS: how much lower than its worker's the CPU priority of that
# process is (os.nice; 0: the same): when cores are scarce the chat's sockets come first, and
# the answers being written slow down before the chat does.
ASSISTANT_PROCESS_NICENESS = env_int("ASSISTANT_PROCESS_NICENESS", 10)
# GEMINI_BASE_URL: the API's address, e.g. an organisation's gateway to it; empty: Google's
# (google-genai's own GOOGLE_GEMINI_BASE_URL / GOOGLE_VERTEX_BASE_URL environment applies).
GEMINI_BASE_URL = env_str("GEMINI_BASE_URL")
GOOGLE_CLOUD_PROJECT = env_str("GOOGLE_CLOUD_PROJECT")
GOOGLE_CLOUD_LOCATION = env_str("GOOGLE_CLOUD_LOCATION", "us-central1")
# GEMINI_MODEL and its generation parameters (the original's values).
GEMINI_MODEL = env_str("GEMINI_MODEL", "gemini-2.5-pro")
GEMINI_TEMPERATURE = env_float("GEMINI_TEMPERATURE", 0.3)
GEMINI_TOP_P = env_float("GEMINI_TOP_P", 0.8)
GEMINI_TOP_K = env_int("GEMINI_TOP_K", 40)
GEMINI_MAX_OUTPUT_TOKENS = env_int("GEMINI_MAX_OUTPUT_TOKENS", 2048)

# --- Origins (protocol §6) ------------------------------------------------------------------

# CHAT_ALLOWED_ORIGINS: full browser origins (scheme://host[:port]) allowed to open sockets.
CHAT_ALLOWED_ORIGINS = env_list(
    "CHAT_ALLOWED_ORIGINS",
    ["http://localhost:8000", "http://127.0.0.1:8000"] if DEBUG else [],
)
# CHAT_ALLOW_NO_ORIGIN: accept handshakes without an Origin header (native apps).
CHAT_ALLOW_NO_ORIGIN = env_bool("CHAT_ALLOW_NO_ORIGIN", True)

# --- Admin (operators) -----------------------------------------------------------------------

# The admin sees health data (chat content): who opens, searches, changes, deletes or exports
# what is recorded (chat/audit.py, AuditEntry, readable by superusers only), from the address
# Django sees, REMOTE_ADDR: the client's, read from X-Forwarded-For only behind one of
# CHAT_TRUSTED_PROXIES (chat/client_address.py). Django itself never reads that header.

# ADMIN_REQUIRE_2FA: the admin signs in staff only with a password and a verified one-time
# password device (TOTP, django-otp; `manage.py addtotpdevice <username>` makes one). Default:
# on with DEBUG off; required in production (a system check warns when it is off there).
ADMIN_REQUIRE_2FA = env_bool("ADMIN_REQUIRE_2FA", not DEBUG)
# A device's secret is never shown again in the admin (whoever could read it could pass for
# its owner): `manage.py addtotpdevice` prints it once, to the operator who makes it.
OTP_ADMIN_HIDE_SENSITIVE_DATA = True
OTP_TOTP_ISSUER = "Clarity Chat"  # the account's name in the authenticator app
# ADMIN_LOGIN_FAILURE_LIMIT / ADMIN_LOGIN_LOCKOUT: this many failed admin sign-ins within
# ADMIN_LOGIN_LOCKOUT seconds lock the username (whatever the address) and, separately, the
# client address (whatever the username: password spraying): further sign-ins are refused
# (429), even with the right password, until ADMIN_LOGIN_LOCKOUT seconds pass without
# another attempt. A successful sign-in clears the count. Counted in the database
# (django-axes), so across workers. `manage.py axes_reset_username <name>` and
# `manage.py axes_reset_ip <address>` lift a lockout early.
ADMIN_LOGIN_FAILURE_LIMIT = env_int("ADMIN_LOGIN_FAILURE_LIMIT", 5)
ADMIN_LOGIN_LOCKOUT = env_int("ADMIN_LOGIN_LOCKOUT", 900)
AXES_FAILURE_LIMIT = ADMIN_LOGIN_FAILURE_LIMIT
AXES_COOLOFF_TIME = timedelta(seconds=ADMIN_LOGIN_LOCKOUT)
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]
AXES_RESET_ON_SUCCESS = True
AXES_CLIENT_IP_CALLABLE = "chat.audit.client_address"
# Sign-ins and their refusals are in the audit (AuditEntry); axes keeps only the counters,
# and logs no start-up banner (it would come before the worker has an id to log with).
AXES_DISABLE_ACCESS_LOG = True
AXES_VERBOSE = False

# --- Logging --------------------------------------------------------------------------------

# LOG_LEVEL: level of the application's own loggers (`chat.*`); DEBUG adds per-socket detail.
# Other loggers keep the server's level (daphne: INFO at its default -v 1), Django's WARNING.
LOG_LEVEL = env_str("LOG_LEVEL", "INFO").upper()
# LOG_FORMAT: `json`, one object per line (time, level, logger, message, worker_id, and the
# socket's session_id, user_id, room_id when known; chat/logs.py), or `plain`, one line of
# text. Default: plain with DEBUG, json otherwise. Either way on stderr.
LOG_FORMAT = env_str("LOG_FORMAT", "plain" if DEBUG else "json")
if LOG_FORMAT not in {"json", "plain"}:
    raise ImproperlyConfigured(f"LOG_FORMAT must be json or plain, got {LOG_FORMAT!r}")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {"()": "chat.logs.JsonFormatter"},
    },
    # Every handler redacts (chat/logs.py): no token, credential or query string in any line,
    # whoever logged it (Django attaches the request, whole URL included, to its 4xx/5xx).
    "filters": {"redact": {"()": "chat.logs.RedactingFilter"}},
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": LOG_FORMAT,
            "filters": ["redact"],
        }
    },
    # One handler, on the root: the server's access log and daphne's, Django's and the
    # libraries' records come out in the same format as ours, redacted alike.
    "root": {"handlers": ["console"]},
    "loggers": {
        "chat": {"level": LOG_LEVEL},
        "django": {"level": "WARNING"},
    },
}
