"""Health analysis end to end through the consumers (protocol §7): validation, progress
frames, the insight and the narrative, only to the requesting user's sockets."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import REGISTRY

from chat.protocol import HEALTH_ROOM_PREFIX
from tests.conftest import ChatClient, open_socket, token_for
from tests.gemini_api import model_says

pytestmark = pytest.mark.django_db(transaction=True)

START = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def day_of_minutes(*, days: int = 1, active: float = 250.0) -> list[dict]:
    """Minute counts: asleep (0) from 23:00 to 07:00, active otherwise."""
    points = []
    for minute in range(days * 1440):
        moment = START + timedelta(minutes=minute)
        asleep = moment.hour >= 23 or moment.hour < 7
        points.append({"timestamp": moment.isoformat(), "value": 0.0 if asleep else active})
    return points


async def read_analysis(client: ChatClient) -> dict[str, dict]:
    """The frames of one analysis, by kind (`assistant_delta`: a list), checking the progress
    sequence."""
    progress, frames = [], {"assistant_delta": []}
    while True:
        frame = await client.recv(timeout=10)
        if frame["type"] == "assistant_delta":
            frames["assistant_delta"].append(frame)
        elif frame["type"] == "analysis_update":
            progress.append((frame["status"], frame["progress"]))
            if frame["status"] in {"completed", "failed"}:
                break
        else:
            frames[frame["type"]] = frame
    frames["progress"] = progress
    return frames


async def open_health(uid: str = "alice", path_uid: str | None = None) -> ChatClient:
    return await open_socket(
        path=f"/api/v1/ws/health-analysis/{path_uid or uid}", token=token_for(uid)
    )


async def test_health_insight_on_the_chat_socket(clients, caplog):
    caplog.set_level(logging.DEBUG)
    alice = await clients.join("lobby", "alice")
    alice_elsewhere = await clients.join("other", "alice")
    bob = await clients.join("lobby", "bob")
    await alice.recv_type("user_joined")
    points = day_of_minutes()
    await alice.send({"type": "health_insight", "content": {"data_points": points, "steps": 8000}})

    result = await read_analysis(alice)
    assert result["progress"] == [("started", 0), ("processing", 50), ("completed", 100)]
    insight = result["health_insight"]
    assert insight["user_id"] == "alice" and insight["message_id"] is None
    assert insight["insight"] and 0 <= insight["confidence"] <= 1
    assert isinstance(insight["recommendations"], list) and insight["category"]
    metrics = insight["source_data"]
    assert metrics["points"] == 1440 and metrics["duration_hours"] == 23
    assert 7.5 <= metrics["total_sleep_time"] <= 8.2
    narrative = result["message"]
    assert narrative["user_id"] == "AI" and narrative["content"] == insight["insight"]
    assert narrative["seq"] is None and narrative["changed_seq"] is None  # not a room event
    # streamed first, to this user only (protocol §14): the deltas add up to the narrative
    deltas = result["assistant_delta"]
    stream_id = narrative["metadata"]["stream_id"]
    assert narrative["metadata"] == {"analysis": True, "stream_id": stream_id}
    assert [d["index"] for d in deltas] == list(range(len(deltas))) and deltas
    assert all(
        d["stream_id"] == stream_id
        and d["kind"] == "analysis"
        and d["room_id"] is None
        and d["in_reply_to"] is None
        for d in deltas
    )
    assert "".join(d["delta"] for d in deltas) == narrative["content"]

    # the user's other socket gets the same results; nobody else gets anything
    assert (await read_analysis(alice_elsewhere))["health_insight"]["insight"] == insight["insight"]
    await bob.expect_nothing_pending()
    # health payload values are never logged
    assert points[0]["timestamp"] not in caplog.text and "8000" not in caplog.text


async def test_health_analysis_socket(clients):
    client = await open_health("alice")
    ack = await client.recv()
    assert ack["type"] == "connection_ack" and ack["user_id"] == "alice"
    assert ack["server_info"]["room_id"] == f"{HEALTH_ROOM_PREFIX}alice"
    welcome = await client.recv()
    assert welcome["type"] == "system" and welcome["level"] == "info"
    assert welcome["content"] == (
        "Connected to health analysis service. Send health data to start analysis."
    )
    await client.send({"type": "health_data", "data": {"data_points": day_of_minutes(days=2)}})
    result = await read_analysis(client)
    assert result["progress"][-1] == ("completed", 100)
    assert result["health_insight"]["source_data"]["interdaily_stability"] is not None

    await client.send({"type": "heartbeat"})
    assert (await client.recv())["type"] == "heartbeat_ack"
    await client.send({"type": "message", "content": "not here"})
    await client.expect_error("UNKNOWN_MESSAGE_TYPE")
    await client.close()


async def test_the_older_health_path_alias():
    client = await open_socket(path="/api/v1/chat/health-analysis/alice", token=token_for("alice"))
    assert (await client.recv())["type"] == "connection_ack"
    await client.close()


async def test_health_socket_for_another_user_is_refused():
    client = await open_health("alice", path_uid="bob")
    error = await client.expect_refusal("USER_ID_MISMATCH", 4003)
    assert error["message"] == "User ID mismatch"


async def test_health_socket_counts_towards_the_connection_cap(clients):
    await clients.join("one", "alice")
    await clients.join("two", "alice")
    health = await open_health("alice")
    assert (await health.recv())["type"] == "connection_ack"
    fourth = await clients.open("three", token=token_for("alice"), public_room=True)
    await fourth.expect_refusal("TOO_MANY_CONNECTIONS", 4008)
    await health.close()


async def test_invalid_health_data_payload_is_explained():
    """The original's skipped test, on the right path."""
    client = await open_health("alice")
    await client.recv_type("system")
    await client.send(
        {"type": "health_data", "data": {"data_points": "this_is_not_a_list", "steps": 12345}}
    )
    error = await client.expect_error("INVALID_HEALTH_DATA_PAYLOAD")
    assert error["message"] == "Health data payload validation failed."
    [problem] = error["details"]["validation_errors"]
    assert problem["loc"] == ["data_points"]
    assert "Input should be a valid list" in problem["msg"]
    await client.close()


