"""The `stream` scenario's askers: users that ask the assistant and time its answer.

They run in a process of their own (`bench.fleet.Fleet(1, target=main)`), apart from the
generator processes that carry the room's chat, so neither side's reading delays the other's.
Each asker is one user with one socket in a room. It sends `@ai bench-q-<label>-<asker>-<n>
...` (the tag lets the Gemini stub, `bench.gemini_stub`, tell which question a request is
for), and notes when its echo came (the question's `message_id`), when the first
`assistant_delta` answering it came (`in_reply_to` that id; index 0 expected) and when the
stored `message` from `AI` with `metadata.in_reply_to` that id came; then it asks again.

Ops: `setup` (open the askers' sockets, joined), `start` (asker i asks first at
`start_at + i * stagger`, then again as soon as each answer is stored, at most `asks`
questions, none after `until`; in the background; `expected`: the answer the stub writes),
`status` (questions asked and answered so far), `collect` (wait for the questions still out;
every question's record, and when asker 0 saw each delta of the room), `close`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from websockets.exceptions import ConnectionClosed

from bench.loadgen import serve
from chat.testing.client import ChatSocket

AI_USER_ID = "AI"  # chat.protocol.AI_USER_ID, the stored reply's author
REPLY_TIMEOUT = 90.0  # s from a question to its stored answer (the server's own bound is 60 s)
CONNECT_OPTIONS: dict[str, Any] = {"ping_interval": None, "compression": None, "max_size": None}
QUESTION = "how can I fall asleep more easily on workdays?"


@dataclass
class Question:
    """One question and what came back for it (CLOCK_MONOTONIC seconds, system-wide)."""

    asker: int
    number: int
    tag: str
    sent_at: float
    echo_at: float | None = None
    question_id: str | None = None
    first_delta_at: float | None = None  # the first delta answering it, whatever its index
    first_index: int | None = None  # that delta's index (0 expected)
    deltas: int = 0
    in_order: bool = True  # indexes 0, 1, 2... with none missing or repeated
    delta_text: str = ""  # the deltas' text, joined
    stored_at: float | None = None
    stored_content: str = ""
    error: str | None = None

    def to_json(self, expected: str) -> dict[str, Any]:
        """The record, with the texts compared instead of shipped: the stored answer is the
        stub's (`expected`), the deltas a prefix of it (`deltas_prefix`), or all of it."""
        record = asdict(self)
        del record["delta_text"], record["stored_content"]
        stored = self.stored_at is not None
        return record | {
            "stored_chars": len(self.stored_content),
            "stored_ok": stored and self.stored_content == expected,
            "deltas_prefix": stored and self.stored_content.startswith(self.delta_text),
            "deltas_whole": stored and self.deltas > 0 and self.delta_text == self.stored_content,
        }


@dataclass
class Stream:
    """The deltas one socket saw for one reply (by the question they answer)."""

    first_at: float
    first_index: int
    count: int = 0
    next_index: int = 0
    in_order: bool = True
    pieces: list[str] = field(default_factory=list)


@dataclass(eq=False)
class Asker:
    index: int
    uid: str
    client: ChatSocket
    pending: Question | None = None
    answered: asyncio.Future | None = None
    streams: dict[str, Stream] = field(default_factory=dict)


