"""The suite's log scan (tests/logscan.py) finds tokens and health payloads, and only them."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import pytest

from chat.logs import JsonFormatter
from chat.testing.client import token_for
from tests.logscan import (
    RUN,
    SAMPLE_FILE,
    known_runs,
    payload_values,
    remember_sent,
    scan_line,
    scan_tree,
    suite_runs,
)

SAMPLE = payload_values({"content": json.loads(SAMPLE_FILE.read_text())})
RUNS = known_runs([SAMPLE])


def kinds(text: str, runs=RUNS) -> list[str]:
    return [kind for kind, _ in scan_line(text, runs)]


def json_line(message: str) -> str:
    """`message` as the JSON formatter writes it (quotes escaped)."""
    return JsonFormatter().format(logging.makeLogRecord({"msg": message, "name": "chat.x"}))


TOKEN = token_for("alice")  # an emulator token: header.payload. (empty signature)


@pytest.mark.parametrize(
    "line",
    [
        f"session opened token={TOKEN}",
        f"GET /api/v1/ws/lobby?token={TOKEN} HTTP/1.1",
        f"Authorization: Bearer {TOKEN}x9Qz-_signature",
        json_line(f"refused {TOKEN!r}"),
        "payload segment alone: " + TOKEN.split(".")[1],
    ],
)
def test_tokens_are_found(line):
    assert "token" in kinds(line)


def test_a_finding_does_not_repeat_the_token():
    [(kind, excerpt)] = scan_line(f"x {TOKEN} y", RUNS)
    assert kind == "token" and TOKEN not in excerpt and len(excerpt) <= 13


POINT = {"timestamp": "2026-03-02T12:00:00+00:00", "value": 250.0}


@pytest.mark.parametrize(
    "line",
    [
        json.dumps({"type": "health_insight", "content": {"data_points": [POINT]}}),
        f"frame {{'content': {{'data_points': [{POINT!r}]}}}}",
        json_line(f"analysis input {json.dumps([POINT])}"),
        json.dumps([{"value": 3, "timestamp": "2026-01-01T00:00:00Z"}]),
        "data_points.0.value Input should be a valid number [type=float_parsing, "
        "input_value='high', input_type=str]",
    ],
)
def test_health_payloads_are_found(line):
    assert "health payload" in kinds(line)


@pytest.mark.parametrize(
    "render",
    [
        lambda values: str(list(values)),  # a Python list of floats
        lambda values: " ".join(f"{v:g}" for v in values),  # numpy's array repr, roughly
        lambda values: json.dumps([int(v) for v in values]),
    ],
)
def test_runs_of_known_payload_values_are_found(render):
    values = SAMPLE[1000 : 1000 + RUN + 3]
    assert kinds(f"values: {render(values)} end") == ["health payload values"]


def test_runs_of_the_payloads_tests_send_are_found():
    distinctive = [17.25 + i * 3.5 for i in range(RUN)]
    line = f"debug {distinctive}"
    assert kinds(line, suite_runs()) == []
    remember_sent(
        {
            "type": "health_data",
            "data": {"data_points": [{"timestamp": "t", "value": v} for v in distinctive]},
        }
    )
    assert kinds(line, suite_runs()) == ["health payload values"]


@pytest.mark.parametrize(
    "line",
    [
        "2026-11-27 21:43:09,055 INFO chat.consumers session opened "
        "session=2b9440fe-d90c-4edc-b2d4-a2e157d778f0 user=alice room=lobby",
        "health analysis done for user=alice points=1440",
        json_line("127.0.0.1:43290 WSCONNECTING /api/v1/ws/lobby"),
        "reaped 3 sessions of dead worker vm:10540:efe767be",
        '"source_data": {"total_sleep_time": 7.9, "sleep_efficiency": 0.94, "points": 1440}',
        "data_points.0.value: Input should be a valid number",  # the loc, not the value
        '{"data_points": []}',
        "retry after 1 2 4 8 16 32 64 128 256 s",
        "0 0 0 0 0 0 0 0 0 0",  # a run of one value is no fingerprint
        "2026-03-02T12:00:00+00:00 2026-03-02T12:01:00+00:00 2026-03-02T12:02:00+00:00",
        # A room's opaque id (random base64url) that happens to start like a JWT segment.
        "member removed room=q6LqtweyJJkx9V9HHfmDEA user=bert",
    ],
)
def test_ordinary_log_lines_are_clean(line):
    assert kinds(line) == []


def test_scan_tree_names_file_and_line():
    # Not in tmp_path: the suite's own scan reads every log under the run's base directory.
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        (root / "worker").mkdir()
        (root / "worker" / "worker0.err.log").write_text(f"fine\nfine\nleak {TOKEN}\n")
        (root / "clean.log").write_text("fine\n")
        (root / "notes.txt").write_text(f"not a log {TOKEN}\n")
        [finding] = scan_tree(root, RUNS)
    assert (finding.path.name, finding.line, finding.kind) == ("worker0.err.log", 3, "token")
    assert str(finding).startswith(f"{root / 'worker' / 'worker0.err.log'}:3: token: eyJ")
