"""The built-in assistant: deterministic, no network (the embedded default, and the fallback
narrative of a health analysis when the model fails).

Every reply is labelled with LABEL and ends with NOT_MEDICAL_ADVICE.

Health analyses: the narrative lists the metrics present (None ones are skipped) and applies
RULES, simple thresholds drawn from common sleep-hygiene guidance; each rule that fires adds a
key insight and a recommendation. Confidence is the original's fallback value, 0.75, scaled by
the share of the seven metrics present (all None gives 0.0).
"""

from __future__ import annotations

import asyncio
import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from chat.assistant.base import AssistantReply, AssistantRequest, OnText
from chat.assistant.prompts import sanitize_text

LABEL = "[Clarity built-in assistant] "
NOT_MEDICAL_ADVICE = (
    "This is general information, not medical advice; for health concerns, "
    "talk to a qualified professional."
)
CONFIDENCE = 0.75
QUOTE_MAX_CHARS = 120


@dataclass(frozen=True)
class Rule:
    metric: str
    compare: Callable[[float, float], bool]
    threshold: float
    insight: str
    recommendation: str


# (metric, how the narrative describes its value)
METRICS: tuple[tuple[str, str], ...] = (
    ("total_sleep_time", "total sleep time {:.1f} hours"),
    ("sleep_efficiency", "sleep efficiency {:.0%}"),
    ("sleep_onset_latency", "{:.0f} minutes to fall asleep"),
    ("wake_after_sleep_onset", "{:.0f} minutes awake after first falling asleep"),
    ("interdaily_stability", "day-to-day regularity (interdaily stability) {:.2f} of 1"),
    ("intradaily_variability", "activity fragmentation (intradaily variability) {:.2f}"),
    ("relative_amplitude", "day/night activity contrast (relative amplitude) {:.2f} of 1"),
)

RULES: tuple[Rule, ...] = (
    Rule(
        "sleep_efficiency",
        operator.lt,
        0.85,
        "Sleep efficiency is below the usual 85% target.",
        "Keep the bed for sleep: go to bed when sleepy, get up if you lie awake for more than "
        "about 20 minutes, and keep the bedroom dark, quiet and cool.",
    ),
    Rule(
        "sleep_onset_latency",
        operator.gt,
        30,
        "Falling asleep takes more than 30 minutes.",
        "Give yourself a 30-60 minute screen-free wind-down before bed, and avoid caffeine "
        "after midday.",
    ),
    Rule(
        "wake_after_sleep_onset",
        operator.gt,
        30,
        "You are awake for more than 30 minutes during the night.",
        "Avoid alcohol, heavy meals and large drinks late in the evening; if night waking "
        "goes on, mention it to a clinician.",
    ),
    Rule(
        "total_sleep_time",
        operator.lt,
        7,
        "You sleep less than 7 hours.",
        "Most adults need 7-9 hours: plan a longer sleep window, for example by going to bed "
        "earlier.",
    ),
    Rule(
        "interdaily_stability",
        operator.lt,
        0.5,
        "Your daily rhythm varies a lot from day to day.",
        "Keep the same sleep and wake times every day, weekends included.",
    ),
    Rule(
        "intradaily_variability",
        operator.gt,
        1.0,
        "Your activity is fragmented within the day.",
        "Build longer blocks of daytime activity, and keep naps short (under 30 minutes) and "
        "early.",
    ),
    Rule(
        "relative_amplitude",
        operator.lt,
        0.8,
        "Your day/night activity contrast is low.",
        "Get daylight and movement during the day, and keep evenings dim and calm.",
    ),
)

# (words that pick the topic, general pointer)
TOPICS: tuple[tuple[frozenset[str], str], ...] = (
    (
        frozenset({"sleep", "sleeping", "insomnia", "tired", "nap", "bed", "bedtime", "wake"}),
        "For better sleep, keep regular bed and wake times, get daylight in the morning, and "
        "keep screens and caffeine out of the evening.",
    ),
    (
        frozenset({"stress", "stressed", "anxious", "anxiety", "worried", "overwhelmed"}),
        "When stress builds up, short breaks, slow breathing, a walk outside and talking with "
        "someone you trust can help.",
    ),
    (
        frozenset({"exercise", "workout", "activity", "active", "steps", "walk", "walking"}),
        "Regular movement helps: adults are generally advised to build up to about 150 "
        "minutes of moderate activity a week.",
    ),
    (
        frozenset({"sad", "depressed", "depression", "mood", "lonely", "hopeless"}),
        "If low mood lasts more than a couple of weeks, or you ever feel unsafe, please reach "
        "out to a professional or a local crisis line right away.",
    ),
)
NO_TOPIC = (
    "I run without an AI model, so I can only offer general pointers about sleep, stress, "
    "activity and mood; a health analysis gives a summary of your own data."
)
NO_DATA = (
    "There was not enough activity data to estimate your sleep and daily rhythm. Wear your "
    "device day and night for a few days and send the data again for a fuller analysis."
)

