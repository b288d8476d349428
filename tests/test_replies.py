"""The assistant in rooms (protocol §7), through the consumer: room modes, stored replies with
`in_reply_to`, the apology, context, and a slow provider not blocking the socket."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from channels.db import database_sync_to_async

from chat.assistant.base import APOLOGY
from chat.assistant.builtin import LABEL
from chat.models import ChatMessage, Room, RoomKind
from tests.gemini_api import model_says
from tests.test_analysis import day_of_minutes, read_analysis

pytestmark = pytest.mark.django_db(transaction=True)


async def read_reply(
    client, timeout: float = 5, skip: frozenset[str] | set[str] = frozenset()
) -> tuple[list[dict], dict]:
    """The next answer of the assistant this client gets: its `assistant_delta` frames, then
    its message (protocol §14); any other frame in between fails the test, but those of the
    `skip` types."""
    deltas = []
    while True:
        received = await client.recv(timeout=timeout)
        if received["type"] in skip:
            continue
        if received["type"] == "assistant_delta":
            deltas.append(received)
            continue
        assert received["type"] == "message" and received["user_id"] == "AI", received
        return deltas, received


def replies_to(reply: dict, question: dict) -> bool:
    """`reply` answers `question` and ends a stream (its metadata says both, nothing else)."""
    metadata = reply["metadata"]
    return metadata == {"in_reply_to": question["message_id"], "stream_id": metadata["stream_id"]}


async def ask(client, content: str) -> dict:
    """Send a chat message; return its broadcast frame (as the sender sees it)."""
    await client.send({"type": "message", "content": content})
    question = await client.recv_type("message")
    assert question["content"] == content
    return question


async def test_always_mode_answers_every_message_in_the_room(clients, settings):
    settings.ASSISTANT_MODE = "always"
    alice = await clients.join("lobby", "alice")
    bob = await clients.join("lobby", "bob")
    await alice.recv_type("user_joined")
    question = await ask(alice, "How can I sleep better?")
    assert (await bob.recv())["message_id"] == question["message_id"]

    for client in (alice, bob):
        deltas, reply = await read_reply(client)
        assert reply["type"] == "message" and reply["user_id"] == "AI"
        assert replies_to(reply, question)
        assert reply["content"].startswith(LABEL)
        assert reply["room_id"] == "lobby"
        assert "".join(delta["delta"] for delta in deltas) == reply["content"]
    stored = await database_sync_to_async(ChatMessage.objects.get)(pk=int(reply["message_id"]))
    assert stored.user_id == "AI" and stored.metadata == reply["metadata"]


async def test_mention_mode_answers_only_messages_starting_with_at_ai(clients, settings):
    settings.ASSISTANT_MODE = "always"
    settings.ASSISTANT_MAX_CONCURRENCY = 1  # replies one at a time, in the order asked
    await database_sync_to_async(Room.objects.create)(
        name="quiet", kind=RoomKind.PUBLIC, assistant_mode="mention"
    )
    alice = await clients.join("quiet", "alice")
    await ask(alice, "just chatting")
    question = await ask(alice, "@AI what is sleep efficiency?")
    _, reply = await read_reply(alice)  # a reply to "just chatting" would have come first
    assert reply["user_id"] == "AI"
    assert reply["metadata"]["in_reply_to"] == question["message_id"]
    await alice.expect_nothing_pending()


async def test_off_mode_never_answers(clients, settings):
    settings.ASSISTANT_MODE = "always"
    settings.ASSISTANT_MAX_CONCURRENCY = 1  # replies one at a time, in the order asked
    await database_sync_to_async(Room.objects.create)(
        name="humans", kind=RoomKind.PUBLIC, assistant_mode="off"
    )
    alice = await clients.join("humans", "alice")
    await ask(alice, "@ai are you there?")
    # A reply asked for later, in another room of this worker, comes after any reply to it.
    elsewhere = await clients.join("lobby", "alice")
    question = await ask(elsewhere, "@ai and here?")
    _, reply = await read_reply(elsewhere)
    assert replies_to(reply, question)
    await alice.expect_nothing_pending()


async def test_mode_changed_by_an_operator_applies_to_open_sockets(clients, settings):
    settings.ASSISTANT_MODE = "always"
    settings.ASSISTANT_MAX_CONCURRENCY = 1  # replies one at a time, in the order asked
    await database_sync_to_async(Room.objects.create)(
        name="switch", kind=RoomKind.PUBLIC, assistant_mode="off"
    )
    alice = await clients.join("switch", "alice")
    await ask(alice, "anyone?")

    def switch_on() -> None:  # as the admin's change form saves it
        room = Room.objects.get(pk="switch")
        room.assistant_mode = "always"
        room.save()

    await database_sync_to_async(switch_on)()
    question = await ask(alice, "and now?")
    _, reply = await read_reply(alice)  # a reply to "anyone?" would have come first
    assert reply["user_id"] == "AI"
    assert replies_to(reply, question)
    await alice.expect_nothing_pending()


async def test_provider_failure_gives_the_apology(clients, settings, gemini, api):
    settings.ASSISTANT_MODE = "always"
    api.generate.mock(return_value=httpx.Response(503, json={"error": {"code": 503}}))
    alice = await clients.join("lobby", "alice")
    question = await ask(alice, "Hello AI")
    deltas, reply = await read_reply(alice)
    assert reply["content"] == APOLOGY and deltas == []
    assert replies_to(reply, question)


async def test_the_model_gets_the_question_and_recent_room_messages(clients, settings, gemini, api):
    api.generate.mock(return_value=model_says("Try a wind-down."))
    alice = await clients.join("lobby", "alice")
    await ask(alice, "I had coffee at 9pm")
    settings.ASSISTANT_MODE = "always"
    await ask(alice, "Why can't I sleep?")
    _, reply = await read_reply(alice)
    assert reply["content"] == "Try a wind-down."
    body = json.loads(api.generate.calls.last.request.content)
    prompt = json.dumps(body)
    assert "Why can't I sleep?" in prompt and "I had coffee at 9pm" in prompt


async def test_a_slow_provider_does_not_block_the_socket(clients, settings, gemini, api):
    settings.ASSISTANT_MODE = "always"
    thinking, release = asyncio.Event(), asyncio.Event()

    async def slow_model(request):
        thinking.set()
        await release.wait()
        return model_says("Finally, an answer.")

    api.generate.mock(side_effect=slow_model)
    alice = await clients.join("lobby", "alice")
    await ask(alice, "A slow question")
    await asyncio.wait_for(thinking.wait(), 5)  # the model is thinking now
    for _ in range(3):  # heartbeats and chat keep flowing on the same socket meanwhile
        await alice.send({"type": "heartbeat"})
        assert (await alice.recv())["type"] == "heartbeat_ack"
    settings.ASSISTANT_MODE = "off"
    await alice.send({"type": "message", "content": "still chatting"})
    assert (await alice.recv())["content"] == "still chatting"
    release.set()
    _, reply = await read_reply(alice)
    assert reply["user_id"] == "AI" and reply["content"] == "Finally, an answer."


async def test_analysis_falls_back_to_the_builtin_narrative(clients, gemini, api):
    api.generate.mock(return_value=httpx.Response(500))
    alice = await clients.join("lobby", "alice")
    await alice.send({"type": "health_insight", "content": {"data_points": day_of_minutes()}})
    result = await read_analysis(alice)
    assert result["progress"][-1] == ("completed", 100)
    assert result["health_insight"]["insight"].startswith(LABEL)
    assert api.generate.called


async def test_analysis_narrative_from_gemini(clients, gemini, api):
    api.generate.mock(
        return_value=model_says(
            json.dumps(
                {
                    "narrative": "You slept about eight hours.",
                    "recommendations": ["Keep your schedule"],
                    "confidence_score": 0.9,
                }
            )
        )
    )
    alice = await clients.join("lobby", "alice")
    await alice.send({"type": "health_insight", "content": {"data_points": day_of_minutes()}})
    result = await read_analysis(alice)
    insight = result["health_insight"]
    assert insight["insight"] == "You slept about eight hours."
    assert insight["recommendations"] == ["Keep your schedule"] and insight["confidence"] == 0.9
    sent = json.dumps(json.loads(api.generate.calls.last.request.content))
    assert "total_sleep_time" in sent  # the metrics, not the raw data points, go to the model
    assert day_of_minutes()[0]["timestamp"] not in sent


@pytest.mark.parametrize(
    ("overrides", "error_id"),
    [
        ({"ASSISTANT_PROVIDER": "oracle"}, "chat.E002"),
        (
            {"ASSISTANT_PROVIDER": "gemini", "GEMINI_API_KEY": "", "GOOGLE_CLOUD_PROJECT": ""},
            "chat.E003",
        ),
        ({"ASSISTANT_MODE": "sometimes"}, "chat.E004"),
        ({"ASSISTANT_FIRST_CHUNK_TIMEOUT": 0}, "chat.E005"),
        ({"ASSISTANT_FIRST_CHUNK_TIMEOUT": 90, "ASSISTANT_TIMEOUT": 60}, "chat.E005"),
        ({"ASSISTANT_STREAM_DELIVERIES": 0}, "chat.E006"),
        ({"ASSISTANT_STREAM_INTERVAL": 0}, "chat.E006"),
        ({}, None),
    ],
)
def test_assistant_configuration_is_checked_at_start(settings, overrides, error_id):
    from django.core.checks import run_checks

    for name, value in overrides.items():
        setattr(settings, name, value)
    ids = [error.id for error in run_checks(tags=["clarity"])]
    assert ids == ([error_id] if error_id else [])
