"""Gemini through the google-genai SDK (the original's model and parameters, protocol §7).

With GEMINI_API_KEY the Gemini Developer API is used, otherwise Vertex AI with
GOOGLE_CLOUD_PROJECT / GOOGLE_CLOUD_LOCATION and application-default credentials. The call
is asynchronous (the original's blocked the event loop), bounded by ASSISTANT_TIMEOUT with the
SDK's retries off, and guarded by the shared circuit breaker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from google import genai
from google.genai import types

from chat.assistant.base import AssistantError, AssistantReply, AssistantRequest
from chat.assistant.breaker import breaker_allow, breaker_record_failure, breaker_record_success
from chat.assistant.prompts import build_prompt, parse_reply
from chat.timers import Clock, LoopClock

logger = logging.getLogger(__name__)

SAFETY_SETTINGS = [
    types.SafetySetting(
        category=category, threshold=types.HarmBlockThreshold.BLOCK_MEDIUM_AND_ABOVE
    )
    for category in (
        types.HarmCategory.HARM_CATEGORY_DANGEROUS_CONTENT,
        types.HarmCategory.HARM_CATEGORY_HARASSMENT,
        types.HarmCategory.HARM_CATEGORY_HATE_SPEECH,
        types.HarmCategory.HARM_CATEGORY_SEXUALLY_EXPLICIT,
    )
]


def _build_client() -> genai.Client:
    http_options = types.HttpOptions(
        # Milliseconds. The asyncio timeout around the call is the real bound; this one
        # makes the HTTP client give up too instead of leaving a request behind.
        timeout=max(1, round(settings.ASSISTANT_TIMEOUT * 1000)),
        # One attempt: a retry could not fit in ASSISTANT_TIMEOUT, and the breaker handles
        # a failing provider.
        retry_options=types.HttpRetryOptions(attempts=1),
    )
    if settings.GEMINI_API_KEY:
        return genai.Client(
            vertexai=False, api_key=settings.GEMINI_API_KEY, http_options=http_options
        )
    return genai.Client(
        vertexai=True,
        project=settings.GOOGLE_CLOUD_PROJECT,
        location=settings.GOOGLE_CLOUD_LOCATION,
        http_options=http_options,
    )


class GeminiProvider:
    name = "gemini"

    def __init__(self, *, clock: Clock | None = None) -> None:
        if not settings.GEMINI_API_KEY and not settings.GOOGLE_CLOUD_PROJECT:
            raise ImproperlyConfigured(
                "ASSISTANT_PROVIDER=gemini needs GEMINI_API_KEY or GOOGLE_CLOUD_PROJECT"
            )
        # Built on first use and then reused: it holds the HTTP connection pool. Two first
        # calls racing may each build one; the loser is simply dropped.
        self._client: genai.Client | None = None
        # The breaker's notion of now (its open period is wall-clock time).
        self.clock: Clock = clock or LoopClock()

    async def _client_ready(self) -> genai.Client:
        if self._client is None:
            # Construction loads CA certificates from disk: keep it off the event loop.
            self._client = await asyncio.to_thread(_build_client)
        return self._client

    async def _generate(self, client: genai.Client, request: AssistantRequest) -> str:
        prompt = build_prompt(request=request)
        response = await client.aio.models.generate_content(
            model=settings.GEMINI_MODEL,
            contents=prompt.user_text,
            config=types.GenerateContentConfig(
                system_instruction=prompt.system_instruction,
                temperature=settings.GEMINI_TEMPERATURE,
                top_p=settings.GEMINI_TOP_P,
                top_k=settings.GEMINI_TOP_K,
                max_output_tokens=settings.GEMINI_MAX_OUTPUT_TOKENS,
                response_mime_type="application/json",
                safety_settings=SAFETY_SETTINGS,
            ),
        )
        text = response.text
        if not text:
            # Blocked by the safety settings, or all tokens spent before any text.
            reason = response.candidates[0].finish_reason if response.candidates else None
            raise AssistantError(f"no text in the model's reply (finish reason {reason})")
        return text

    def _now(self) -> float:
        return self.clock.now().timestamp()

    async def _record(self, record: Callable[..., None], **kwargs: float) -> None:
        try:
            await asyncio.to_thread(record, name=self.name, **kwargs)
        except Exception:
            logger.warning("circuit breaker update failed for %s", self.name, exc_info=True)

    async def reply(self, request: AssistantRequest) -> AssistantReply:
        try:
            permit = await asyncio.to_thread(breaker_allow, name=self.name, now=self._now())
        except Exception as exc:
            raise AssistantError("circuit breaker state unavailable") from exc
        if not permit.allowed:
            raise AssistantError(f"circuit open for {permit.retry_after:.1f} s more")
        try:
            # Outside the timeout: a one-off local cost (about 0.1 s), not the provider's.
            client = await self._client_ready()
            async with asyncio.timeout(settings.ASSISTANT_TIMEOUT):
                text = await self._generate(client, request)
            reply = parse_reply(text=text, provider=self.name)
        except Exception as exc:
            await self._record(breaker_record_failure, now=self._now())
            if isinstance(exc, AssistantError):
                raise
            raise AssistantError(f"Gemini call failed: {type(exc).__name__}") from exc
        await self._record(breaker_record_success)
        return reply