@pytest.mark.parametrize(
    "content",
    [
        {"data_points": [{"timestamp": "yesterday", "value": 1}]},
        {"data_points": [{"timestamp": "2026-01-01T00:00:00Z", "value": "high"}]},
        {"data_points": [{"value": 1}]},
        {"steps": -5},
    ],
)
async def test_invalid_health_insight_content(clients, content):
    alice = await clients.join("lobby", "alice")
    await alice.send({"type": "health_insight", "content": content})
    error = await alice.expect_error("INVALID_HEALTH_INSIGHT_CONTENT")
    assert error["message"] == "Health insight content validation failed."
    assert error["details"]["validation_errors"][0]["loc"]
    assert "input" not in error["details"]["validation_errors"][0]  # values are not echoed


async def test_health_insight_content_must_be_an_object(clients):
    alice = await clients.join("lobby", "alice")
    await alice.send({"type": "health_insight", "content": [1, 2]})
    await alice.expect_error("MESSAGE_PARSE_ERROR")


async def test_too_many_data_points(clients, settings):
    settings.CHAT_MAX_DATA_POINTS = 100
    alice = await clients.join("lobby", "alice")
    points = [{"timestamp": START.isoformat(), "value": 1}] * 101
    await alice.send({"type": "health_insight", "content": {"data_points": points}})
    error = await alice.expect_error("TOO_MANY_DATA_POINTS")
    assert error["details"] == {"received": 101, "max_allowed": 100}
    assert error["message"] == "Exceeded maximum data points limit of 100"


