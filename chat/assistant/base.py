"""The assistant's small API (protocol §7, §14): a request, a reply, one error, the provider
chosen by settings.ASSISTANT_PROVIDER, and `ask`, which bounds every call.

Providers are plain objects with a `name`, a `guard` (the shared circuit breaker of a
provider that calls a service; None for the built-in one) and an async `stream`, which hands
each piece of the answer to a callback as the model writes it and returns the whole reply.
`get_provider()` builds a new one on every call; the caller decides its lifetime (one per
worker event loop is the intent: the Gemini provider's process keeps its HTTP connection
pool).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from chat.assistant.breaker import Guard
from chat.metrics import ASSISTANT_FIRST_CHUNK_SECONDS, ASSISTANT_SECONDS

# A reply is stored as a chat message, whose content limit is 2,000 characters.
REPLY_MAX_CHARS = 2000
APOLOGY = "I am sorry, I could not generate a response at this time."

PROVIDERS = {
    "builtin": "chat.assistant.builtin.BuiltinProvider",
    "gemini": "chat.assistant.gemini.GeminiProvider",
}
# Providers that run in a process of their own, not on the worker's event loop
# (chat/assistant/process.py): their SDK's CPU per streamed piece would hold every socket.
APART = frozenset({"gemini"})

# Called with each piece of the answer as it arrives: the narrative's text as the model
# wrote it (not yet sanitised), "" for a piece that holds none of it.
OnText = Callable[[str], None]


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
    # The circuit breaker `ask` consults and feeds; None: nothing to guard (no network).
    guard: Guard | None

    async def prepare(self) -> None:
        """Local set-up before the first call (an HTTP client built), outside the time
        limits: they bound the model, not this worker."""
        ...

    async def stream(self, request: AssistantRequest, *, on_text: OnText) -> AssistantReply:
        """Answer `request`, calling `on_text` with each piece as the model writes it, and
        return the reply; AssistantError on any failure (a safety block mid-answer too).
        The time limits are `ask`'s: a provider need not bound itself."""
        ...

    def close(self) -> None:
        """Stop what the provider runs outside the event loop (a process), if anything."""
        ...


def provider_class(name: str | None = None) -> type[AssistantProvider]:
    """The class of provider `name` (default: settings.ASSISTANT_PROVIDER), its module (and
    SDK) imported: in the worker for a provider that runs in it, in the provider's own
    process for one that runs apart."""
    name = name or settings.ASSISTANT_PROVIDER
    path = PROVIDERS.get(name)
    if path is None:
        raise ImproperlyConfigured(
            f"ASSISTANT_PROVIDER must be one of {sorted(PROVIDERS)}, got {name!r}"
        )
    return import_string(path)


def get_provider() -> AssistantProvider:
    """A new provider of the kind named by settings.ASSISTANT_PROVIDER: one of APART is
    the worker's handle on a process that runs it (started by its first `prepare`)."""
    if settings.ASSISTANT_PROVIDER in APART:
        from chat.assistant.process import ProviderProcess  # it builds on this module

        return ProviderProcess(provider=settings.ASSISTANT_PROVIDER)
    return provider_class()()


async def ask(
    provider: AssistantProvider, request: AssistantRequest, *, on_text: OnText | None = None
) -> AssistantReply:
    """The provider's reply, with its pieces passed to `on_text` as they arrive, bounded:
    the first piece must come within ASSISTANT_FIRST_CHUNK_TIMEOUT, and each next one
    within that much of the one before (a stalled stream ends as a silent one does), and
    the whole reply within ASSISTANT_TIMEOUT. A guarded provider is not called while its
    breaker is open, and every outcome, timeouts included, is reported to the breaker."""
    guard = provider.guard
    if guard is not None:
        try:
            permit = await guard.admit()
        except Exception as exc:
            raise AssistantError("circuit breaker state unavailable") from exc
        if not permit.allowed:
            raise AssistantError(f"circuit open for {permit.retry_after:.1f} s more")
    try:
        await provider.prepare()
    except Exception as exc:
        raise AssistantError(f"{provider.name} could not be set up: {type(exc).__name__}") from exc
    loop = asyncio.get_running_loop()
    started = loop.time()
    first_chunk = settings.ASSISTANT_FIRST_CHUNK_TIMEOUT
    deadline = started + settings.ASSISTANT_TIMEOUT
    heard_first = False
    outcome = "error"
    try:
        async with asyncio.timeout_at(min(started + first_chunk, deadline)) as bound:

            def heard(piece: str) -> None:
                nonlocal heard_first
                now = loop.time()
                if not heard_first:
                    heard_first = True
                    ASSISTANT_FIRST_CHUNK_SECONDS.labels(provider.name).observe(now - started)
                bound.reschedule(min(now + first_chunk, deadline))
                if piece and on_text is not None:
                    on_text(piece)

            reply = await provider.stream(request, on_text=heard)
        outcome = "ok"
    except TimeoutError as exc:
        outcome = "timeout"
        waited = "the rest of its answer" if heard_first else "its first words"
        failure = AssistantError(f"{provider.name} timed out waiting for {waited}")
        failure.__cause__ = exc
    except AssistantError as exc:
        failure = exc
    except Exception as exc:
        failure = AssistantError(f"{provider.name} call failed: {type(exc).__name__}")
        failure.__cause__ = exc
    finally:
        ASSISTANT_SECONDS.labels(provider.name, outcome).observe(loop.time() - started)
    if guard is not None:
        await guard.record(ok=outcome == "ok")
    if outcome != "ok":
        raise failure
    return reply