class Askers:
    """One process's askers, driven by the coordinator's commands."""

    def __init__(self) -> None:
        self.askers: list[Asker] = []
        self.readers: list[asyncio.Task] = []
        self.tasks: list[asyncio.Task] = []
        self.questions: list[Question] = []
        self.expected = ""  # the stub's answer, as the server should store it
        self.delta_times: list[float] = []  # asker 0's view of the room's deltas
        self.errors: collections.Counter = collections.Counter()
        self.closes: collections.Counter = collections.Counter()
        self.stopping = False

    async def handle(self, command: dict) -> dict:
        op = command["op"]
        if op == "setup":
            await self.close_all()
            await self.setup(command["url"], command["room"], command["users"])
            return {"ok": True}
        if op == "start":
            self.start(command)
            return {"ok": True}
        if op == "status":
            answered = sum(q.stored_at is not None or q.error is not None for q in self.questions)
            return {"asked": len(self.questions), "answered": answered}
        if op == "collect":
            return await self.collect(command.get("timeout", REPLY_TIMEOUT))
        if op == "close":
            return await self.close_all()
        raise ValueError(f"unknown op {op!r}")

    async def setup(self, url: str, room: str, uids: list[str]) -> None:
        self.stopping = False
        clients = await asyncio.gather(
            *(ChatSocket.join(url, room, uid, timeout=30, **CONNECT_OPTIONS) for uid in uids)
        )
        self.askers = [
            Asker(index, uid, client)
            for index, (uid, client) in enumerate(zip(uids, clients, strict=True))
        ]
        self.readers = [asyncio.create_task(self.read(asker)) for asker in self.askers]

    def start(self, command: dict) -> None:
        self.questions, self.delta_times = [], []
        self.errors.clear()
        self.expected = command["expected"]
        label, asks, until = command["label"], command.get("asks"), command.get("until")
        self.tasks = [
            asyncio.create_task(
                self.ask_loop(
                    asker, label, command["start_at"] + index * command["stagger"], until, asks
                )
            )
            for index, asker in enumerate(self.askers)
        ]

    async def collect(self, timeout: float) -> dict:
        """Every question's record once the last ones are answered (or `timeout` s)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.gather(*self.tasks, return_exceptions=True)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks = []
        for question in self.questions:
            if question.stored_at is None and question.error is None:
                question.error = "unanswered"
        return {
            "questions": [question.to_json(self.expected) for question in self.questions],
            "delta_times": self.delta_times,
            "errors": dict(self.errors),
            "closes": dict(self.closes),
        }

    async def close_all(self) -> dict:
        self.stopping = True
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*(asker.client.close() for asker in self.askers))
        for task in self.readers:
            task.cancel()
        await asyncio.gather(*self.tasks, *self.readers, return_exceptions=True)
        self.askers, self.readers, self.tasks = [], [], []
        self.closes.clear()
        return {"ok": True}

    # --- asking -------------------------------------------------------------------------------

    async def ask_loop(
        self, asker: Asker, label: str, first_at: float, until: float | None, asks: int | None
    ) -> None:
        await asyncio.sleep(max(0.0, first_at - time.monotonic()))
        number = 0
        while (asks is None or number < asks) and (until is None or time.monotonic() < until):
            if not await self.ask(asker, label, number):
                return
            number += 1

    async def ask(self, asker: Asker, label: str, number: int) -> bool:
        """One question, until its answer is stored; False if the socket is gone."""
        tag = f"bench-q-{label}-{asker.index}-{number}"
        question = Question(asker.index, number, tag, time.monotonic())
        asker.pending = question
        asker.answered = asyncio.get_running_loop().create_future()
        self.questions.append(question)
        try:
            question.sent_at = time.monotonic()
            await asker.client.send({"type": "message", "content": f"@ai {tag} {QUESTION}"})
            await asyncio.wait_for(asker.answered, REPLY_TIMEOUT)
        except ConnectionClosed:
            question.error = "closed"
            return False
        except TimeoutError:
            question.error = "timeout"
        finally:
            asker.pending = None
        return True

    # --- reading ------------------------------------------------------------------------------

    async def read(self, asker: Asker) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for raw in asker.client.connection:
                self.on_frame(asker, json.loads(raw), time.monotonic())
        if not self.stopping:
            self.closes[str(asker.client.connection.close_code or 1006)] += 1
            if asker.answered is not None and not asker.answered.done():
                asker.answered.set_exception(ConnectionClosed(None, None))

    def on_frame(self, asker: Asker, frame: dict, now: float) -> None:
        kind = frame.get("type")
        if kind == "assistant_delta":
            if asker.index == 0:
                self.delta_times.append(now)
            self.on_delta(asker, frame, now)
        elif kind == "message":
            self.on_message(asker, frame, now)
        elif kind == "error":
            self.errors[frame.get("error_code") or "?"] += 1

    @staticmethod
    def on_delta(asker: Asker, frame: dict, now: float) -> None:
        key = str(frame.get("in_reply_to"))
        index = frame.get("index")
        stream = asker.streams.get(key)
        if stream is None:
            stream = asker.streams[key] = Stream(now, index if isinstance(index, int) else -1)
        stream.count += 1
        stream.in_order = stream.in_order and index == stream.next_index
        stream.next_index = (index if isinstance(index, int) else stream.next_index) + 1
        stream.pieces.append(str(frame.get("delta") or ""))

    @staticmethod
    def on_message(asker: Asker, frame: dict, now: float) -> None:
        question = asker.pending
        metadata = frame.get("metadata") or {}
        if frame.get("user_id") == AI_USER_ID:
            key = str(metadata.get("in_reply_to"))
            stream = asker.streams.pop(key, None)  # any reply's stream ends with its message
            if question is None or key != question.question_id:
                return
            question.stored_at = now
            question.stored_content = frame.get("content") or ""
            if stream is not None:
                question.first_delta_at = stream.first_at
                question.first_index = stream.first_index
                question.deltas = stream.count
                question.in_order = stream.in_order
                question.delta_text = "".join(stream.pieces)
            if asker.answered is not None and not asker.answered.done():
                asker.answered.set_result(None)
        elif (
            question is not None
            and question.question_id is None
            and frame.get("user_id") == asker.uid
            and question.tag in (frame.get("content") or "")
        ):
            question.echo_at = now
            question.question_id = str(frame.get("message_id"))


def main(pipe: Any, index: int, processes: int, counters: Any) -> None:
    """Entry point of the askers' process (`bench.fleet.Fleet(1, target=main)`)."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(pipe, Askers()))
