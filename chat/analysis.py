"""Health analysis (protocol §7): actigraphy metrics from the user's data points, a narrative
from the assistant, and progress frames — all only for the requesting user.

Health payloads are never logged: only counts and outcomes are.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from chat.actigraphy import ActigraphyError, DataPoint, analyze_actigraphy
from chat.assistant.base import (
    AssistantError,
    AssistantProvider,
    AssistantReply,
    AssistantRequest,
    ask,
)
from chat.assistant.builtin import BuiltinProvider
from chat.protocol import (
    AI_USER_ID,
    AI_USERNAME,
    ErrorCode,
    HealthPayload,
    MessageType,
    error_frame,
    frame,
)

logger = logging.getLogger(__name__)

Emit = Callable[[dict[str, Any]], Awaitable[None]]
QUESTION = "Based on recent health data."


def _progress(user_id: str, status: str, progress: int) -> dict[str, Any]:
    return frame(
        MessageType.ANALYSIS_UPDATE, user_id=user_id, status=status, progress=progress, details=None
    )


async def _narrative(*, provider: AssistantProvider, request: AssistantRequest) -> AssistantReply:
    """The provider's reply; the built-in narrative of the same metrics if it fails."""
    try:
        return await ask(provider, request)
    except AssistantError as exc:
        logger.warning("assistant failed for an analysis (%s): built-in narrative", exc)
        return await BuiltinProvider().reply(request)


async def health_analysis(
    *, provider: AssistantProvider, user_id: str, username: str, payload: HealthPayload, emit: Emit
) -> None:
    """Run one analysis, emitting analysis_update, health_insight and the narrative message."""
    await emit(_progress(user_id, "started", 0))
    points = [DataPoint(timestamp=p.timestamp, value=p.value) for p in payload.data_points]
    try:
        metrics = await asyncio.to_thread(analyze_actigraphy, points=points, steps=payload.steps)
        await emit(_progress(user_id, "processing", 50))
        source = metrics.as_dict()
        reply = await _narrative(
            provider=provider,
            request=AssistantRequest(
                user_id=user_id,
                username=username,
                question=QUESTION,
                context=(),
                metrics=source,
                kind="health_analysis",
            ),
        )
    except (ActigraphyError, AssistantError, ValueError) as exc:
        logger.info("health analysis failed for user=%s: %s", user_id, type(exc).__name__)
        await emit(error_frame(ErrorCode.HEALTH_ANALYSIS_ERROR))
        await emit(_progress(user_id, "failed", 100))
        return
    await emit(
        frame(
            MessageType.HEALTH_INSIGHT,
            user_id=user_id,
            insight=reply.narrative,
            confidence=reply.confidence,
            category="sleep_activity",
            source_data=source,
            recommendations=reply.recommendations,
        )
    )
    await emit(
        frame(
            MessageType.MESSAGE,
            content=reply.narrative,
            user_id=AI_USER_ID,
            username=AI_USERNAME,
            metadata={"analysis": True},
            client_message_id=None,
            room_id=None,
        )
    )
    await emit(_progress(user_id, "completed", 100))
    logger.info("health analysis done for user=%s points=%d", user_id, len(points))
