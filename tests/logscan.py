"""The suite's log scan: nothing logged during a test run may hold a token or a health payload
value (protocol §2, §7).

Every record the pytest process logs goes to `pytest.log` in the run's base temporary
directory (tests/bootstrap.py), and every server process the tests start writes its output to
files there too (tests/servers.py). After the last test, tests/bootstrap.py runs `scan_tree`
on every `*.log` file there and fails the run on any finding.

What counts as a finding:
- **token**: a base64url-encoded JSON object (`eyJ...`) — a JWT's header or payload segment,
  whole tokens included (Firebase ID tokens and the emulator's unsigned ones alike, whose
  signature segment is empty).
- **health payload**, however it was written: a data point (`{"timestamp": ..., "value": ...}`
  as JSON, escaped JSON or a Python repr); a non-empty `data_points` list; pydantic's echo of a
  rejected input (`input_value=...`); or a run of `RUN` consecutive numbers (not all equal)
  that is also a run of the values of a payload the tests sent (`remember_sent`, called by
  the test clients) or of the browser client's sample file (`SAMPLE_FILE`, which the browser
  tests send).
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_FILE = ROOT / "chat" / "static" / "chat" / "sample-health.json"

# Consecutive numbers that make a run of payload values: short enough to catch any list or
# array of them, long enough that no timestamp, address or count in a log line is one.
RUN = 8

TOKEN_RE = re.compile(r"eyJ[A-Za-z0-9_-]{10,}(?:\.[A-Za-z0-9_-]*){0,2}")
# How much of a candidate must decode to printable JSON text for it to count as a token:
# random base64url (a room's opaque id) holds `eyJ` now and then, but its 12 bytes are all
# printable only about once in 20,000 such cases; a JWT segment's always are.
TOKEN_TEXT_CHARS = 16
_QUOTE = r"""\\?["']"""
PAYLOAD_RES = [
    re.compile(
        rf"{_QUOTE}timestamp{_QUOTE}\s*:\s*{_QUOTE}[^\"'\\]*{_QUOTE}\s*,\s*{_QUOTE}value{_QUOTE}\s*:"
    ),
    re.compile(rf"{_QUOTE}value{_QUOTE}\s*:[^,{{}}]+,\s*{_QUOTE}timestamp{_QUOTE}\s*:"),
    re.compile(rf"{_QUOTE}data_points{_QUOTE}\s*:\s*\[\s*[^\]\s]"),
    re.compile(r"input_value="),
]
_NUMBER = r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_SEPARATOR = r"[\s,;\[\]()]+"
NUMBER_RUN_RE = re.compile(rf"(?<![\w.]){_NUMBER}(?:{_SEPARATOR}{_NUMBER}){{{RUN - 1},}}")
NUMBER_RE = re.compile(_NUMBER)

_sent: set[tuple[float, ...]] = set()


@dataclass(frozen=True)
class Finding:
    path: Path
    line: int
    kind: str
    excerpt: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.kind}: {self.excerpt}"


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def payload_values(frame: Any) -> tuple[float, ...]:
    """The `value`s of the data points of a health frame (`health_insight` or
    `health_data`), decoded or as JSON text; () for anything else."""
    if isinstance(frame, bytes | str):
        if "data_points" not in (frame if isinstance(frame, str) else frame.decode("latin-1")):
            return ()
        try:
            frame = json.loads(frame)
        except ValueError:
            return ()
    if not isinstance(frame, dict):
        return ()
    body = frame.get("content", frame.get("data"))
    points = body.get("data_points") if isinstance(body, dict) else None
    if not isinstance(points, list):
        return ()
    values = (_finite(point.get("value")) for point in points if isinstance(point, dict))
    return tuple(value for value in values if value is not None)


def remember_sent(frame: Any) -> None:
    """Note the values of a health payload a test sends, for the scan to look for."""
    values = payload_values(frame)
    if len(values) >= RUN:
        _sent.add(values)


def known_runs(series: Iterable[tuple[float, ...]]) -> set[tuple[float, ...]]:
    """Every run of RUN consecutive values of these series, except runs of one repeated value
    (a night of zeros is no fingerprint; a whole payload always has other runs)."""
    runs = {values[i : i + RUN] for values in series for i in range(len(values) - RUN + 1)}
    return {run for run in runs if len(set(run)) > 1}


def suite_runs() -> set[tuple[float, ...]]:
    """Runs of the payloads sent in this run, and of the browser client's sample file."""
    return known_runs([*_sent, payload_values({"content": json.loads(SAMPLE_FILE.read_text())})])


def _json_text(candidate: str) -> bool:
    """Whether the candidate's first characters decode (base64url) to printable text, as a
    JWT segment's JSON does."""
    head = candidate[:TOKEN_TEXT_CHARS]
    try:
        decoded = base64.urlsafe_b64decode(head + "=" * (-len(head) % 4))
    except ValueError:
        return False
    return all(32 <= byte < 127 for byte in decoded)


def scan_line(text: str, runs: set[tuple[float, ...]]) -> Iterator[tuple[str, str]]:
    """(kind, redacted excerpt) of each finding in one line of log text."""
    for match in TOKEN_RE.finditer(text):
        if _json_text(match.group()):
            yield "token", match.group()[:12] + "…"
    for pattern in PAYLOAD_RES:
        for match in pattern.finditer(text):
            yield "health payload", text[match.start() : match.start() + 40]
    for match in NUMBER_RUN_RE.finditer(text):
        numbers = tuple(float(number) for number in NUMBER_RE.findall(match.group()))
        if any(numbers[i : i + RUN] in runs for i in range(len(numbers) - RUN + 1)):
            yield "health payload values", match.group()[:40] + "…"


def scan_file(path: Path, runs: set[tuple[float, ...]]) -> Iterator[Finding]:
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, text in enumerate(lines, start=1):
            for kind, excerpt in scan_line(text, runs):
                yield Finding(path, number, kind, excerpt)


def scan_tree(root: Path, runs: set[tuple[float, ...]]) -> list[Finding]:
    """Findings in every `*.log` file under `root`."""
    return [finding for path in sorted(root.rglob("*.log")) for finding in scan_file(path, runs)]