async def test_a_week_of_minute_data_fits_but_larger_frames_do_not(clients):
    alice = await clients.join("lobby", "alice")
    week = day_of_minutes(days=7)
    frame = json.dumps({"type": "health_insight", "content": {"data_points": week}})
    assert 65536 < len(frame) < 1_000_000
    await alice.send_text(frame)
    assert (await read_analysis(alice))["progress"][-1] == ("completed", 100)

    too_big = json.dumps({"type": "health_insight", "content": {"pad": "x" * 1_000_000}})
    await alice.send_text(too_big)
    assert (await alice.expect_error("MESSAGE_TOO_LARGE"))["details"] == {"max_size": 1_000_000}
    # a non-health frame of the same size class as a week of data is still too large
    await alice.send_text(json.dumps({"type": "message", "content": "x", "pad": "y" * 70000}))
    assert (await alice.expect_error("MESSAGE_TOO_LARGE"))["details"] == {"max_size": 65536}


async def test_an_analysis_that_cannot_run_fails_visibly(clients):
    alice = await clients.join("lobby", "alice")
    await alice.send({"type": "health_insight", "content": {"data_points": []}})
    result = await read_analysis(alice)
    assert result["progress"] == [("started", 0), ("failed", 100)]
    assert result["error"]["error_code"] == "HEALTH_ANALYSIS_ERROR"
    assert result["error"]["message"] == "Failed to perform health analysis"


async def test_user_id_in_a_health_request_must_be_the_users(clients):
    alice = await clients.join("lobby", "alice")
    await alice.send(
        {"type": "health_insight", "user_id": "bob", "content": {"data_points": day_of_minutes()}}
    )
    await alice.expect_error("USER_ID_MISMATCH")


# --- fair share (protocol §16): quota, queue bound, nothing decoded on the event loop ---------


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def jobs_run() -> float:
    """Jobs that came back from the worker's analysis processes, whatever their outcome."""
    return sum(
        sample("clarity_analysis_jobs_total", outcome=outcome)
        for outcome in ("analysed", "refused", "failed")
    )


async def test_an_analysis_flood_is_refused_past_the_users_quota(clients, settings):
    settings.CHAT_ANALYSIS_RATE_LIMIT = 2
    alice = await clients.join("lobby", "alice")
    bob = await clients.join("lobby", "bob")
    await alice.recv_type("user_joined")
    request = {"type": "health_insight", "content": {"data_points": day_of_minutes()}}
    for _ in range(2):
        await alice.send(request)
        assert (await read_analysis(alice))["progress"][-1] == ("completed", 100)
    refused_before, jobs_before = (
        sample("clarity_analyses_refused_total", reason="rate_limit"),
        jobs_run(),
    )

    await alice.send(request)
    error = await alice.expect_error("RATE_LIMIT_EXCEEDED")
    assert error["details"]["scope"] == "analysis" and error["details"]["retry_after"] >= 1
    # a frame only an analysis may be as large as is charged to the same quota
    week = json.dumps(
        {"type": "health_insight", "content": {"data_points": day_of_minutes(days=7)}}
    )
    await alice.send_text(week)
    assert (await alice.expect_error("RATE_LIMIT_EXCEEDED"))["details"]["scope"] == "analysis"
    await alice.expect_nothing_pending()
    assert jobs_run() == jobs_before  # refused before any work was queued
    assert sample("clarity_analyses_refused_total", reason="rate_limit") == refused_before + 2

    # the socket stays open and its chat flows; another user's analyses are not affected
    await alice.send({"type": "message", "content": "still here"})
    assert (await alice.recv_type("message"))["content"] == "still here"
    await bob.send(request)
    assert (await read_analysis(bob))["progress"][-1] == ("completed", 100)


