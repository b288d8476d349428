"""The inbound pipeline's pure steps (protocol §5, §16): size, JSON, schema, type.

The consumer pays for every frame before it does anything else with it (chat/budgets.py),
then runs them in order: (size, heartbeat?) -> (budgets) -> binary -> size -> JSON ->
object/schema -> type. Only a frame small enough to be a heartbeat is decoded before it is
paid for, to know whether it is one. A frame over the message size can only be an analysis
request: it is never decoded here but in an analysis process (chat/analysis_jobs.py), as
are the analysis frames of any size.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from chat.protocol import (
    ErrorCode,
    FrameError,
    HeartbeatIn,
    Inbound,
    MessageType,
    decode_json,
    validate,
)


def utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def frame_size(text: str | None, data: bytes | None) -> int:
    """The frame's size in bytes, text or binary."""
    return utf8_size(text) if text is not None else len(data or b"")


def small_heartbeat(text: str | None, *, size: int, max_size: int) -> HeartbeatIn | None:
    """The frame as a valid heartbeat, if it is one no larger than `max_size`; else None."""
    if text is None or size > max_size:
        return None
    try:
        return well_formed_heartbeat(decode_json(text))
    except FrameError:
        return None


def large_frame(
    text: str | None,
    *,
    size: int,
    max_size: int,
    max_large_size: int,
    large_types: frozenset[str],
) -> bool:
    """Whether a text frame of `size` bytes is over `max_size` and may be an analysis request
    (one of `large_types`), to be decoded off the event loop; FrameError if it is binary, over
    `max_large_size`, or over `max_size` without naming any of `large_types` (a substring
    search, no decoding: junk never reaches an analysis process)."""
    if text is None:
        raise FrameError(ErrorCode.UNSUPPORTED_FRAME)
    if size > max_large_size:
        raise FrameError(ErrorCode.MESSAGE_TOO_LARGE, {"max_size": max_large_size})
    if size <= max_size:
        return False
    if not any(f'"{type_}"' in text for type_ in large_types):
        raise FrameError(ErrorCode.MESSAGE_TOO_LARGE, {"max_size": max_size})
    return True


def frame_type(data: Any) -> str | None:
    """The `type` of a decoded frame, if it is an object with a string type."""
    type_ = data.get("type") if isinstance(data, dict) else None
    return type_ if isinstance(type_, str) else None


def well_formed_heartbeat(data: Any) -> HeartbeatIn | None:
    """A valid heartbeat (exempt from the rate limit), else None."""
    if frame_type(data) != MessageType.HEARTBEAT:
        return None
    try:
        return HeartbeatIn.model_validate(data)
    except ValidationError:
        return None


def parse_message(data: Any, schemas: dict[str, type[Inbound]]) -> Inbound:
    """Validate a decoded frame against the schema of its type."""
    if not isinstance(data, dict):
        raise FrameError(
            ErrorCode.MESSAGE_PARSE_ERROR,
            {"errors": [{"loc": [], "msg": "Frame must be a JSON object", "type": "dict_type"}]},
        )
    type_ = frame_type(data)
    schema = schemas.get(type_) if type_ is not None else None
    if schema is None:
        raise FrameError(ErrorCode.UNKNOWN_MESSAGE_TYPE, type=str(data.get("type"))[:64])
    return validate(schema, data)
