"""One load-generator process: its own asyncio loop and its share of the simulated users.

The coordinator (`bench.fleet`) sends commands over a pipe; this process answers each one.
`start` returns at once and the step runs in the background until `collect`, so the
coordinator can watch the shared counters meanwhile. Every user is one WebSocket; every
socket has a reader that timestamps the probes it receives (latency = receive time - the
send time written in the probe by whichever process sent it).

Recovering users (`connect` with `recover`, the `restart` scenario) behave as the protocol's
clients do (`bench.recovery`): a closed socket is opened again after a backoff, the user
catches up on what it missed by seq, and messages whose echo has not come are sent again with
the same client id. Their messages carry a client `message_id`; what each saw is reported by
`collect`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import json
import random
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Protocol

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bench.recovery import RATE_LIMITED_CLOSE, RoomView, backoff_delay
from bench.servers import ServerKind
from bench.wire import WIRES, JoinRefused, User, Wire, probe_parse, probe_text

# Slots of each process in the shared counters (coordinator reads them for progress/drain).
# AWAY: recovering users closed during the step and not yet back and caught up.
SENT, RECEIVED, OPEN, ERRORS, AWAY = range(5)
SLOTS = 5
JOIN_TIMEOUT = 30.0  # s: a reconnect's handshake and join frames
PUMP_EVERY = 0.2  # s between two looks at the recovering users' gaps and refused catch-ups
QUIET = 1.0  # s without a room frame before a recovering step counts as drained
# A step with `reads`: each member reports what it has read (`read`, protocol §12) at most
# once this often, as the browser client does; the members' turns are spread over it.
READ_SPACING = 1.0  # s
READ_TURNS = 10


class DialFailed(Exception):
    """A socket could not be opened and joined: why, and the close code if the server closed."""

    def __init__(self, reason: str, close_code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.close_code = close_code


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
    view: RoomView | None = None  # a recovering user's view of its room
    rejoin: asyncio.Task | None = None
    read_seq: int = 0  # the highest seq of the messages it received (a step with `reads`)
    read_sent: int = 0  # the highest it has reported


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
        self.recovering = False  # recovering users reconnect when closed (during a step)
        self.pumping: asyncio.Task | None = None
        self.reads = False  # members report what they read (`read` frames) during the step
        self.reading: asyncio.Task | None = None
        self.last_frame_at = 0.0
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
            return await self.collect(command.get("drain", 0.0))
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
        recover = command.get("recover", False)
        results = await asyncio.gather(*(self.open(user, timeout, recover) for user in users))
        latencies = [latency for latency in results if latency is not None]
        return {"latencies_ms": latencies, "failed": len(users) - len(latencies)}

    async def open(self, user: User, timeout: float, recover: bool) -> float | None:
        started = time.perf_counter()
        try:
            connection, frames = await self.dial(user, timeout)
        except DialFailed as failure:
            self.errors[failure.reason] += 1
            self.count(ERRORS)
            return None
        latency = (time.perf_counter() - started) * 1000
        member = Member(user, connection, view=RoomView() if recover else None)
        self.members.append(member)
        await self.attach(member, connection, frames)
        return latency

    async def dial(self, user: User, timeout: float) -> tuple[ClientConnection, list[dict]]:
        """A socket for this user, joined: the connection and the join frames read."""
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
            raise DialFailed(f"connect:{type(exc).__name__}") from exc
        try:
            frames = await self.wire.join(connection, timeout)
        except (JoinRefused, ConnectionClosed, TimeoutError) as exc:
            reason = str(exc) if isinstance(exc, JoinRefused) else type(exc).__name__
            await connection.close()
            raise DialFailed(f"join:{reason}", connection.close_code) from exc
        return connection, frames

    async def attach(self, member: Member, connection: ClientConnection, frames: list) -> None:
        """The member's socket is this joined connection: read it from now on. A recovering
        user takes in its join frames, catches up, and sends again what was not echoed."""
        member.connection = connection
        if member.view is not None:
            for frame in frames:
                await self.on_room_frame(member, frame)
            for text in list(member.view.unacknowledged.values()):
                with contextlib.suppress(ConnectionClosed):
                    await connection.send(text)
        member.reader = asyncio.create_task(self.read(member))
        self.count(OPEN)

    def start(self, command: dict) -> dict:
        """Reset the counters and begin a step: fixed rate, closed loop, or fixed rate while
        recovering users reconnect (`recover`)."""
        for slot in (SENT, RECEIVED, ERRORS, AWAY):
            self.counters[self.base + slot] = 0
        for member in self.members:
            member.seen.clear()
        self.step = Step(command["step"], time.process_time(), time.monotonic())
        self.recovering = command["mode"] == "recover"
        if self.recovering:
            self.pumping = asyncio.create_task(self.pump_all())
        # No collector pauses while timestamping probes (they would look like server latency).
        gc.collect()
        gc.disable()
        start_at, duration = command["start_at"], command["duration"]
        self.reads = bool(command.get("reads"))
        if self.reads:
            self.reading = asyncio.create_task(self.send_reads(start_at, duration))
        if command["mode"] in ("rate", "recover"):
            senders = command.get("senders")
            chosen = None if senders is None else set(senders)
            members = [m for m in self.members if chosen is None or m.user.index in chosen]
            coroutine = self.send_at_rate(
                self.step, members, command["rate_per_user"], start_at, duration
            )
        else:
            coroutine = self.send_closed_loop(self.step, start_at, duration, command["timeout"])
        self.task = asyncio.create_task(coroutine)
        return {"ok": True}

    async def collect(self, drain: float) -> dict:
        """Stop sending, and report the step; recovering users first settle (up to `drain`
        seconds), then stop reconnecting, and each reports its view."""
        for task in (self.task, self.reading):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self.task = self.reading = None
        self.reads = False
        recovery = await self.settle(drain) if self.recovering else None
        step, self.step = self.step, None
        gc.enable()
        if step is None:
            return {}
        return {
            "recovery": recovery,
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

    async def settle(self, drain: float) -> list[dict]:
        """Wait until every recovering user is settled and no room frame came for QUIET
        seconds (at most `drain` s); then stop recovering: each user's report."""
        deadline = time.monotonic() + drain
        while time.monotonic() < deadline:
            quiet = time.monotonic() - self.last_frame_at >= QUIET
            if quiet and all(m.view.settled() for m in self.members if m.view is not None):
                break
            await asyncio.sleep(0.05)
        self.recovering = False
        for task in [self.pumping, *(m.rejoin for m in self.members)]:
            if task is not None:
                task.cancel()
        self.pumping = None
        return [
            {"user": m.user.index, "room": m.user.room, **m.view.report()}
            for m in self.members
            if m.view is not None
        ]

    async def close_all(self) -> dict:
        self.closing = True
        self.recovering = False
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
                if member.view is None:
                    self.on_frame(member, raw)
                else:
                    await self.on_room_frame(member, json.loads(raw))
        if self.closing:
            return
        code = connection.close_code if connection.close_code is not None else 1006
        for counter in (self.closes, self.step.closes if self.step else None):
            if counter is not None:
                counter[str(code)] += 1
        if member.view is not None and self.recovering:
            self.count(OPEN, -1)
            member.view.closed(code)
            if not member.view.away:
                member.view.away = True
                self.count(AWAY)
            member.rejoin = asyncio.create_task(self.rejoin(member, code))
            return
        with contextlib.suppress(ValueError):
            self.members.remove(member)
            self.count(OPEN, -1)

    def on_frame(self, member: Member, raw: str | bytes) -> None:
        kind, value = self.wire.decode(raw)
        if kind == "error":
            self.count_error(value)
            return
        if self.reads and kind == "message":
            seq = json.loads(raw).get("seq")
            if isinstance(seq, int) and seq > member.read_seq:
                member.read_seq = seq
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

    async def send_reads(self, start_at: float, duration: float) -> None:
        """Each member says how far it has read, at most once per READ_SPACING, a tenth of
        the members at a time."""
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        end, turn = start_at + duration, 0
        while time.monotonic() < end:
            for member in self.members[turn % READ_TURNS :: READ_TURNS]:
                if member.read_seq > member.read_sent:
                    member.read_sent = member.read_seq
                    with contextlib.suppress(ConnectionClosed):
                        await member.connection.send(
                            json.dumps({"type": "read", "seq": member.read_sent})
                        )
            turn += 1
            await asyncio.sleep(READ_SPACING / READ_TURNS)

    def count_error(self, code: str) -> None:
        self.errors[code] += 1
        if self.step is not None:
            self.step.errors[code] += 1
        self.count(ERRORS)

    # --- recovering users -------------------------------------------------------------------

    async def on_room_frame(self, member: Member, frame: dict) -> None:
        """A recovering user's frame (join frames included): into its view, then whatever
        catch-up that calls for."""
        view, now = member.view, time.monotonic()
        assert view is not None
        kind = frame.get("type")
        if kind == "connection_ack":
            view.joined(frame, now)
        elif kind == "message":
            self.count(RECEIVED, view.message_seen(frame, now))
        elif kind == "history":
            self.count(RECEIVED, view.page_seen(frame, now))
        elif kind == "resync":
            view.resync(frame.get("last_seq"))
        elif kind == "error":
            self.count_error(frame.get("error_code") or "?")
            view.refused(frame, now)
        if kind in ("message", "history"):
            self.last_frame_at = now
        await self.pump(member)

    async def pump(self, member: Member) -> None:
        """Send the catch-up read the user's view asks for now, if any; note when it is back
        and caught up."""
        view, now = member.view, time.monotonic()
        assert view is not None
        request = view.catch_up_request(now)
        if request is not None:
            with contextlib.suppress(ConnectionClosed):
                await member.connection.send(json.dumps(request))
        if view.away and view.caught_up(now):
            view.away = False
            self.count(AWAY, -1)

    async def pump_all(self) -> None:
        """Gaps still open after their wait, and refused catch-ups due again, are fetched."""
        while True:
            await asyncio.sleep(PUMP_EVERY)
            for member in list(self.members):
                if member.view is not None and member.view.joined_at is not None:
                    await self.pump(member)

    async def rejoin(self, member: Member, code: int) -> None:
        """Reconnect a closed recovering user, after a backoff, until it is joined again."""
        view = member.view
        assert view is not None
        attempt = 0
        while self.recovering:
            await asyncio.sleep(backoff_delay(attempt, rate_limited=code == RATE_LIMITED_CLOSE))
            attempt += 1
            view.attempts += 1
            try:
                connection, frames = await self.dial(member.user, JOIN_TIMEOUT)
            except DialFailed as failure:
                view.refusals[failure.reason] += 1
                if failure.close_code is not None:
                    view.refusals[f"close {failure.close_code}"] += 1
                code = failure.close_code or 0
                continue
            await self.attach(member, connection, frames)
            return

    # --- sending ----------------------------------------------------------------------------

    async def send(self, member: Member, step: Step) -> bool:
        """One probe; a recovering user's carries a client id, and counts as unacknowledged
        until its echo comes (not sent at all while the user is closed, as the client)."""
        seq = member.seq
        member.seq += 1
        text = probe_text(step.number, member.user.index, seq, time.monotonic_ns(), self.padding)
        member.waiting_seq = seq
        client_id = None if member.view is None else f"{member.user.index}.{seq}"
        frame = self.wire.encode(text, client_id)
        try:
            await member.connection.send(frame)
        except ConnectionClosed:
            step.send_failures += 1
            return False
        if member.view is not None and client_id is not None:
            member.view.unacknowledged[client_id] = frame
        step.sent += 1
        self.count(SENT)
        return True

    async def send_at_rate(
        self,
        step: Step,
        members: list[Member],
        rate_per_user: float,
        start_at: float,
        duration: float,
    ) -> None:
        """Each of these users sends `rate_per_user` messages/s; the users' sends interleave
        evenly (and this process's are offset from the other processes')."""
        members = list(members)
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
