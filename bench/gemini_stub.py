"""A Gemini Developer API stub over plain HTTP, writing its answer at a fixed token rate (the
`stream` scenario's provider).

The server under test is pointed at it with `GOOGLE_GEMINI_BASE_URL=http://127.0.0.1:<port>`
(google-genai honours it for the Developer API, `GEMINI_API_KEY` set) and asks either

- `POST /v1/models/<model>:streamGenerateContent?alt=sse` (google-genai 3.6.1's default API
  version; `/v1beta/...` is answered the same): a `text/event-stream` response
  (HTTP/1.1, chunked, kept alive as the real API's connections are) whose first event comes
  `first_chunk` seconds after the request, then the next every `tokens_per_event / rate` s,
  each carrying `tokens_per_event` pieces of TOKEN_CHARS characters ("tokens") in
  `data: {"candidates":[{"content":{"role":"model","parts":[{"text":...}]}}]}`, `tokens`
  pieces in all, the last with `"finishReason":"STOP"`; or
- `POST /v1/models/<model>:generateContent`: the whole text as one JSON response, after
  as long as the stream would take (the non-streaming call the server made before issue 15).

The answer is the same plain text every time, which the server stores unchanged as its reply
(its sanitising has nothing to remove). A question's tag (`bench-q-...`, anywhere in the
request body) is recorded with the request's arrival and its first and last event
(CLOCK_MONOTONIC, so the coordinator can line them up with the clients' clocks).

Run by the bench as a `bench.fleet.Fleet` process (`main`: ops `listen`, `requests`); by hand:
`.venv/bin/python -m bench.gemini_stub --port 8765 --first-chunk 0.8 --rate 50`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.loadgen import serve

HOST = "127.0.0.1"
TOKEN_CHARS = 4
TAG = re.compile(rb"bench-q-[0-9a-z-]+")
# google-genai 3.6.1 asks /v1/... (its default API version; /v1beta/... with
# GOOGLE_GENAI_API_VERSION=beta): any version is answered.
PATH = re.compile(r"^/(?P<version>v1\w*)/models/(?P<model>[^:/?]+):(?P<method>\w+)(?:\?.*)?$")
HEAD_LIMIT = 64 * 1024
BODY_LIMIT = 8 * 1024 * 1024
# Ordinary sentences, repeated as needed: no markup, no escapes, nothing the server's
# sanitising would change.
SENTENCES = (
    "Going to bed and waking up at the same times every day helps your body clock settle. ",
    "Daylight in the morning and a dim, quiet room at night make the signal clearer. ",
    "A short walk after lunch can lift the afternoon dip without hurting the night. ",
    "Caffeine late in the day and heavy meals near bedtime often delay sleep. ",
    "If you keep waking up tired for weeks, talk to a doctor about it. ",
)


@dataclass(frozen=True)
class Answer:
    first_chunk: float = 0.8  # s from the request to the first event
    rate: float = 50.0  # tokens per second after the first event
    tokens: int = 300  # pieces of TOKEN_CHARS characters
    tokens_per_event: int = 10  # gemini-2.5-flash sends ~49 (bench/README.md)

    def text(self) -> str:
        """The whole answer: `tokens` x TOKEN_CHARS characters (less the last space, if any)."""
        wanted = self.tokens * TOKEN_CHARS
        text = ""
        while len(text) < wanted:
            text += "".join(SENTENCES)
        return text[:wanted].rstrip()

    def pieces(self) -> list[str]:
        """What each event carries, in order; together the model's whole answer."""
        text, size = self.text(), TOKEN_CHARS * self.tokens_per_event
        return [text[i : i + size] for i in range(0, len(text), size)]

    def interval(self) -> float:
        """Seconds between two events."""
        return self.tokens_per_event / self.rate

    def seconds(self) -> float:
        """From the request to the last event."""
        return self.first_chunk + (len(self.pieces()) - 1) * self.interval()


@dataclass
class Served:
    """One request: when it came, its first and last event were written, how it ended."""

    method: str
    tag: str | None
    received_at: float
    first_at: float | None = None
    last_at: float | None = None
    events: int = 0
    outcome: str = "open"  # "done", "aborted" (the client went away), "error"


