"""The assistant's small API (protocol §7): a request, a reply, one error, and the provider
chosen by settings.ASSISTANT_PROVIDER.

Providers are plain objects with a `name` and an async `reply`. `get_provider()` builds a new
one on every call; the caller decides its lifetime (one per worker process is the intent: the
Gemini provider keeps its HTTP connection pool).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from chat.metrics import ASSISTANT_SECONDS

# A reply is stored as a chat message, whose content limit is 2,000 characters.
REPLY_MAX_CHARS = 2000
APOLOGY = "I am sorry, I could not generate a response at this time."

PROVIDERS = {
    "builtin": "chat.assistant.builtin.BuiltinProvider",
    "gemini": "chat.assistant.gemini.GeminiProvider",
}


@dataclass(frozen=True)
class AssistantRequest:
    user_id: str
    username: str
    # The user's message, or "Based on recent health data." for analyses.
    question: str
    # Recent room messages, oldest first, as (username, content); may be empty.
    context: Sequence[tuple[str, str]]
    # Actigraphy metrics for health analyses, else None.
    metrics: Mapping[str, Any] | None
    kind: Literal["chat", "health_analysis"]


@dataclass(frozen=True)
class AssistantReply:
    # Already sanitised and at most REPLY_MAX_CHARS long.
    narrative: str
    key_insights: list[str]
    recommendations: list[str]
    # 0..1
    confidence: float
    provider: str


class AssistantError(Exception):
    """Any provider failure: timeout, HTTP error, malformed reply, circuit breaker open."""


class AssistantProvider(Protocol):
    name: str

    async def reply(self, request: AssistantRequest) -> AssistantReply:
        """The reply, or AssistantError. Network providers bound themselves by
        settings.ASSISTANT_TIMEOUT (a timeout that fires there counts towards the breaker)."""
        ...


def get_provider() -> AssistantProvider:
    """A new provider of the kind named by settings.ASSISTANT_PROVIDER."""
    path = PROVIDERS.get(settings.ASSISTANT_PROVIDER)
    if path is None:
        raise ImproperlyConfigured(
            f"ASSISTANT_PROVIDER must be one of {sorted(PROVIDERS)}, "
            f"got {settings.ASSISTANT_PROVIDER!r}"
        )
    return import_string(path)()


async def ask(provider: AssistantProvider, request: AssistantRequest) -> AssistantReply:
    """The provider's reply, bounded: a provider that does not bound itself is cut off a
    little after ASSISTANT_TIMEOUT (the slack lets a self-bounding provider time out first,
    so its timeout counts towards its circuit breaker)."""
    started, outcome = time.monotonic(), "error"
    try:
        async with asyncio.timeout(settings.ASSISTANT_TIMEOUT + 2):
            reply = await provider.reply(request)
        outcome = "ok"
        return reply
    except TimeoutError:
        outcome = "timeout"
        raise AssistantError(f"{provider.name} did not answer in time") from None
    finally:
        ASSISTANT_SECONDS.labels(provider.name, outcome).observe(time.monotonic() - started)
