"""The v1 wire protocol as data: message types, the error and close-code tables, inbound
schemas and the outbound frame envelope. Shared by the consumer and the tests.

See docs/protocol.md for the project's extensions of ../shared/protocol.md.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum, StrEnum
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

ROOM_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
HEALTH_ROOM_PREFIX = "health_analysis_"
# The assistant's identity (protocol §7, §11): no token may carry this uid, and no user is
# shown with this display name.
AI_USER_ID = "AI"
AI_USERNAME = "AI"
# Keys the server writes in a message's metadata; refused in a client's (protocol §11).
SERVER_METADATA_KEYS = frozenset(
    {"in_reply_to", "analysis", "stream_id", "edited_at", "deleted_at"}
)
METADATA_MAX_BYTES = 4096
METADATA_MAX_DEPTH = 8
HISTORY_MAX_LIMIT = 100
CONTENT_MAX_CHARS = 2000
CLIENT_ID_MAX_CHARS = 128


class MessageType(StrEnum):
    # client -> server
    MESSAGE = "message"
    TYPING = "typing"
    HEARTBEAT = "heartbeat"
    HEALTH_INSIGHT = "health_insight"
    HEALTH_DATA = "health_data"
    HISTORY = "history"
    AUTH = "auth"
    # server -> client (MESSAGE, TYPING, HEARTBEAT, HEALTH_INSIGHT and HISTORY go both ways)
    CONNECTION_ACK = "connection_ack"
    PRESENCE = "presence"
    SYSTEM = "system"
    USER_JOINED = "user_joined"
    USER_LEFT = "user_left"
    HEARTBEAT_ACK = "heartbeat_ack"
    AUTH_ACK = "auth_ack"
    ANALYSIS_UPDATE = "analysis_update"
    ERROR = "error"
    # v1.1 (protocol §15)
    RESYNC = "resync"
    # v1.1 (protocol §12): `read` both ways; `edit` and `delete` in, their broadcasts out
    READ = "read"
    EDIT = "edit"
    DELETE = "delete"
    MESSAGE_UPDATED = "message_updated"
    MESSAGE_DELETED = "message_deleted"
    # v1.1 (protocol §14): the assistant's answer as it is written
    ASSISTANT_DELTA = "assistant_delta"


class ErrorCode(StrEnum):
    AUTH_REQUIRED = "AUTH_REQUIRED"
    AUTH_INVALID = "AUTH_INVALID"
    AUTH_EXPIRED = "AUTH_EXPIRED"
    AUTH_UNAVAILABLE = "AUTH_UNAVAILABLE"
    USER_ID_MISMATCH = "USER_ID_MISMATCH"
    INVALID_ROOM = "INVALID_ROOM"
    ROOM_CLOSED = "ROOM_CLOSED"
    ROOM_FULL = "ROOM_FULL"
    TOO_MANY_CONNECTIONS = "TOO_MANY_CONNECTIONS"
    UNSUPPORTED_FRAME = "UNSUPPORTED_FRAME"
    MESSAGE_TOO_LARGE = "MESSAGE_TOO_LARGE"
    RATE_LIMIT_EXCEEDED = "RATE_LIMIT_EXCEEDED"
    INVALID_JSON = "INVALID_JSON"
    MESSAGE_PARSE_ERROR = "MESSAGE_PARSE_ERROR"
    UNKNOWN_MESSAGE_TYPE = "UNKNOWN_MESSAGE_TYPE"
    TOO_MANY_DATA_POINTS = "TOO_MANY_DATA_POINTS"
    INVALID_HEALTH_INSIGHT_CONTENT = "INVALID_HEALTH_INSIGHT_CONTENT"
    INVALID_HEALTH_DATA_PAYLOAD = "INVALID_HEALTH_DATA_PAYLOAD"
    HEALTH_ANALYSIS_ERROR = "HEALTH_ANALYSIS_ERROR"
    CONNECTION_TIMEOUT = "CONNECTION_TIMEOUT"
    SESSION_TERMINATED = "SESSION_TERMINATED"
    SERVICE_UNAVAILABLE = "SERVICE_UNAVAILABLE"
    # v1.1 (protocol §11)
    ROOM_FORBIDDEN = "ROOM_FORBIDDEN"
    NOT_ALLOWED = "NOT_ALLOWED"
    INVALID_REQUEST = "INVALID_REQUEST"
    # v1.1 (protocol §12)
    MESSAGE_NOT_FOUND = "MESSAGE_NOT_FOUND"
    # v1.1 (protocol §16)
    SLOW_CONSUMER = "SLOW_CONSUMER"


# The human-readable text of each error; `{name}` placeholders are filled from the details
# (or, for UNKNOWN_MESSAGE_TYPE, from the offending type).
ERROR_MESSAGES: dict[ErrorCode, str] = {
    ErrorCode.AUTH_REQUIRED: "Authentication token is required",
    ErrorCode.AUTH_INVALID: "Invalid or expired token",
    ErrorCode.AUTH_EXPIRED: "Token expired",
    ErrorCode.AUTH_UNAVAILABLE: "Authentication unavailable",
    ErrorCode.USER_ID_MISMATCH: "User ID mismatch",
    ErrorCode.INVALID_ROOM: "Invalid room",
    ErrorCode.ROOM_CLOSED: "Room is closed",
    ErrorCode.ROOM_FULL: "Room is full",
    ErrorCode.TOO_MANY_CONNECTIONS: "Too many connections",
    ErrorCode.UNSUPPORTED_FRAME: "Binary frames are not supported",
    ErrorCode.MESSAGE_TOO_LARGE: "Message size exceeds {max_size} bytes",
    ErrorCode.RATE_LIMIT_EXCEEDED: "Too many messages, please slow down",
    ErrorCode.INVALID_JSON: "Invalid JSON format",
    ErrorCode.MESSAGE_PARSE_ERROR: "Failed to parse message",
    ErrorCode.UNKNOWN_MESSAGE_TYPE: "Unknown message type: {type}",
    ErrorCode.TOO_MANY_DATA_POINTS: "Exceeded maximum data points limit of {max_allowed}",
    ErrorCode.INVALID_HEALTH_INSIGHT_CONTENT: "Health insight content validation failed.",
    ErrorCode.INVALID_HEALTH_DATA_PAYLOAD: "Health data payload validation failed.",
    ErrorCode.HEALTH_ANALYSIS_ERROR: "Failed to perform health analysis",
    ErrorCode.CONNECTION_TIMEOUT: "Connection timeout",
    ErrorCode.SESSION_TERMINATED: "Session terminated by an operator",
    ErrorCode.SERVICE_UNAVAILABLE: "Service unavailable",
    # The same text whether the room does not exist or the user may not see it.
    ErrorCode.ROOM_FORBIDDEN: "Room not found",
    ErrorCode.NOT_ALLOWED: "Not allowed",
    ErrorCode.INVALID_REQUEST: "Invalid request",
    ErrorCode.MESSAGE_NOT_FOUND: "Message not found",
    ErrorCode.SLOW_CONSUMER: "Client too slow",
}


@dataclass(frozen=True)
class CloseSpec:
    code: int
    reason: str
    error: ErrorCode  # the error frame sent just before closing


class Close(Enum):
    """Every way the server ends a socket: the error frame it sends first, then the close.

    Application codes are 4000 + the standard code they stand for (protocol §10); 1011 is
    never sent.
    """

    CONNECTION_TIMEOUT = CloseSpec(1000, "Connection timeout", ErrorCode.CONNECTION_TIMEOUT)
    NO_TOKEN = CloseSpec(4001, "Authentication token is required", ErrorCode.AUTH_REQUIRED)
    INVALID_TOKEN = CloseSpec(4003, "Invalid or expired token", ErrorCode.AUTH_INVALID)
    TOKEN_EXPIRED = CloseSpec(4003, "Token expired", ErrorCode.AUTH_EXPIRED)
    USER_ID_MISMATCH = CloseSpec(4003, "User ID mismatch", ErrorCode.USER_ID_MISMATCH)
    INVALID_ROOM = CloseSpec(4004, "Invalid room", ErrorCode.INVALID_ROOM)
    ROOM_FORBIDDEN = CloseSpec(4004, "Room not found", ErrorCode.ROOM_FORBIDDEN)
    ROOM_CLOSED = CloseSpec(4004, "Room closed", ErrorCode.ROOM_CLOSED)
    ROOM_FULL = CloseSpec(4004, "Room full", ErrorCode.ROOM_FULL)
    TOO_MANY_CONNECTIONS = CloseSpec(4008, "Too many connections", ErrorCode.TOO_MANY_CONNECTIONS)
    SLOW_CONSUMER = CloseSpec(4009, "Client too slow", ErrorCode.SLOW_CONSUMER)
    SESSION_TERMINATED = CloseSpec(4010, "Session terminated", ErrorCode.SESSION_TERMINATED)
    SHUTDOWN = CloseSpec(4012, "Server shutdown", ErrorCode.SERVICE_UNAVAILABLE)
    AUTH_UNAVAILABLE = CloseSpec(4013, "Authentication unavailable", ErrorCode.AUTH_UNAVAILABLE)
    SERVICE_UNAVAILABLE = CloseSpec(4013, "Service unavailable", ErrorCode.SERVICE_UNAVAILABLE)
    RATE_LIMITED = CloseSpec(4029, "Rate limit exceeded", ErrorCode.RATE_LIMIT_EXCEEDED)


# --- Inbound schemas ------------------------------------------------------------------------


def storable_text(value: str) -> str:
    """Reject what no database or UTF-8 encoder takes: NUL and lone surrogates."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must not contain unpaired surrogates") from None
    return value