@dataclass
class Stub:
    answer: Answer
    served: list[Served] = field(default_factory=list)
    connections: int = 0
    server: asyncio.Server | None = None

    async def listen(self, port: int = 0) -> int:
        self.server = await asyncio.start_server(self.connection, HOST, port, backlog=1024)
        return self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    def report(self) -> dict[str, Any]:
        """Every request served so far (and forget them)."""
        served, self.served = self.served, []
        return {"connections": self.connections, "requests": [asdict(s) for s in served]}

    # --- HTTP ---------------------------------------------------------------------------------

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while await self.request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; whether the connection stays open for another."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        received_at = time.monotonic()
        if len(head) > HEAD_LIMIT:
            return False
        line, *header_lines = head.decode("latin-1").split("\r\n")
        method, _, rest = line.partition(" ")
        target = rest.rpartition(" ")[0]
        headers = {}
        for header in header_lines:
            name, _, value = header.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length") or 0)
        if length > BODY_LIMIT:
            return False
        body = await reader.readexactly(length) if length else b""
        keep = headers.get("connection", "").lower() != "close"
        match = PATH.match(target)
        if method != "POST" or match is None:
            await self.respond(writer, 404, {"error": {"code": 404, "status": "NOT_FOUND"}})
            return keep
        tag_match = TAG.search(body)
        served = Served(
            match["method"], tag_match.group().decode() if tag_match else None, received_at
        )
        self.served.append(served)
        if match["method"] == "streamGenerateContent":
            await self.stream(writer, served, match["model"])
        elif match["method"] == "generateContent":
            await self.whole(writer, served, match["model"])
        else:
            served.outcome = "error"
            await self.respond(writer, 404, {"error": {"code": 404, "status": "NOT_FOUND"}})
        return keep

    async def respond(self, writer: asyncio.StreamWriter, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        reason = {200: "OK", 404: "Not Found"}.get(status, "Error")
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; charset=UTF-8\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        await writer.drain()

    @staticmethod
    def candidate(text: str, model: str, last: bool) -> dict[str, Any]:
        candidate: dict[str, Any] = {"content": {"role": "model", "parts": [{"text": text}]}}
        if last:
            candidate["finishReason"] = "STOP"
        candidate["index"] = 0
        return {"candidates": [candidate], "modelVersion": model}

    async def whole(self, writer: asyncio.StreamWriter, served: Served, model: str) -> None:
        await asyncio.sleep(max(0.0, served.received_at + self.answer.seconds() - time.monotonic()))
        body = self.candidate("".join(self.answer.pieces()), model, last=True)
        try:
            await self.respond(writer, 200, body)
        except ConnectionError:
            served.outcome = "aborted"
            raise
        served.first_at = served.last_at = time.monotonic()
        served.events = 1
        served.outcome = "done"

    async def stream(self, writer: asyncio.StreamWriter, served: Served, model: str) -> None:
        """The answer as server-sent events, one piece at each due time (late pieces are not
        bunched up to catch up: each waits for its own time, counted from the first)."""
        answer = self.answer
        pieces = answer.pieces()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\nCache-Control: no-cache\r\n\r\n"
        )
        due = served.received_at + answer.first_chunk
        try:
            for index, piece in enumerate(pieces):
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                last = index == len(pieces) - 1
                event = self.candidate(piece, model, last)
                data = f"data: {json.dumps(event, ensure_ascii=False)}\r\n\r\n".encode()
                writer.write(b"%x\r\n%s\r\n" % (len(data), data))
                await writer.drain()
                now = time.monotonic()
                if served.first_at is None:
                    served.first_at = now
                served.last_at = now
                served.events += 1
                due += answer.interval()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except ConnectionError:
            served.outcome = "aborted"
            raise
        served.outcome = "done"


class StubProcess:
    """The stub in a fleet process: `listen` (a fresh stub with this answer; its port),
    `requests` (what it served since the last call)."""

    def __init__(self) -> None:
        self.stub: Stub | None = None

    async def handle(self, command: dict) -> dict:
        if command["op"] == "listen":
            await self.close_all()
            self.stub = Stub(Answer(**command["answer"]))
            return {"port": await self.stub.listen(command.get("port", 0))}
        if command["op"] == "requests":
            assert self.stub is not None, "listen first"
            return self.stub.report()
        if command["op"] == "close":
            return await self.close_all()
        raise ValueError(f"unknown op {command['op']!r}")

    async def close_all(self) -> dict:
        if self.stub is not None:
            await self.stub.close()
            self.stub = None
        return {"ok": True}


def main(pipe: Any, index: int, processes: int, counters: Any) -> None:
    """Entry point of the stub's process (`bench.fleet.Fleet(1, target=main)`)."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(pipe, StubProcess()))


async def standalone(port: int, answer: Answer) -> None:
    stub = Stub(answer)
    port = await stub.listen(port)
    print(f"Gemini stub on http://{HOST}:{port} ({answer})", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="bench.gemini_stub", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--first-chunk", type=float, default=Answer.first_chunk)
    parser.add_argument("--rate", type=float, default=Answer.rate)
    parser.add_argument("--tokens", type=int, default=Answer.tokens)
    parser.add_argument("--tokens-per-event", type=int, default=Answer.tokens_per_event)
    args = parser.parse_args()
    answer = Answer(args.first_chunk, args.rate, args.tokens, args.tokens_per_event)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(standalone(args.port, answer))
