"""What the generator says on the wire to each kind of server.

Clarity: the v1 protocol (token in the query string, join frames, `message` frames whose
`content` is echoed). Baseline: the Channels tutorial's `{"message": ...}` frames.

A probe's content carries everything a receiver needs, so any process can measure it:
`BM <step> <sender> <seq> <monotonic ns> <padding>` (CLOCK_MONOTONIC is system-wide on Linux).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import NamedTuple

from websockets.asyncio.client import ClientConnection

from bench.servers import ServerKind
from chat.testing.processes import PROJECT_ID

MARK = "BM"
TOKEN_LIFETIME = 6 * 3600


@dataclass(frozen=True)
class User:
    index: int  # global sender id, unique in the run
    uid: str
    room: str
    url: str  # the server's ws://host:port


class Probe(NamedTuple):
    step: int
    sender: int
    seq: int
    sent_ns: int


class JoinRefused(Exception):
    """The server sent an error frame (or closed) instead of the join frames."""


def probe_text(step: int, sender: int, seq: int, sent_ns: int, padding: str) -> str:
    return f"{MARK} {step} {sender} {seq} {sent_ns} {padding}"


def probe_parse(content: str) -> Probe | None:
    parts = content.split(" ", 5)
    if len(parts) < 5 or parts[0] != MARK:
        return None
    try:
        return Probe(int(parts[1]), int(parts[2]), int(parts[3]), int(parts[4]))
    except ValueError:
        return None


class Wire:
    """One server kind's client side: URL, join handshake, chat frame encoding."""

    kind: ServerKind

    def url(self, user: User) -> str:
        raise NotImplementedError

    async def join(self, connection: ClientConnection, timeout: float) -> list[dict]:
        """Read what the server sends after the handshake, until the socket is usable; the
        frames read."""
        return []

    def encode(self, content: str, message_id: str | None = None) -> str:
        """A chat message; `message_id`: the client's id (where the protocol has one)."""
        raise NotImplementedError

    def decode(self, raw: str | bytes) -> tuple[str, str]:
        """(`message`, content) for a chat message; (`error`, code); else (type, "")."""
        raise NotImplementedError


class BaselineWire(Wire):
    kind = ServerKind.BASELINE

    def url(self, user: User) -> str:
        return f"{user.url}/ws/{user.room}/"

    def encode(self, content: str, message_id: str | None = None) -> str:
        return json.dumps({"message": content})

    def decode(self, raw: str | bytes) -> tuple[str, str]:
        return "message", json.loads(raw)["message"]


class ClarityWire(Wire):
    kind = ServerKind.CLARITY
    JOIN_FRAMES = ("connection_ack", "presence", "history")

    def url(self, user: User) -> str:
        from chat.devtokens import emulator_token

        token = emulator_token(
            uid=user.uid, name=user.uid, project_id=PROJECT_ID, lifetime=TOKEN_LIFETIME
        )
        return f"{user.url}/api/v1/ws/{user.room}?token={token}"

    async def join(self, connection: ClientConnection, timeout: float) -> list[dict]:
        """The join frames in order, and any room frame that came between them (a message
        sent to the room while this socket joined)."""
        frames: list[dict] = []
        async with asyncio.timeout(timeout):
            for expected in self.JOIN_FRAMES:
                while True:
                    frame = json.loads(await connection.recv())
                    frames.append(frame)
                    if frame.get("type") == "error":
                        raise JoinRefused(frame.get("error_code") or "error")
                    if frame.get("type") == expected:
                        break
                    if not frames[1:]:  # the ack comes first
                        raise JoinRefused(f"expected {expected}, got {frame.get('type')}")
        return frames

    def encode(self, content: str, message_id: str | None = None) -> str:
        frame = {"type": "message", "content": content}
        if message_id is not None:
            frame["message_id"] = message_id
        return json.dumps(frame, ensure_ascii=False)

    def decode(self, raw: str | bytes) -> tuple[str, str]:
        frame = json.loads(raw)
        kind = frame.get("type", "")
        if kind == "message":
            return kind, frame.get("content") or ""
        if kind == "error":
            return kind, frame.get("error_code") or "?"
        return kind, ""


WIRES: dict[ServerKind, Wire] = {
    ServerKind.BASELINE: BaselineWire(),
    ServerKind.CLARITY: ClarityWire(),
}