_TOKEN = re.compile(r"\w+")
# A word and the whitespace after it: the pieces of a streamed answer.
_WORDS = re.compile(r"\s*\S+\s*")
_WORD = re.compile(r"\w{4,}")
# Common words that would make unrelated messages look related.
_STOPWORDS = frozenset(
    _TOKEN.findall(
        "about also been could does from have into just know like more much please should "
        "some than thanks that their them then there they think this very were what when "
        "where which will with would your"
    )
)


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower())) - _STOPWORDS


def _quote(text: str) -> str:
    return '"' + sanitize_text(text, max_chars=QUOTE_MAX_CHARS) + '"'


def _related(question: str, context: Sequence[tuple[str, str]]) -> tuple[str, str] | None:
    """The most recent earlier message sharing a meaningful word with the question."""
    words = _words(question)
    for username, content in reversed(context):
        if content != question and words & _words(content):
            return username, content
    return None


def _chat(request: AssistantRequest) -> AssistantReply:
    tokens = set(_TOKEN.findall(request.question.lower()))
    tips = [tip for keywords, tip in TOPICS if keywords & tokens] or [NO_TOPIC]
    lines = [f"{LABEL}Thanks, {request.username}. You asked: {_quote(request.question)}."]
    related = _related(request.question, request.context)
    if related is not None:
        lines.append(f"Earlier in this room, {related[0]} mentioned {_quote(related[1])}.")
    lines += [*tips, NOT_MEDICAL_ADVICE]
    return AssistantReply(
        narrative=sanitize_text("\n".join(lines)),
        key_insights=[],
        recommendations=[tip for tip in tips if tip != NO_TOPIC],
        confidence=CONFIDENCE,
        provider=BuiltinProvider.name,
    )


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _analysis(metrics: Mapping[str, Any]) -> AssistantReply:
    values = {key: _number(metrics.get(key)) for key, _ in METRICS}
    present = {key: value for key, value in values.items() if value is not None}
    if not present:
        return AssistantReply(
            narrative=f"{LABEL}{NO_DATA}\n{NOT_MEDICAL_ADVICE}",
            key_insights=[],
            recommendations=[],
            confidence=0.0,
            provider=BuiltinProvider.name,
        )
    fired = [r for r in RULES if r.metric in present and r.compare(present[r.metric], r.threshold)]
    insights = [rule.insight for rule in fired] or [
        "Your measured values are within common targets."
    ]
    recommendations = [rule.recommendation for rule in fired]
    summary = ", ".join(text.format(present[key]) for key, text in METRICS if key in present)
    lines = [f"{LABEL}Here is a summary of your recent activity data: {summary}.", *insights]
    if recommendations:
        lines.append("Suggestions: " + " ".join(recommendations))
    lines.append(NOT_MEDICAL_ADVICE)
    return AssistantReply(
        narrative=sanitize_text("\n".join(lines)),
        key_insights=insights,
        recommendations=recommendations,
        confidence=round(CONFIDENCE * len(present) / len(METRICS), 2),
        provider=BuiltinProvider.name,
    )


def builtin_reply(request: AssistantRequest) -> AssistantReply:
    """The built-in answer to `request`, all at once."""
    if request.kind == "health_analysis":
        return _analysis(request.metrics or {})
    return _chat(request)


class BuiltinProvider:
    """Streams its answer word by word, ASSISTANT_BUILTIN_WORD_DELAY seconds apart (a model's
    pace; 0 in tests: all at once)."""

    name = "builtin"
    guard = None

    async def prepare(self) -> None:
        return None

    def close(self) -> None:
        return None

    async def stream(self, request: AssistantRequest, *, on_text: OnText) -> AssistantReply:
        reply = builtin_reply(request)
        delay = settings.ASSISTANT_BUILTIN_WORD_DELAY
        for word in _WORDS.findall(reply.narrative):
            on_text(word)
            if delay > 0:
                await asyncio.sleep(delay)
        return reply
