"""Streaming assistant replies (protocol §14): `assistant_delta` frames as the model writes,
then the stored message with `metadata.stream_id`.

The Gemini API is mocked at the HTTP boundary only (tests/gemini_api.py): the SDK's real
`generate_content_stream` reads server-sent events from a chunked response, some slow, some
broken, some blocked. The streamed text is attacked too: a model writing markup split across
chunks, escapes split across chunks, more than a message may hold.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import threading

import httpx
import pytest
from channels.db import database_sync_to_async
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from chat.assistant.base import APOLOGY, REPLY_MAX_CHARS, get_provider
from chat.assistant.process import Pieces
from chat.assistant.prompts import TRUNCATED, sanitize_text
from chat.assistant.streamed_text import JsonNarrative, StreamText
from chat.deltas import MAX_TURN_INTERVAL, DeltaStream, DeltaTurns
from chat.membership import room_create_private
from chat.models import ChatMessage
from chat.rooms import room_group
from chat.testing.clock import ManualClock
from chat.testing.processes import alive
from chat.testing.waiting import eventually
from tests.conftest import builtin_reply, stored_message
from tests.gemini_api import chunk, model_says, model_streams, model_writes
from tests.test_analysis import day_of_minutes, read_analysis
from tests.test_replies import ask, read_reply

pytestmark = pytest.mark.django_db(transaction=True)


def pieces_of(text: str, cuts: list[int]) -> list[str]:
    """`text` cut at the given offsets (taken modulo its length, in order)."""
    points = sorted({cut % (len(text) + 1) for cut in cuts} | {0, len(text)})
    return [text[a:b] for a, b in itertools.pairwise(points)]


# --- the text as streamed ---------------------------------------------------------------------

TRICKY = st.sampled_from(
    [
        "sleep ",
        "well",
        " ",
        "  ",
        "\n",
        "\n\n\n",
        "\r\n",
        "<b>",
        "</b>",
        "<script>",
        "alert(1)",
        "</script>",
        "<style>x{}</style>",
        "<!--",
        "-->",
        "<",
        ">",
        "a<b",
        "<p",
        "<scr",
        "ipt>",
        "<!",
        "-",
        "x < 5",
        "<img src=x onerror=alert(1)>",
        "\x00",
        "\u202e",
        "&amp;",
        "é",
        "😴",
        "\t",
    ]
)


@hypothesis_settings(max_examples=300, deadline=None)
@given(words=st.lists(TRICKY, max_size=60), cuts=st.lists(st.integers(0, 10_000), max_size=30))
def test_streamed_text_adds_up_to_the_stored_text(words, cuts):
    """However the model's text is cut into chunks, what is streamed is always a prefix of
    the stored (sanitised) text, and the last delta completes it exactly."""
    raw = "".join(words)
    final = sanitize_text(raw)
    stream = StreamText()
    shown = ""
    for piece in pieces_of(raw, cuts):
        stream.feed(piece)
        shown += stream.take()
        assert final.startswith(shown)
    shown += stream.take() + stream.rest(final)
    assert shown == final


@hypothesis_settings(max_examples=50, deadline=None)
@given(word=st.sampled_from(["rest ", "<p>Rest well.</p> ", "a\n\n", "x" * 30 + " "]))
def test_streamed_text_is_capped_like_the_stored_text(word):
    raw = word * (3 * REPLY_MAX_CHARS // len(word))
    final = sanitize_text(raw)
    assert final.endswith(TRUNCATED) and len(final) <= REPLY_MAX_CHARS
    stream = StreamText()
    shown = ""
    for piece in pieces_of(raw, list(range(0, len(raw), 7))):
        stream.feed(piece)
        shown += stream.take()
        assert len(shown) < REPLY_MAX_CHARS and final.startswith(shown)
    assert shown + stream.take() + stream.rest(final) == final


def test_markup_split_across_chunks_is_never_streamed():
    stream = StreamText()
    shown = []
    for piece in ["Hi <scr", "ipt>alert(", "1)</scr", "ipt> there <im", "g src=x onerror=", "y>!"]:
        stream.feed(piece)
        shown.append(stream.take())
    text = "".join(shown)
    assert "<" not in text and "alert" not in text and "onerror" not in text
    assert text + stream.rest(sanitize_text("".join(shown))) == "Hi there !"


@hypothesis_settings(max_examples=300, deadline=None)
@given(
    narrative=st.text(),
    before=st.booleans(),
    ascii_only=st.booleans(),
    cuts=st.lists(st.integers(0, 100_000), max_size=40),
)
def test_the_narrative_is_read_out_of_json_as_it_streams(narrative, before, ascii_only, cuts):
    """Escapes (\\n, \\", \\uXXXX, surrogate pairs) split anywhere, other fields before it
    (with a nested `narrative` of their own), a code fence: only the narrative comes out."""
    fields = {"narrative": narrative, "recommendations": ['a "b" \\ c'], "confidence_score": 1}
    if before:
        fields = {"key_insights": [{"narrative": "not this"}, "x"], **fields}
    text = "```json\n" + json.dumps(fields, ensure_ascii=ascii_only) + "\n```"
    reader = JsonNarrative()
    assert "".join(reader.feed(piece) for piece in pieces_of(text, cuts)) == narrative


def test_a_reply_that_is_not_json_streams_as_text():
    reader = JsonNarrative()
    assert reader.feed("  Sleep ") + reader.feed("more.") == "Sleep more."


# --- replies in a room, through the SDK's streaming call ---------------------------------------


async def room_with_two(clients, settings):
    settings.ASSISTANT_MODE = "always"
    alice = await clients.join("lobby", "alice")
    bob = await clients.join("lobby", "bob")
    await alice.recv_type("user_joined")
    return alice, bob


async def test_a_reply_streams_to_the_room_in_order_then_is_stored(clients, settings, gemini, api):
    text = "Try a regular bedtime, and keep the bedroom dark and cool. Sleep well!"
    api.generate.mock(return_value=model_writes(text, pieces=6, delay=0.02))
    alice, bob = await room_with_two(clients, settings)
    question = await ask(alice, "How can I sleep better?")
    await bob.recv_type("message")
    for client in (alice, bob):
        deltas, reply = await read_reply(client)
        assert reply["content"] == text
        stream_id = reply["metadata"]["stream_id"]
        assert deltas and [d["index"] for d in deltas] == list(range(len(deltas)))
        for delta in deltas:
            assert delta["stream_id"] == stream_id and delta["kind"] == "reply"
            assert delta["room_id"] == "lobby"
            assert delta["in_reply_to"] == question["message_id"]
            assert delta["message_id"] is None and delta["timestamp"]
        assert "".join(d["delta"] for d in deltas) == text
    stored = await database_sync_to_async(ChatMessage.objects.get)(pk=int(reply["message_id"]))
    assert stored.content == text and stored.metadata["stream_id"] == stream_id


async def test_a_fast_model_is_coalesced_into_few_frames(clients, settings, gemini, api):
    """200 chunks as fast as they come go out as a few frames (one per
    ASSISTANT_STREAM_INTERVAL: the turns test checks the pace exactly, on a manual clock)."""
    settings.ASSISTANT_STREAM_INTERVAL = 0.05
    text = "word " * 200
    api.generate.mock(return_value=model_writes(text, pieces=200, delay=0.001))
    alice, _ = await room_with_two(clients, settings)
    await ask(alice, "Tell me a lot")
    deltas, reply = await read_reply(alice)
    assert "".join(d["delta"] for d in deltas) == reply["content"] == text.strip()
    assert len(deltas) < 50


async def test_the_streamed_text_is_sanitised_and_capped(clients, settings, gemini, api):
    """The model writes markup split across chunks and far more than a message holds."""
    chunks = ["Rest <scr", "ipt>steal()</scr", "ipt>well <b>to", "night</b>. "]
    chunks += ["More words here. "] * 300
    api.generate.mock(
        return_value=model_streams([chunk(p) for p in chunks] + [chunk(finish="STOP")])
    )
    alice, _ = await room_with_two(clients, settings)
    await ask(alice, "Hi")
    deltas, reply = await read_reply(alice)
    streamed = "".join(d["delta"] for d in deltas)
    assert streamed == reply["content"]
    assert reply["content"].startswith("Rest well tonight. More words")
    assert reply["content"].endswith(TRUNCATED) and len(reply["content"]) <= REPLY_MAX_CHARS
    assert all("<" not in d["delta"] and "steal" not in d["delta"] for d in deltas)


async def test_a_mid_stream_error_stops_the_deltas_and_stores_the_apology(
    clients, settings, gemini, api
):
    api.generate.mock(
        return_value=model_streams(
            [chunk("You should "), chunk("try to "), chunk("never sent")],
            delays=[0, 0.1, 0.1],
            broken_after=2,
        )
    )
    alice, bob = await room_with_two(clients, settings)
    question = await ask(alice, "Hello AI")
    await bob.recv_type("message")
    deltas, reply = await read_reply(bob)
    assert "".join(d["delta"] for d in deltas) == "You should try to"
    assert reply["content"] == APOLOGY
    assert reply["metadata"] == {
        "in_reply_to": question["message_id"],
        "stream_id": deltas[0]["stream_id"],
    }


@pytest.mark.parametrize(
    "ending",
    [
        [chunk("Here is how to "), chunk("hurt", finish="SAFETY")],
        [chunk("Quoting: "), chunk(finish="RECITATION")],
        [{"promptFeedback": {"blockReason": "SAFETY"}}],
    ],
    ids=["safety-mid-stream", "recitation", "prompt-blocked"],
)
async def test_a_blocked_answer_ends_the_stream_with_the_apology(
    clients, settings, gemini, api, ending
):
    api.generate.mock(return_value=model_streams(ending))
    alice, _ = await room_with_two(clients, settings)
    await ask(alice, "Something risky")
    deltas, reply = await read_reply(alice)
    assert reply["content"] == APOLOGY
    assert "hurt" not in "".join(d["delta"] for d in deltas)


async def test_a_slow_chunk_past_the_timeout_ends_the_stream(clients, settings, gemini, api):
    """The first chunk comes in time, the next one stalls past ASSISTANT_FIRST_CHUNK_TIMEOUT:
    the stream ends with the apology well before the model would have finished."""
    settings.ASSISTANT_FIRST_CHUNK_TIMEOUT = 0.3
    api.generate.mock(
        return_value=model_streams(
            [chunk("Let me think. "), chunk("Too late.", finish="STOP")], delays=[0, 3]
        )
    )
    alice, _ = await room_with_two(clients, settings)
    await ask(alice, "Hi")
    deltas, reply = await read_reply(alice)
    assert [d["delta"] for d in deltas] == ["Let me think."]
    assert reply["content"] == APOLOGY  # not "Let me think. Too late.": the stream was cut


async def test_a_silent_model_times_out_on_its_first_chunk(clients, settings, gemini, api):
    settings.ASSISTANT_FIRST_CHUNK_TIMEOUT = 0.3
    api.generate.mock(return_value=model_streams([chunk("Late.", finish="STOP")], delays=[3]))
    alice, _ = await room_with_two(clients, settings)
    await ask(alice, "Hi")
    deltas, reply = await read_reply(alice)
    assert deltas == [] and reply["content"] == APOLOGY


async def test_a_model_that_trickles_on_is_cut_at_the_total_timeout(clients, settings, gemini, api):
    """Each chunk within the first-chunk timeout, but the whole answer past ASSISTANT_TIMEOUT:
    cut, and cancelled in the provider's process too, whose request to the model is hung up
    at once rather than read to its end."""
    settings.ASSISTANT_FIRST_CHUNK_TIMEOUT = 0.5
    settings.ASSISTANT_TIMEOUT = 0.8
    api.generate.mock(
        return_value=model_streams([chunk(f"part {i} ") for i in range(40)], delays=[0.1] * 40)
    )
    alice, _ = await room_with_two(clients, settings)
    await ask(alice, "Hi")
    deltas, reply = await read_reply(alice)
    assert deltas and reply["content"] == APOLOGY
    await eventually(lambda: api.server.dropped, what="the model's request hung up")
    assert api.server.dropped == 1


async def test_a_provider_process_that_dies_fails_its_answers_and_is_replaced(
    clients, settings, gemini, api
):
    """Killed mid-answer (out of memory, an operator): the room gets the apology, and the
    next question starts a new process, which answers."""
    from clarity_project.asgi import worker

    settings.ASSISTANT_MODE = "always"
    writing = asyncio.Event()

    async def model(request):
        writing.set()
        return model_writes("Never finished.", pieces=3, delay=5)

    api.generate.mock(side_effect=model)
    alice = await clients.join("lobby", "alice")
    provider = worker.assistant
    first_pid = provider.pid
    await ask(alice, "Are you there?")
    await asyncio.wait_for(writing.wait(), 5)
    os.kill(first_pid, signal.SIGKILL)
    _, reply = await read_reply(alice, timeout=5)
    assert reply["content"] == APOLOGY
    api.generate.mock(side_effect=None, return_value=model_says("Back again."))
    await ask(alice, "And now?")
    _, reply = await read_reply(alice, timeout=30)
    assert reply["content"] == "Back again."
    assert provider.pid not in (None, first_pid)


async def test_the_provider_process_sends_first_words_at_once_then_batches():
    """`Pieces` (in the provider process): the first piece goes at once; the next ones
    together once per interval; what is left goes before the end, nothing after it."""
    clock = ManualClock()
    sent: list[str] = []
    pieces = Pieces(send=sent.append, interval=0.05, clock=clock)
    pieces.add("Sleep")
    assert sent == ["Sleep"]
    pieces.add(" is")
    pieces.add(" a")
    await clock.advance(0.049)
    assert sent == ["Sleep"]
    await clock.advance(0.001)
    assert sent == ["Sleep", " is a"]
    pieces.add(" habit.")
    pieces.flush()
    pieces.cancel()
    await clock.advance(1)
    assert sent == ["Sleep", " is a", " habit."]


async def test_a_closed_provider_process_exits(gemini, api):
    """A worker's `close` (it is stopping) ends its provider process."""
    provider = get_provider()
    await provider.prepare()
    pid = provider.pid
    provider.close()
    await eventually(lambda: not alive(pid), what=f"the provider process {pid} ends")


async def test_failed_streams_open_the_breaker(clients, settings, gemini, api):
    settings.ASSISTANT_BREAKER_FAILURES = 1
    api.generate.mock(
        return_value=model_streams([chunk("a "), chunk("b")], delays=[0, 0], broken_after=1)
    )
    alice, _ = await room_with_two(clients, settings)
    await ask(alice, "first")
    assert (await read_reply(alice))[1]["content"] == APOLOGY
    await ask(alice, "second")
    deltas, reply = await read_reply(alice)
    assert deltas == [] and reply["content"] == APOLOGY
    assert api.generate.call_count == 1  # the open breaker made no request


async def test_a_reply_survives_its_askers_socket_closing(clients, settings, gemini, api):
    settings.ASSISTANT_MODE = "always"
    writing, go_on = asyncio.Event(), asyncio.Event()

    async def model(request):
        writing.set()
        await go_on.wait()
        return model_writes("The answer, after all.", pieces=3, delay=0.01)

    api.generate.mock(side_effect=model)
    bob = await clients.join("lobby", "bob")
    alice = await clients.join("lobby", "alice")
    await bob.recv_type("user_joined")
    question = await ask(alice, "Are you there?")
    await bob.recv_type("message")
    await asyncio.wait_for(writing.wait(), 5)
    await alice.close()
    go_on.set()
    deltas, reply = await read_reply(bob, skip={"system", "user_left"})
    assert reply["content"] == "The answer, after all."
    assert reply["metadata"]["in_reply_to"] == question["message_id"]
    assert "".join(d["delta"] for d in deltas) == reply["content"]


async def test_a_member_joining_mid_stream_gets_the_rest_and_the_stored_message(
    clients, settings, gemini, api
):
    """Carol joins while the answer is written: she gets its later deltas (which a client
    renders only with index 0, so she ignores them) and the stored message, which history
    has for anyone who comes later."""
    settings.ASSISTANT_MODE = "always"
    half_written = asyncio.Event()

    class Model:
        async def __aiter__(self):
            yield f"data: {json.dumps(chunk('First half, '))}\r\n\r\n".encode()
            await half_written.wait()
            yield f"data: {json.dumps(chunk('second half.', finish='STOP'))}\r\n\r\n".encode()

    api.generate.mock(
        return_value=httpx.Response(
            200, headers={"content-type": "text/event-stream"}, content=Model()
        )
    )
    alice = await clients.join("lobby", "alice")
    await ask(alice, "Tell me")
    first = await alice.recv_type("assistant_delta")
    assert first["index"] == 0
    carol = await clients.join("lobby", "carol")
    half_written.set()
    deltas, reply = await read_reply(carol)
    assert reply["content"] == "First half, second half."
    assert all(d["index"] > 0 for d in deltas)
    later = await clients.join("lobby", "dave")
    history = [m for m in later.history["messages"] if m["user_id"] == "AI"]
    assert history[-1]["content"] == reply["content"]
    assert history[-1]["metadata"]["stream_id"] == first["stream_id"]


async def test_the_assistant_quota_covers_streams(clients, settings, gemini, api):
    settings.ASSISTANT_USER_RATE_LIMIT = 1
    api.generate.mock(return_value=model_writes("One answer.", pieces=2))
    alice, _ = await room_with_two(clients, settings)
    await ask(alice, "first")
    await read_reply(alice)
    await alice.send({"type": "message", "content": "second"})
    # The refusal is sent at once, the echo through the room's group: either may come first.
    frames = [await alice.recv(), await alice.recv()]
    [refusal] = [f for f in frames if f["type"] == "error"]
    assert refusal["error_code"] == "RATE_LIMIT_EXCEEDED"
    assert refusal["details"]["scope"] == "assistant"
    assert [f["content"] for f in frames if f["type"] == "message"] == ["second"]
    await alice.expect_nothing_pending()  # no second stream
    assert api.generate.call_count == 1


async def test_the_worker_bound_covers_streams(clients, settings, gemini, api):
    """ASSISTANT_MAX_CONCURRENCY=1: a second answer starts streaming only when the first is
    stored; the streams never interleave."""
    settings.ASSISTANT_MAX_CONCURRENCY = 1
    api.generate.mock(return_value=model_writes("A b c d e f g h.", pieces=4, delay=0.05))
    alice, _ = await room_with_two(clients, settings)
    await ask(alice, "one")
    await ask(alice, "two")
    frames = []
    while len([f for f in frames if f["type"] == "message"]) < 2:
        frames.append(await alice.recv(timeout=5))
    order = [f["stream_id"] if f["type"] == "assistant_delta" else "stored" for f in frames]
    first_stream = order[0]
    assert order.index("stored") > max(i for i, s in enumerate(order) if s == first_stream)
    assert all(s != first_stream for s in order[order.index("stored") :])


async def test_replies_streaming_at_once_to_a_room_take_turns(settings):
    """Four replies written at once: each one's first words go at once, then the room gets
    one delta frame per ASSISTANT_STREAM_INTERVAL from the worker, from the replies in turn
    (the one that waited longest first), and each reply's last frame when it ends; each
    reply's deltas add up to its text, in order. Another room's reply, alone, takes turns
    of its own: a frame every interval."""
    settings.ASSISTANT_STREAM_INTERVAL = 0.05
    clock = ManualClock()
    turns = DeltaTurns(clock=clock)
    sent: dict[str, list[dict]] = {"room.a": [], "room.b": []}

    def stream(group: str, n: int) -> DeltaStream:
        async def emit(payload: dict) -> None:
            sent[group].append(payload)

        return DeltaStream(
            kind="reply",
            room_id=group,
            in_reply_to=str(n),
            emit=emit,
            group=group,
            turns=turns,
            sockets=2,
        )

    streams = [stream("room.a", n) for n in range(4)]
    other = stream("room.b", 9)
    everyone = [*streams, other]
    for one in everyone:
        one.write("word0 ")
    for _ in range(3):  # the first words' sends run
        await asyncio.sleep(0)
    assert [f["stream_id"] for f in sent["room.a"]] == [s.stream_id for s in streams]
    assert len(sent["room.b"]) == 1
    in_turn: list[str] = []
    for step in range(1, 9):
        for one in everyone:
            one.write(f"word{step} ")
        before = len(sent["room.a"]), len(sent["room.b"])
        await clock.advance(0.05)
        # One frame per room per interval, however many replies have new text.
        assert (len(sent["room.a"]), len(sent["room.b"])) == (before[0] + 1, before[1] + 1)
        in_turn.append(sent["room.a"][-1]["stream_id"])
    # Round and round, each reply in its turn.
    assert in_turn == [s.stream_id for s in streams] * 2
    text = "".join(f"word{step} " for step in range(9)).strip()
    await asyncio.gather(*(one.finish(final=text) for one in everyone))
    assert not turns.groups
    for one in everyone:
        mine = [f for f in sent[one.group] if f["stream_id"] == one.stream_id]
        assert [f["index"] for f in mine] == list(range(len(mine)))
        assert "".join(f["delta"] for f in mine) == text


def test_a_crowded_room_gets_its_delta_frames_further_apart(settings):
    """What a delta frame costs is a delivery to each socket of the room: past
    ASSISTANT_STREAM_DELIVERIES x ASSISTANT_STREAM_INTERVAL sockets the turns are further
    apart, within the delivery budget, and never more than MAX_TURN_INTERVAL."""
    settings.ASSISTANT_STREAM_INTERVAL = 0.1
    settings.ASSISTANT_STREAM_DELIVERIES = 250
    turns = DeltaTurns(clock=ManualClock())

    def interval(*sockets: int) -> float:
        streams = [
            DeltaStream(
                kind="reply",
                room_id="room",
                in_reply_to="1",
                emit=None,  # type: ignore[arg-type]  (never sends)
                group="room",
                turns=turns,
                sockets=n,
            )
            for n in sockets
        ]
        return turns.interval(streams)

    assert interval(2) == interval(25) == 0.1
    assert interval(58) == pytest.approx(0.232)
    assert interval(10, 58, 3) == pytest.approx(0.232)  # the widest audience counts
    assert interval(100_000) == MAX_TURN_INTERVAL


async def test_a_question_in_a_crowded_room_cannot_outspend_the_delivery_budget(clients, settings):
    """A user asking in a room whose every delta frame goes to many sockets: the worker
    paces that room's frames by the sockets open in it when the question came (here 2
    sockets at 10 deliveries a second: a turn every 0.2 s, not every 0.01 s), and the reply
    still streams whole, a frame for several words."""
    from clarity_project.asgi import worker

    settings.ASSISTANT_BUILTIN_WORD_DELAY = 0.05
    settings.ASSISTANT_STREAM_INTERVAL = 0.01
    settings.ASSISTANT_STREAM_DELIVERIES = 10
    alice, bob = await room_with_two(clients, settings)
    await ask(alice, "How can I sleep better?")
    await bob.recv_type("message")
    first = await bob.recv_type("assistant_delta")
    streams = worker.delta_turns.groups[room_group("lobby")]  # still streaming: ~2 s more
    assert [stream.sockets for stream in streams] == [2]
    assert DeltaTurns.interval(streams) == pytest.approx(0.2)
    deltas, reply = await read_reply(bob)
    streamed = [first, *deltas]
    assert "".join(d["delta"] for d in streamed) == reply["content"]
    assert 2 <= len(streamed) < len(reply["content"].split())


async def test_stream_idle_timeout_is_in_connection_ack(clients, settings):
    settings.ASSISTANT_FIRST_CHUNK_TIMEOUT = 12
    client = await clients.join("lobby", "alice")
    assert client.ack["server_info"]["stream_idle_timeout"] == 17


async def test_the_built_in_assistant_streams_word_by_word(clients, settings):
    settings.ASSISTANT_BUILTIN_WORD_DELAY = 0.01
    settings.ASSISTANT_STREAM_INTERVAL = 0.05
    alice, _ = await room_with_two(clients, settings)
    await ask(alice, "How can I sleep better?")
    deltas, reply = await read_reply(alice)
    assert len(deltas) >= 3
    assert "".join(d["delta"] for d in deltas) == reply["content"]
    words = len(reply["content"].split())
    assert len(deltas) < words  # coalesced: several words a frame


# --- analysis narratives -----------------------------------------------------------------------


async def test_an_analysis_narrative_streams_as_text_to_the_users_sockets_only(
    clients, gemini, api
):
    """The model answers in JSON, its escapes split across chunks: only the narrative's
    text is streamed, to the asking user's sockets; nobody else gets a frame."""
    answer = json.dumps(
        {
            "narrative": 'You slept "about" 8 hours.\nKeep it up — 😴',
            "key_insights": ["steady"],
            "recommendations": ["Keep your schedule"],
            "confidence_score": 0.9,
        }
    )
    api.generate.mock(
        return_value=model_streams([chunk(piece) for piece in pieces_of(answer, [20, 33, 47, 58])])
    )
    alice = await clients.join("lobby", "alice")
    bob = await clients.join("lobby", "bob")
    await alice.recv_type("user_joined")
    await alice.send({"type": "health_insight", "content": {"data_points": day_of_minutes()}})
    result = await read_analysis(alice)
    narrative = result["message"]
    deltas = result["assistant_delta"]
    streamed = "".join(d["delta"] for d in deltas)
    assert streamed == narrative["content"] == 'You slept "about" 8 hours.\nKeep it up — 😴'
    assert not any(
        "{" in d["delta"] or "narrative" in d["delta"] for d in result["assistant_delta"]
    )
    assert result["health_insight"]["recommendations"] == ["Keep your schedule"]
    await bob.expect_nothing_pending()


async def test_a_failed_analysis_stream_falls_back_to_the_built_in_narrative(clients, gemini, api):
    api.generate.mock(
        return_value=model_streams(
            [chunk('{"narrative": "Your sleep '), chunk("is bad", finish="SAFETY")]
        )
    )
    alice = await clients.join("lobby", "alice")
    await alice.send({"type": "health_insight", "content": {"data_points": day_of_minutes()}})
    result = await read_analysis(alice)
    narrative = result["message"]
    assert "is bad" not in "".join(d["delta"] for d in result["assistant_delta"])
    assert narrative["content"] == result["health_insight"]["insight"]
    assert narrative["content"].startswith("[Clarity built-in assistant]")


async def test_one_chunk_answers_still_work(clients, settings, gemini, api):
    api.generate.mock(return_value=model_says("Short."))
    alice, _ = await room_with_two(clients, settings)
    await ask(alice, "Hi")
    deltas, reply = await read_reply(alice)
    assert [d["delta"] for d in deltas] == ["Short."] and reply["content"] == "Short."


async def test_a_reply_reads_its_context_beside_the_chats_database_thread(settings):
    """While the database thread the room's messages are stored on is busy (a slow write, a
    checkpoint, a batch), a reply's context is read on the assistant's own thread and its
    first words go out; only storing the reply waits for the chat's thread."""
    settings.ASSISTANT_BUILTIN_WORD_DELAY = 0
    room = (
        await database_sync_to_async(room_create_private)(
            user_id="alice", name="Sleep", members=["bob"]
        )
    )["room_id"]
    await database_sync_to_async(stored_message)(room, "bob", "I slept badly")
    question = await database_sync_to_async(stored_message)(room, "alice", "@ai why?")
    release = threading.Event()
    chat_thread_busy = asyncio.ensure_future(database_sync_to_async(release.wait)())
    first_words = asyncio.Event()
    sent: list[dict] = []

    async def emit(payload: dict) -> None:
        sent.append(payload)
        first_words.set()

    try:
        reply = asyncio.ensure_future(
            builtin_reply(question, user_id="alice", username="Alice", emit=emit)
        )
        await asyncio.wait_for(first_words.wait(), timeout=30)
        assert sent[0]["type"] == "assistant_delta"
        assert not reply.done()  # the reply is stored on the chat's thread
        release.set()
        stored = await asyncio.wait_for(reply, timeout=30)
    finally:
        release.set()
        await chat_thread_busy
    assert stored["user_id"] == "AI"
    assert stored["metadata"]["stream_id"] == sent[0]["stream_id"]