async def test_a_full_analysis_queue_refuses_at_once(clients, settings, gemini, api):
    """A worker takes on CHAT_ANALYSIS_QUEUE analyses; one more is refused at once with
    SERVICE_UNAVAILABLE (try later), nothing queued, and the next after a slot frees runs."""
    settings.CHAT_ANALYSIS_QUEUE = 1
    narrating, release = asyncio.Event(), asyncio.Event()

    async def slow_model(request):
        narrating.set()
        await release.wait()
        return model_says(json.dumps({"narrative": "You slept about eight hours."}))

    api.generate.mock(side_effect=slow_model)
    alice = await clients.join("lobby", "alice")
    bob = await clients.join("lobby", "bob")
    await alice.recv_type("user_joined")
    request = {"type": "health_insight", "content": {"data_points": day_of_minutes()}}
    await alice.send(request)
    assert (await alice.recv(timeout=10))["status"] == "started"
    assert (await alice.recv())["status"] == "processing"
    await asyncio.wait_for(narrating.wait(), 5)  # alice's analysis holds the only slot
    refused_before, jobs_before = (
        sample("clarity_analyses_refused_total", reason="queue_full"),
        jobs_run(),
    )

    await bob.send(request)
    error = await bob.expect_error("SERVICE_UNAVAILABLE")
    assert error["details"] == {"scope": "analysis"}
    await bob.send({"type": "heartbeat"})  # the socket stays open
    assert (await bob.recv())["type"] == "heartbeat_ack"
    assert jobs_run() == jobs_before
    assert sample("clarity_analyses_refused_total", reason="queue_full") == refused_before + 1
    assert sample("clarity_analyses_in_flight") >= 1

    release.set()
    assert (await read_analysis(alice))["progress"][-1] == ("completed", 100)
    await bob.send(request)
    assert (await read_analysis(bob))["health_insight"]["insight"] == "You slept about eight hours."


@pytest.mark.parametrize(
    ("frame", "code", "details", "job"),
    [
        # not JSON: one byte short of its closing brace
        (
            '{"type": "health_insight", "content": {"pad": "' + "x" * 999_900 + '"}',
            "INVALID_JSON",
            None,
            True,
        ),
        # no analysis type named anywhere in it: refused without a job, undecoded
        (
            json.dumps({"type": "message", "content": "x", "pad": "y" * 999_900}),
            "MESSAGE_TOO_LARGE",
            {"max_size": 65536},
            False,
        ),
        (
            json.dumps(["health_insight", "y" * 999_900]),
            "MESSAGE_TOO_LARGE",
            {"max_size": 65536},
            True,
        ),
        (
            json.dumps({"type": "health_data", "data": {"pad": "y" * 999_900}}),
            "MESSAGE_TOO_LARGE",
            {"max_size": 65536},
            False,
        ),
        (
            json.dumps({"type": "health_insight", "content": {"data_points": "y" * 999_900}}),
            "INVALID_HEALTH_INSIGHT_CONTENT",
            None,
            True,
        ),
    ],
    ids=["invalid-json", "wrong-type", "not-an-object", "other-endpoints-type", "invalid-payload"],
)
async def test_a_large_frame_is_decoded_in_an_analysis_process(clients, frame, code, details, job):
    """A frame over CHAT_MAX_MESSAGE_SIZE is never decoded on the event loop: one that names
    none of the endpoint's analysis types cannot be an analysis request and is refused at once
    (no job); any other's refusal is the analysis process's (a job came back for it), typed as
    the inbound pipeline's."""
    assert 65536 < len(frame) <= 1_000_000
    alice = await clients.join("lobby", "alice")
    jobs_before = sample("clarity_analysis_jobs_total", outcome="refused")
    await alice.send_text(frame)
    error = await alice.expect_error(code, timeout=10)
    if details is not None:
        assert error["details"] == details
    assert sample("clarity_analysis_jobs_total", outcome="refused") == jobs_before + job
    await alice.send({"type": "heartbeat"})  # the socket stays open
    assert (await alice.recv())["type"] == "heartbeat_ack"


async def test_small_analysis_frames_are_validated_in_an_analysis_process_too(clients):
    alice = await clients.join("lobby", "alice")
    jobs_before = sample("clarity_analysis_jobs_total", outcome="refused")
    await alice.send({"type": "health_insight", "content": {"data_points": "not a list"}})
    await alice.expect_error("INVALID_HEALTH_INSIGHT_CONTENT", timeout=10)
    assert sample("clarity_analysis_jobs_total", outcome="refused") == jobs_before + 1
