"""One load-generator process: its own asyncio loop and its share of the simulated users.

The coordinator (`bench.fleet`) sends commands over a pipe; this process answers each one.
`start` returns at once and the step runs in the background until `collect`, so the
coordinator can watch the shared counters meanwhile. Every user is one WebSocket; every
socket has a reader that timestamps the probes it receives (latency = receive time - the
send time written in the probe by whichever process sent it).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import random
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Protocol

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bench.servers import ServerKind
from bench.wire import WIRES, JoinRefused, User, Wire, probe_parse, probe_text

# Slots of each process in the shared counters (coordinator reads them for progress/drain).
SENT, RECEIVED, OPEN, ERRORS = range(4)
SLOTS = 4


@dataclass(eq=False)
class Member:
    """One simulated user: its socket and what it has seen in the current step."""

    user: User
    connection: ClientConnection
    seq: int = 0
    seen: set[int] = field(default_factory=set)
    waiting_seq: int = -1
    waiter: asyncio.Future | None = None
    reader: asyncio.Task | None = None


@dataclass
class Step:
    number: int
    started_cpu: float
    started_wall: float
    latencies_us: list[int] = field(default_factory=list)
    sent: int = 0
    send_failures: int = 0
    received: int = 0
    duplicates: int = 0
    stale: int = 0
    timeouts: int = 0
    lag_max: float = 0.0
    errors: collections.Counter = field(default_factory=collections.Counter)
    closes: collections.Counter = field(default_factory=collections.Counter)


class LoadProcess:
    def __init__(self, index: int, processes: int, counters: Any) -> None:
        self.index = index
        self.processes = processes
        self.counters = counters
        self.base = index * SLOTS
        self.members: list[Member] = []
        self.wire: Wire = WIRES[ServerKind.BASELINE]
        self.step: Step | None = None
        self.task: asyncio.Task | None = None
        self.closing = False
        self.padding = ""
        # Errors and closes outside a step (e.g. while connecting or holding).
        self.errors: collections.Counter = collections.Counter()
        self.closes: collections.Counter = collections.Counter()

    def count(self, slot: int, amount: int = 1) -> None:
        self.counters[self.base + slot] += amount

    # --- commands ---------------------------------------------------------------------------

    async def handle(self, command: dict) -> dict:
        op = command["op"]
        if op == "connect":
            return await self.connect(command)
        if op == "start":
            return self.start(command)
        if op == "collect":
            return await self.collect()
        if op == "status":
            return self.status()
        if op == "close":
            return await self.close_all()
        raise ValueError(f"unknown op {op!r}")

    async def connect(self, command: dict) -> dict:
        """Open sockets for these users (all at once); the join latency of each."""
        self.wire = WIRES[ServerKind(command["kind"])]
        self.closing = False
        self.padding = command.get("padding", "")
        users = [User(*fields) for fields in command["users"]]
        timeout = command.get("timeout", 60.0)
        results = await asyncio.gather(*(self.open(user, timeout) for user in users))
        latencies = [latency for latency in results if latency is not None]
        return {"latencies_ms": latencies, "failed": len(users) - len(latencies)}

    async def open(self, user: User, timeout: float) -> float | None:
        started = time.perf_counter()
        try:
            connection = await connect(
                self.wire.url(user),
                open_timeout=timeout,
                close_timeout=5,
                ping_interval=None,
                compression=None,
                max_queue=None,
                proxy=None,
            )
        except Exception as exc:
            self.errors[f"connect:{type(exc).__name__}"] += 1
            self.count(ERRORS)
            return None
        try:
            await self.wire.join(connection, timeout)
        except (JoinRefused, ConnectionClosed, TimeoutError) as exc:
            reason = str(exc) if isinstance(exc, JoinRefused) else type(exc).__name__
            self.errors[f"join:{reason}"] += 1
            self.count(ERRORS)
            await connection.close()
            return None
        latency = (time.perf_counter() - started) * 1000
        member = Member(user, connection)
        member.reader = asyncio.create_task(self.read(member))
        self.members.append(member)
        self.count(OPEN)
        return latency

    def start(self, command: dict) -> dict:
        """Reset the counters and begin a step: fixed rate or closed loop."""
        for slot in (SENT, RECEIVED, ERRORS):
            self.counters[self.base + slot] = 0
        for member in self.members:
            member.seen.clear()
        self.step = Step(command["step"], time.process_time(), time.monotonic())
        # No collector pauses while timestamping probes (they would look like server latency).
        gc.collect()
        gc.disable()
        start_at, duration = command["start_at"], command["duration"]
        if command["mode"] == "rate":
            coroutine = self.send_at_rate(self.step, command["rate_per_user"], start_at, duration)
        else:
            coroutine = self.send_closed_loop(self.step, start_at, duration, command["timeout"])
        self.task = asyncio.create_task(coroutine)
        return {"ok": True}

    async def collect(self) -> dict:
        """Stop sending, and report the step."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None
        step, self.step = self.step, None
        gc.enable()
        if step is None:
            return {}
        return {
            "sent": step.sent,
            "send_failures": step.send_failures,
            "received": step.received,
            "duplicates": step.duplicates,
            "stale": step.stale,
            "timeouts": step.timeouts,
            "lag_max_ms": step.lag_max * 1000,
            "latencies_us": step.latencies_us,
            "errors": dict(step.errors),
            "closes": dict(step.closes),
            "cpu_seconds": time.process_time() - step.started_cpu,
            "wall_seconds": time.monotonic() - step.started_wall,
            "open": len(self.members),
        }

    def status(self) -> dict:
        return {"open": len(self.members), "errors": dict(self.errors), "closes": dict(self.closes)}

    async def close_all(self) -> dict:
        self.closing = True
        members, self.members = self.members, []
        await asyncio.gather(
            *(member.connection.close() for member in members), return_exceptions=True
        )
        for member in members:
            if member.reader is not None:
                member.reader.cancel()
        self.counters[self.base + OPEN] = 0
        report = self.status() | {"closed": len(members)}
        self.errors.clear()
        self.closes.clear()
        return report

    # --- receiving --------------------------------------------------------------------------

    async def read(self, member: Member) -> None:
        connection = member.connection
        with contextlib.suppress(ConnectionClosed):
            async for raw in connection:
                self.on_frame(member, raw)
        if self.closing:
            return
        code = connection.close_code if connection.close_code is not None else 1006
        for counter in (self.closes, self.step.closes if self.step else None):
            if counter is not None:
                counter[str(code)] += 1
        with contextlib.suppress(ValueError):
            self.members.remove(member)
            self.count(OPEN, -1)

    def on_frame(self, member: Member, raw: str | bytes) -> None:
        kind, value = self.wire.decode(raw)
        if kind == "error":
            self.errors[value] += 1
            if self.step is not None:
                self.step.errors[value] += 1
            self.count(ERRORS)
            return
        step = self.step
        if kind != "message" or step is None:
            return
        probe = probe_parse(value)
        if probe is None:
            return
        if probe.step != step.number:
            step.stale += 1
            return
        key = probe.sender << 32 | probe.seq
        if key in member.seen:
            step.duplicates += 1
            return
        member.seen.add(key)
        step.latencies_us.append((time.monotonic_ns() - probe.sent_ns) // 1000)
        step.received += 1
        self.count(RECEIVED)
        own = probe.sender == member.user.index and probe.seq == member.waiting_seq
        if own and member.waiter is not None and not member.waiter.done():
            member.waiter.set_result(None)

    # --- sending ----------------------------------------------------------------------------

    async def send(self, member: Member, step: Step) -> bool:
        seq = member.seq
        member.seq += 1
        text = probe_text(step.number, member.user.index, seq, time.monotonic_ns(), self.padding)
        member.waiting_seq = seq
        try:
            await member.connection.send(self.wire.encode(text))
        except ConnectionClosed:
            step.send_failures += 1
            return False
        step.sent += 1
        self.count(SENT)
        return True

    async def send_at_rate(
        self, step: Step, rate_per_user: float, start_at: float, duration: float
    ) -> None:
        """Each user sends `rate_per_user` messages/s; the users' sends interleave evenly
        (and this process's are offset from the other processes')."""
        members = list(self.members)
        if not members or rate_per_user <= 0:
            return
        random.shuffle(members)
        interval = 1.0 / (rate_per_user * len(members))
        due = start_at + interval * self.index / self.processes
        end = start_at + duration
        sent = 0
        while due < end:
            now = time.monotonic()
            if due > now:
                await asyncio.sleep(due - now)
                now = time.monotonic()
            step.lag_max = max(step.lag_max, now - due)
            while due <= now and due < end:
                await self.send(members[sent % len(members)], step)
                sent += 1
                due += interval

    async def send_closed_loop(
        self, step: Step, start_at: float, duration: float, timeout: float
    ) -> None:
        """Each user sends its next message as soon as its previous one came back."""
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        end = start_at + duration
        await asyncio.gather(*(self.cycle(member, step, end, timeout) for member in self.members))

    async def cycle(self, member: Member, step: Step, end: float, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        while time.monotonic() < end:
            member.waiter = loop.create_future()
            if not await self.send(member, step):
                return
            try:
                await asyncio.wait_for(member.waiter, timeout)
            except TimeoutError:
                step.timeouts += 1
        member.waiter = None


class Handler(Protocol):
    """What a fleet process runs: one reply per command; `close_all` before it exits."""

    async def handle(self, command: dict) -> dict: ...

    async def close_all(self) -> dict: ...


async def serve(pipe: Connection, worker: Handler) -> None:
    """Answer the coordinator's commands until `exit`."""
    loop = asyncio.get_running_loop()
    while True:
        command = await loop.run_in_executor(None, pipe.recv)
        if command["op"] == "exit":
            await worker.close_all()
            pipe.send({"ok": True})
            return
        try:
            reply = await worker.handle(command)
        except Exception:
            reply = {"failure": traceback.format_exc()}
        pipe.send(reply)


def main(pipe: Connection, index: int, processes: int, counters: Any) -> None:
    """Entry point of a generator process."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(pipe, LoadProcess(index, processes, counters)))
