"""Health analysis (protocol §7): the frames of an accepted analysis — progress, the
narrative's `assistant_delta` frames as the assistant writes it (§14), the insight and the
narrative as a message — all only for the requesting user.

The metrics come from an analysis process (chat/analysis_jobs.py, chat/analysis_pool.py);
only the narrative runs here, within the worker's assistant slots. Health payloads are never
logged: only counts and outcomes are.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from chat.assistant.base import (
    AssistantError,
    AssistantProvider,
    AssistantReply,
    AssistantRequest,
    ask,
)
from chat.assistant.builtin import builtin_reply
from chat.deltas import DeltaStream, DeltaTurns
from chat.protocol import (
    AI_USER_ID,
    AI_USERNAME,
    ErrorCode,
    MessageType,
    error_frame,
    frame,
)
from chat.rooms import user_group

logger = logging.getLogger(__name__)

Emit = Callable[[dict[str, Any]], Awaitable[None]]
QUESTION = "Based on recent health data."


def _progress(user_id: str, status: str, progress: int) -> dict[str, Any]:
    return frame(
        MessageType.ANALYSIS_UPDATE, user_id=user_id, status=status, progress=progress, details=None
    )


async def _narrative(
    *, provider: AssistantProvider, request: AssistantRequest, deltas: DeltaStream
) -> AssistantReply:
    """The provider's reply, streamed; if it fails, the deltas stop and the reply is the
    built-in narrative of the same metrics."""
    try:
        try:
            reply = await ask(provider, request, on_text=deltas.write)
        except AssistantError as exc:
            logger.warning("assistant failed for an analysis (%s): built-in narrative", exc)
            await deltas.finish(final=None)
            return builtin_reply(request)
        await deltas.finish(final=reply.narrative)
        return reply
    finally:
        deltas.cancel()


async def health_analysis(
    *,
    provider: AssistantProvider,
    slots: asyncio.Semaphore,
    user_id: str,
    username: str,
    metrics: dict[str, Any] | None,
    points: int,
    emit: Emit,
    turns: DeltaTurns,
) -> None:
    """The frames of one accepted analysis whose `metrics` were computed (None: they could not
    be): analysis_update, then health_insight and the narrative message, or the failure."""
    await emit(_progress(user_id, "started", 0))
    reply = None
    deltas = DeltaStream(
        kind="analysis",
        room_id=None,
        in_reply_to=None,
        emit=emit,
        group=user_group(user_id),
        turns=turns,
        sockets=1,  # the user's own sockets: a few, well within the delivery budget
    )
    if metrics is None:
        logger.info("health analysis failed for user=%s: the points cannot be analysed", user_id)
    else:
        await emit(_progress(user_id, "processing", 50))
        try:
            async with slots:
                reply = await _narrative(
                    provider=provider,
                    deltas=deltas,
                    request=AssistantRequest(
                        user_id=user_id,
                        username=username,
                        question=QUESTION,
                        context=(),
                        metrics=metrics,
                        kind="health_analysis",
                    ),
                )
        except (AssistantError, ValueError) as exc:
            logger.info("health analysis failed for user=%s: %s", user_id, type(exc).__name__)
    if reply is None:
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
            source_data=metrics,
            recommendations=reply.recommendations,
        )
    )
    await emit(
        frame(
            MessageType.MESSAGE,
            content=reply.narrative,
            user_id=AI_USER_ID,
            username=AI_USERNAME,
            metadata={"analysis": True, "stream_id": deltas.stream_id},
            client_message_id=None,
            room_id=None,
            # Never stored, so no room event: no seq (protocol §15; sent as null, §3).
            seq=None,
            changed_seq=None,
        )
    )
    await emit(_progress(user_id, "completed", 100))
    logger.info("health analysis done for user=%s points=%d", user_id, points)
