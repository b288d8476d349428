"""The part of a health analysis that runs in the worker's analysis processes (protocol §16):
from the frame's raw text to the actigraphy metrics, or the typed refusal of the frame.

Decoding a week of minute data (about 600 KB of JSON), validating its 10,080 points and
computing the metrics cost tens of milliseconds of CPU each: on the event loop, or in a thread
holding the GIL, that is time every other socket of the worker waits. Here it runs in another
process (chat/analysis_pool.py), so this module imports only what that needs: the protocol's
schemas (pydantic) and the numpy analyzer, no Django. The job takes and returns plain
picklable values and never raises for a bad frame: the refusal is a value, with the error
code and details the consumer sends as they are.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any

from chat.actigraphy import ActigraphyError, DataPoint, analyze_actigraphy
from chat.protocol import (
    ANALYSIS_FRAMES,
    ErrorCode,
    FrameError,
    decode_json,
    health_payload,
    validate,
)


@dataclass(frozen=True)
class AnalysisLimits:
    """What the job checks a frame against (the socket's SocketConfig and endpoint)."""

    # The analysis frame types of the socket's endpoint: a frame of any other type that is
    # large enough to be sent here is MESSAGE_TOO_LARGE, as on the loop.
    types: frozenset[str]
    max_message_size: int
    max_points: int


@dataclass(frozen=True)
class FrameRejected:
    """The frame is refused: one error frame to the sender, nothing else happens."""

    code: ErrorCode
    details: dict[str, Any] | None = None


@dataclass(frozen=True)
class Analysed:
    """A valid analysis request of `type`, and its metrics (None: the points cannot be
    analysed, the analysis fails visibly)."""

    type: str
    points: int
    metrics: dict[str, Any] | None


def analysis_job(text: str, *, user_id: str, limits: AnalysisLimits) -> FrameRejected | Analysed:
    """Decode, check the type, validate the envelope and the payload, compute: the checks of
    the inbound pipeline (protocol §5) and of §7, in their order, on the frame's raw text."""
    try:
        data = decode_json(text)
        spec = ANALYSIS_FRAMES.get(data.get("type")) if isinstance(data, dict) else None
        if spec is None or spec.type not in limits.types:
            raise FrameError(ErrorCode.MESSAGE_TOO_LARGE, {"max_size": limits.max_message_size})
        envelope = validate(spec.schema, data)
        claimed = getattr(envelope, "user_id", None)
        if claimed is not None and claimed != user_id:
            raise FrameError(ErrorCode.USER_ID_MISMATCH)
        content = getattr(envelope, spec.payload_field)
        payload = health_payload(content, max_points=limits.max_points, invalid=spec.invalid)
    except FrameError as err:
        return FrameRejected(code=err.code, details=err.details)
    points = [DataPoint(timestamp=p.timestamp, value=p.value) for p in payload.data_points]
    try:
        metrics = analyze_actigraphy(points=points, steps=payload.steps).as_dict()
    except ActigraphyError:
        metrics = None
    return Analysed(type=spec.type, points=len(points), metrics=metrics)


def analysis_process_init() -> None:
    """Each analysis process: signals meant for the worker (a terminal's Ctrl-C, systemd's
    SIGTERM to the whole unit) are not for it, it stops when the worker stops its pool; and it
    exits by itself if the worker dies without doing so (SIGKILL, OOM), instead of lingering."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(
            target=_exit_with, args=(parent.sentinel,), name="parent-watch", daemon=True
        ).start()


def _exit_with(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    os._exit(0)