def _storable_json(value: Any) -> Any:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            storable_text(item)
        elif isinstance(item, dict):
            for key, inner in item.items():
                storable_text(key)
                stack.append(inner)
        elif isinstance(item, list):
            stack.extend(item)
    return value


def _client_metadata(value: dict[str, Any]) -> dict[str, Any]:
    """Bounded (encoded size, nesting) and free of the keys the server writes."""
    reserved = sorted(SERVER_METADATA_KEYS.intersection(value))
    if reserved:
        raise ValueError(f"keys reserved for the server: {', '.join(reserved)}")
    if len(encode(value).encode()) > METADATA_MAX_BYTES:
        raise ValueError(f"must be at most {METADATA_MAX_BYTES} bytes encoded")
    level = [value]
    for _ in range(METADATA_MAX_DEPTH):
        level = [
            inner
            for item in level
            for inner in (item.values() if isinstance(item, dict) else item)
            if isinstance(inner, dict | list)
        ]
    if level:
        raise ValueError(f"must be at most {METADATA_MAX_DEPTH} levels deep")
    return value


Text = Annotated[str, AfterValidator(storable_text)]
ClientId = Annotated[
    str, Field(min_length=1, max_length=CLIENT_ID_MAX_CHARS), AfterValidator(storable_text)
]
JsonObject = Annotated[dict[str, Any], AfterValidator(_storable_json)]


