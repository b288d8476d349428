"""Gemini through the google-genai SDK (the original's model and parameters, protocol §7),
streamed (§14): `generate_content_stream` on the async client, each chunk's text handed on
as it arrives.

With GEMINI_API_KEY the Gemini Developer API is used, otherwise Vertex AI with
GOOGLE_CLOUD_PROJECT / GOOGLE_CLOUD_LOCATION and application-default credentials. The call
is asynchronous (the original's blocked the event loop), with the SDK's retries off; `ask`
(chat/assistant/base.py) bounds it and guards it with the shared circuit breaker.

Chat replies are asked for as plain text; analyses as JSON, whose narrative is read out of
the chunks as they come (streamed_text.JsonNarrative). A chunk that ends the answer for any
reason but STOP or MAX_TOKENS (a safety block, a recitation, ...) fails the whole reply,
whatever was streamed before it.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from google import genai
from google.genai import types

from chat.assistant.base import AssistantError, AssistantReply, AssistantRequest, OnText
from chat.assistant.breaker import Guard
from chat.assistant.prompts import RESPONSE_TYPES, build_prompt, parse_reply, text_reply
from chat.assistant.streamed_text import JsonNarrative
from chat.timers import Clock

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


# The reasons an answer may end and still be used (MAX_TOKENS: cut short).
MAX_TOKENS = types.FinishReason.MAX_TOKENS
USABLE_ENDINGS = frozenset(
    {types.FinishReason.FINISH_REASON_UNSPECIFIED, types.FinishReason.STOP, MAX_TOKENS}
)
# More of the model's output than this is not read (max_output_tokens bounds it far below).
RAW_MAX_CHARS = 64_000


def _build_client() -> genai.Client:
    http_options = types.HttpOptions(
        base_url=settings.GEMINI_BASE_URL or None,
        # Milliseconds. `ask`'s timeouts are the real bounds; this one makes the HTTP client
        # give up too instead of leaving a request behind.
        timeout=max(1, round(settings.ASSISTANT_TIMEOUT * 1000)),
        # One attempt: a retry could not fit in the timeouts, and the breaker handles a
        # failing provider.
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


def _config(*, request: AssistantRequest, system_instruction: str) -> types.GenerateContentConfig:
    return types.GenerateContentConfig(
        system_instruction=system_instruction,
        temperature=settings.GEMINI_TEMPERATURE,
        top_p=settings.GEMINI_TOP_P,
        top_k=settings.GEMINI_TOP_K,
        max_output_tokens=settings.GEMINI_MAX_OUTPUT_TOKENS,
        response_mime_type=RESPONSE_TYPES[request.kind],
        safety_settings=SAFETY_SETTINGS,
        # No tools are declared: nothing for the SDK to call back.
        automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
    )


def _chunk_text(chunk: types.GenerateContentResponse) -> tuple[str, Any]:
    """A chunk's text and its finish reason (None while the answer goes on); a blocked
    prompt is an AssistantError."""
    feedback = chunk.prompt_feedback
    if feedback is not None and feedback.block_reason:
        raise AssistantError(f"the prompt was blocked ({feedback.block_reason})")
    if not chunk.candidates:
        return "", None
    candidate = chunk.candidates[0]
    parts = candidate.content.parts if candidate.content and candidate.content.parts else []
    # Text parts only, thoughts left out (chunk.text would warn about other parts).
    text = "".join(part.text for part in parts if part.text and not part.thought)
    return text, candidate.finish_reason


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
        # The breaker's notion of now is `clock`'s (its open period is wall-clock time).
        self.guard = Guard(name=self.name, clock=clock)

    async def prepare(self) -> None:
        await self._client_ready()

    def close(self) -> None:
        return None  # nothing outside the loop: its HTTP client goes with it

    async def _client_ready(self) -> genai.Client:
        if self._client is None:
            # Construction loads CA certificates from disk: keep it off the event loop.
            self._client = await asyncio.to_thread(_build_client)
        return self._client

    async def stream(self, request: AssistantRequest, *, on_text: OnText) -> AssistantReply:
        client = await self._client_ready()  # built by `ask`'s `prepare` already
        prompt = build_prompt(request=request)
        narrative = JsonNarrative() if RESPONSE_TYPES[request.kind] == "application/json" else None
        pieces: list[str] = []
        size, ending = 0, None
        chunks = await client.aio.models.generate_content_stream(
            model=settings.GEMINI_MODEL,
            contents=prompt.user_text,
            config=_config(request=request, system_instruction=prompt.system_instruction),
        )
        async with aclosing(chunks):
            async for chunk in chunks:
                text, ending = _chunk_text(chunk)
                size += len(text)
                if size > RAW_MAX_CHARS:
                    raise AssistantError("the model's reply is too long")
                if ending is not None and ending not in USABLE_ENDINGS:
                    # Blocked by the safety settings, or stopped for another reason: what
                    # came with the verdict is not passed on.
                    raise AssistantError(f"the model stopped: {ending}")
                pieces.append(text)
                on_text(narrative.feed(text) if narrative is not None else text)
        text = "".join(pieces)
        if not text:
            raise AssistantError(f"no text in the model's reply (finish reason {ending})")
        if narrative is not None:
            return parse_reply(text=text, provider=self.name)
        return text_reply(text=text, provider=self.name, cut_short=ending == MAX_TOKENS)