def _message_id(value: Any) -> Any:
    # Stored ids travel as strings (`message_id`); accept them back as strings or integers.
    if isinstance(value, str) and value.strip().isdecimal():
        return int(value)
    return value


MessageId = Annotated[int, BeforeValidator(_message_id), Field(ge=1)]
# A room's sequence number (protocol §15); 0 is "before the first event".
Seq = Annotated[int, Field(strict=True, ge=0, le=2**63 - 1)]


class Inbound(BaseModel):
    """Base of every client frame: strings stripped, unknown keys ignored, no type coercion."""

    model_config = ConfigDict(str_strip_whitespace=True, extra="ignore", strict=True, frozen=True)

    type: str


class ChatIn(Inbound):
    content: Annotated[Text, Field(min_length=1, max_length=CONTENT_MAX_CHARS)]
    message_id: ClientId | None = None
    metadata: Annotated[JsonObject, AfterValidator(_client_metadata)] | None = None
    user_id: ClientId | None = None


class TypingIn(Inbound):
    is_typing: bool
    user_id: ClientId | None = None
    username: Text | None = None


class HeartbeatIn(Inbound):
    client_timestamp: Text | None = None


class HistoryIn(Inbound):
    before: MessageId | None = None
    after: MessageId | None = None
    before_seq: Seq | None = None
    after_seq: Seq | None = None
    limit: Annotated[int, Field(ge=1, le=HISTORY_MAX_LIMIT)] = 50
    request_id: ClientId | None = None

    @model_validator(mode="after")
    def _one_bound(self) -> HistoryIn:
        bounds = [self.before, self.after, self.before_seq, self.after_seq]
        if sum(bound is not None for bound in bounds) > 1:
            raise ValueError("give at most one of before, after, before_seq, after_seq")
        return self

    @property
    def catching_up(self) -> bool:
        """A catch-up read (protocol §15): paid from its own allowance."""
        return self.after_seq is not None


class ReadIn(Inbound):
    """The user has read the socket's room up to `seq` (protocol §12)."""

    seq: Seq


class EditIn(Inbound):
    """The author replaces a stored message's content (protocol §12)."""

    message_id: MessageId
    content: Annotated[Text, Field(min_length=1, max_length=CONTENT_MAX_CHARS)]


class DeleteIn(Inbound):
    """The author, or a moderator or owner, deletes a stored message (protocol §12)."""

    message_id: MessageId


class AuthIn(Inbound):
    token: Annotated[str, Field(min_length=1)]


class HealthInsightIn(Inbound):
    content: JsonObject  # a HealthPayload, validated with its own error code
    user_id: ClientId | None = None


class HealthDataIn(Inbound):
    data: JsonObject  # a HealthPayload, validated with its own error code


class DataPointIn(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    timestamp: datetime
    value: Annotated[float, Field(allow_inf_nan=False)]


class HealthPayload(BaseModel):
    """Minute-level activity counts (protocol §7); ISO-8601 timestamps, numeric values."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    data_points: list[DataPointIn] = []
    steps: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None


def health_payload(data: dict[str, Any], *, max_points: int, invalid: ErrorCode) -> HealthPayload:
    """The validated payload, or FrameError: TOO_MANY_DATA_POINTS, or `invalid` with
    structured `validation_errors`."""
    points = data.get("data_points")
    if isinstance(points, list) and len(points) > max_points:
        raise FrameError(
            ErrorCode.TOO_MANY_DATA_POINTS, {"received": len(points), "max_allowed": max_points}
        )
    try:
        return HealthPayload.model_validate(data)
    except ValidationError as exc:
        raise FrameError(invalid, {"validation_errors": validation_errors(exc)}) from None


# What each endpoint accepts, by type; and which of its types may be health-payload sized.
CHAT_SCHEMAS: dict[str, type[Inbound]] = {
    MessageType.MESSAGE: ChatIn,
    MessageType.TYPING: TypingIn,
    MessageType.HEARTBEAT: HeartbeatIn,
    MessageType.HISTORY: HistoryIn,
    MessageType.AUTH: AuthIn,
    MessageType.HEALTH_INSIGHT: HealthInsightIn,
    MessageType.READ: ReadIn,
    MessageType.EDIT: EditIn,
    MessageType.DELETE: DeleteIn,
}
HEALTH_SCHEMAS: dict[str, type[Inbound]] = {
    MessageType.HEALTH_DATA: HealthDataIn,
    MessageType.HEARTBEAT: HeartbeatIn,
    MessageType.AUTH: AuthIn,
}
CHAT_LARGE_TYPES = frozenset({MessageType.HEALTH_INSIGHT})
HEALTH_LARGE_TYPES = frozenset({MessageType.HEALTH_DATA})


@dataclass(frozen=True)
class AnalysisFrame:
    """An analysis request frame: its envelope schema, the field holding its HealthPayload,
    and the error code of an invalid payload."""

    type: str
    schema: type[Inbound]
    payload_field: str
    invalid: ErrorCode


# The frames that ask for a health analysis (protocol §7): exactly the large types.
ANALYSIS_FRAMES: dict[str, AnalysisFrame] = {
    MessageType.HEALTH_INSIGHT: AnalysisFrame(
        MessageType.HEALTH_INSIGHT,
        HealthInsightIn,
        "content",
        ErrorCode.INVALID_HEALTH_INSIGHT_CONTENT,
    ),
    MessageType.HEALTH_DATA: AnalysisFrame(
        MessageType.HEALTH_DATA, HealthDataIn, "data", ErrorCode.INVALID_HEALTH_DATA_PAYLOAD
    ),
}


class FrameError(Exception):
    """A bad inbound frame: answered with one error frame; the socket stays open."""

    def __init__(self, code: ErrorCode, details: dict[str, Any] | None = None, **fmt: Any):
        super().__init__(code)
        self.code = code
        self.details = details
        self.fmt = fmt


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


def decode_json(text: str) -> Any:
    """Strict JSON: no NaN/Infinity, no overflowing numbers; too deep or too long is invalid."""
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError):
        raise FrameError(ErrorCode.INVALID_JSON) from None


def validation_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """Pydantic's errors reduced to JSON-safe {loc, msg, type} (no echo of the input)."""
    return [
        {"loc": list(err["loc"]), "msg": err["msg"], "type": err["type"]}
        for err in exc.errors(include_url=False, include_input=False, include_context=False)
    ]


def validate(schema: type[Inbound], data: dict[str, Any]) -> Inbound:
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise FrameError(
            ErrorCode.MESSAGE_PARSE_ERROR, {"errors": validation_errors(exc)}
        ) from None


# --- Outbound frames ------------------------------------------------------------------------


def iso(moment: datetime) -> str:
    """UTC ISO-8601 with a `Z` suffix, as every server timestamp."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def now_iso() -> str:
    return iso(datetime.now(UTC))


def echo_timestamp(value: str | None) -> str | None:
    """A heartbeat's client_timestamp echoed back if it is an ISO timestamp, else null."""
    if value is None:
        return None
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return None
    return value


def _seconds(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def connection_ack_frame(
    *,
    user_id: str,
    session_id: str,
    room_id: str,
    heartbeat_interval: float,
    connection_timeout: float,
    max_message_size: int,
    rate_limit: int,
    last_seq: int,
    stream_idle_timeout: float,
) -> dict[str, Any]:
    """`last_seq`: the room's latest seq when the socket joined (protocol §15);
    `stream_idle_timeout`: seconds after which a client drops a silent stream's partial
    text (§14)."""
    return frame(
        MessageType.CONNECTION_ACK,
        user_id=user_id,
        session_id=session_id,
        server_info={
            "server_time": now_iso(),
            "heartbeat_interval": _seconds(heartbeat_interval),
            "connection_timeout": _seconds(connection_timeout),
            "max_message_size": max_message_size,
            "rate_limit": rate_limit,
            "room_id": room_id,
            "last_seq": last_seq,
            "stream_idle_timeout": _seconds(stream_idle_timeout),
        },
    )


def frame(type_: MessageType, *, message_id: str | None = None, **fields: Any) -> dict[str, Any]:
    """A server frame: the envelope (type, timestamp, message_id) first, then the fields."""
    return {"type": str(type_), "timestamp": now_iso(), "message_id": message_id, **fields}


def error_frame(code: ErrorCode, details: dict[str, Any] | None = None, **fmt: Any) -> dict:
    message = ERROR_MESSAGES[code].format(**{**(details or {}), **fmt})
    return frame(MessageType.ERROR, error_code=str(code), message=message, details=details)


def encode(payload: dict[str, Any]) -> str:
    # ensure_ascii keeps every frame valid UTF-8 on the wire, whatever the client sent.
    return json.dumps(payload, separators=(",", ":"))
