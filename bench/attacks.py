"""The `hostile` scenario's clients (protocol §16): a bystander that times heartbeat round trips,
and the attacks of issue 13, each at a stated, capped rate.

They run in processes of their own (`bench.fleet.Fleet` with `main` as target: process 0 is
the bystander, process 1 the attacker), apart from the generator processes that keep the busy
room busy, so neither the attack's work nor the room's delays the bystander's reads. Each
process answers `setup` (open its sockets, before the measurement), `start` (run from
`start_at` for `duration`, in the background), `collect` (the figures; sockets that stopped
reading are read through first, to see how the server closed them) and `close`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from bench.loadgen import serve
from bench.stats import percentile
from chat.protocol import CONTENT_MAX_CHARS, HISTORY_MAX_LIMIT
from chat.testing.client import ChatSocket, heartbeat_probe, token_for

# Non-ASCII costs 4 bytes in (UTF-8) and 12 out: the server's frames escape it (`\ud83d\ude00`).
EMOJI = "\U0001f600"
LONGEST_MESSAGE = EMOJI * CONTENT_MAX_CHARS  # a ~24 KB frame out

# The busy room: BUSY_SENDERS of the bench's generator users in one room, each sending
# BUSY_RATE messages/s (under the default rate limit of 60 a minute) ending with BUSY_PADDING,
# for the whole attack: ~23 KB frames out, ~550 KB/s to each member. (A socket that stops
# reading first fills the kernel's send buffer, up to 4 MB on loopback, then the worker's.)
BUSY_ROOM = "hostile-busy"
BUSY_SENDERS = 30
BUSY_RATE = 0.8
BUSY_PADDING = EMOJI * (CONTENT_MAX_CHARS - 100)
# The bystander: BYSTANDERS users in a quiet room, each sending a heartbeat every
# BYSTANDER_INTERVAL s (at most one a second per user: §16 counts heartbeats beyond that), so
# that together they send one every ~0.1 s.
BYSTANDERS = 11
BYSTANDER_INTERVAL = 1.1
QUIET_ROOM = "hostile-quiet"
ARCHIVE_ROOM = "hostile-archive"

NON_READERS = 20
SMALL_RCVBUF = 4096  # bytes: the kernel doubles it; a reader's window closes at once
HISTORY_SOCKETS = 10
HISTORY_RATE = 3.0  # history requests/s, all sockets together
ARCHIVE_WRITERS = 10  # users that fill the archive room, ARCHIVE_EACH longest messages each
ARCHIVE_EACH = 10
RECONNECT_RATE = 20.0  # join/leave cycles/s of one user
FRAME_RATE = 40.0  # frames/s of one socket (~26 MB/s)
BIG_FRAME = 990_000  # characters: under the health payload limit, so the server parses it
PADDED_HEARTBEAT = 60_000  # characters of client_timestamp: under the 64 KiB frame limit
ANALYSTS = 4
ANALYSIS_BURST = 3  # requests each user sends at once, every ANALYSIS_INTERVAL s
ANALYSIS_INTERVAL = 5.0
WEEK_OF_MINUTES = 10_080  # data points of one analysis (the limit)
SLOW_HANDSHAKES = 200
SLOW_OPEN_RATE = 100.0  # handshakes started/s
SLOW_LINE_EVERY = 15.0  # s between two header lines of one handshake

JOIN_TIMEOUT = 30.0
DRAIN_QUIET = 1.0  # s without a frame: a socket read through is still open
DRAIN_TIMEOUT = 10.0
CHAT_JOIN = ("connection_ack", "presence", "history")
HEALTH_JOIN = ("connection_ack", "system")
CONNECT_OPTIONS: dict[str, Any] = {"ping_interval": None, "compression": None, "max_size": None}


@dataclass(frozen=True)
class Attack:
    name: str
    issue: str  # its letter in issue 13
    rate: str  # the stated, capped rate, as the report prints it
    what: str


ATTACKS = {
    attack.name: attack
    for attack in (
        Attack("none", "-", "-", "control: the busy room and the bystander, no attack"),
        Attack(
            "non-reading",
            "a",
            f"{NON_READERS} sockets; the busy room's traffic",
            f"{NON_READERS} sockets in the busy room stop reading (SO_RCVBUF {SMALL_RCVBUF})",
        ),
        Attack(
            "history",
            "b",
            f"{HISTORY_RATE:g} req/s on {HISTORY_SOCKETS} sockets",
            f"history requests (limit {HISTORY_MAX_LIMIT}, ~2.4 MB answers) on sockets that "
            "do not read",
        ),
        Attack(
            "reconnect",
            "c",
            f"{RECONNECT_RATE:g} cycles/s, 1 user",
            "one user joins the quiet room and leaves, in a loop",
        ),
        Attack(
            "frames",
            "d",
            f"{FRAME_RATE:g} frames/s, 1 socket",
            f"{BIG_FRAME // 1000} KB oversized message, {BIG_FRAME // 1000} KB invalid JSON, "
            f"{PADDED_HEARTBEAT // 1000} KB padded heartbeat, in turn",
        ),
        Attack(
            "analysis",
            "e",
            f"{ANALYSTS * ANALYSIS_BURST} at once every {ANALYSIS_INTERVAL:g} s, {ANALYSTS} users",
            f"health analyses of a week of minutes ({WEEK_OF_MINUTES:,} points)",
        ),
        Attack(
            "slow-handshake",
            "f",
            f"{SLOW_HANDSHAKES} handshakes, 1 line/{SLOW_LINE_EVERY:g} s",
            "handshakes fed one header line at a time: how many are still open at the end",
        ),
    )
}


@dataclass
class Tally:
    """What the server did to one role's sockets, from the client's side."""

    sent: int = 0  # frames, requests or attempts
    errors: collections.Counter = field(default_factory=collections.Counter)  # error codes
    closes: collections.Counter = field(default_factory=collections.Counter)  # close codes
    refusals: collections.Counter = field(default_factory=collections.Counter)  # no socket
    counts: collections.Counter = field(default_factory=collections.Counter)  # role's own
    stopping: bool = False  # our own closes at the end are not counted

    def to_json(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "errors": dict(self.errors),
            "closes": dict(self.closes),
            "refusals": dict(self.refusals),
            **self.counts,
        }


def close_code(client: ChatSocket) -> str:
    return str(client.connection.close_code or 1006)  # None: the connection broke (aborted)


async def open_joined(
    url: str, path: str, uid: str, tally: Tally, *, join: tuple[str, ...] = CHAT_JOIN, **kwargs
) -> ChatSocket | None:
    """A socket past its join frames, or None: the refusal counted (error and close code, or
    why the handshake failed)."""
    try:
        client = await ChatSocket.open(
            url, path, token=token_for(uid), timeout=JOIN_TIMEOUT, **(CONNECT_OPTIONS | kwargs)
        )
    except InvalidStatus as exc:
        tally.refusals[f"http {exc.response.status_code}"] += 1
        return None
    except (OSError, TimeoutError, InvalidHandshake) as exc:
        tally.refusals[f"connect {type(exc).__name__}"] += 1
        return None
    try:
        for expected in join:
            frame = await client.recv(JOIN_TIMEOUT)
            if frame["type"] == "error":
                tally.errors[frame["error_code"]] += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(client.connection.wait_closed(), 5)
                break
            if frame["type"] != expected:
                tally.refusals[f"join: {frame['type']} before {expected}"] += 1
                break
        else:
            return client
    except ConnectionClosed:
        pass
    except TimeoutError:
        tally.refusals["join timeout"] += 1
    if client.connection.close_code is not None:
        tally.closes[close_code(client)] += 1
    await client.close()
    return None


async def read_all(
    client: ChatSocket, tally: Tally, on_frame: Callable[[dict], None] = lambda frame: None
) -> None:
    """Read this socket until it closes: error codes counted, then its close code."""
    with contextlib.suppress(ConnectionClosed):
        async for raw in client.connection:
            frame = json.loads(raw)
            if frame.get("type") == "error":
                tally.errors[frame.get("error_code") or "?"] += 1
            on_frame(frame)
    if not tally.stopping:
        tally.closes[close_code(client)] += 1


async def drain(client: ChatSocket) -> str:
    """What became of a socket that stopped reading: read through what the server sent, then
    its close code (1006: aborted), or "open" if nothing more came for DRAIN_QUIET s or it
    still had more after DRAIN_TIMEOUT s."""
    deadline = time.monotonic() + DRAIN_TIMEOUT
    try:
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.wait_for(client.connection.recv(), min(DRAIN_QUIET, left))
    except ConnectionClosed:
        return close_code(client)
    except TimeoutError:
        pass
    return "open"


async def non_reader(url: str, room: str, uid: str, tally: Tally) -> ChatSocket | None:
    """A socket that reads its join frames and nothing more: its receive window is small and
    stays shut (the client's buffer holds one frame before it stops reading)."""
    address = urlsplit(url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RCVBUF)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (address.hostname, address.port))
    except OSError as exc:
        sock.close()
        tally.refusals[f"connect {type(exc).__name__}"] += 1
        return None
    return await open_joined(url, f"/api/v1/ws/{room}", uid, tally, sock=sock, max_queue=1)


async def sleep_until(moment: float) -> None:
    await asyncio.sleep(max(0.0, moment - time.monotonic()))


async def paced(
    start_at: float, end: float, rate: float, act: Callable[[int], Any], limit: float = math.inf
) -> None:
    """`await act(n)` for n = 0, 1, ... (below `limit`) at most `rate` times a second from
    `start_at` until `end`; a late act is not made up for."""
    due, n = start_at, 0
    while due < end and n < limit:
        await sleep_until(due)
        await act(n)
        n += 1
        due = max(due + 1 / rate, time.monotonic())


# --- roles --------------------------------------------------------------------------------


class Role:
    """One process's part: sockets opened in `setup`, the attack in `run`, figures in `finish`."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.tally = Tally()
        self.clients: list[ChatSocket] = []
        self.tasks: list[asyncio.Task] = []

    async def setup(self) -> None:
        pass

    async def run(self, start_at: float, end: float) -> None:
        await sleep_until(end)

    async def finish(self) -> dict[str, Any]:
        return {}

    def read(self, client: ChatSocket, on_frame: Callable[[dict], None] = lambda f: None) -> None:
        self.tasks.append(asyncio.create_task(read_all(client, self.tally, on_frame)))

    async def drained(self) -> dict[str, Any]:
        """Read through the sockets that stopped reading: how each ended."""
        outcomes = collections.Counter(await asyncio.gather(*(drain(c) for c in self.clients)))
        open_ = outcomes.pop("open", 0)
        self.tally.closes.update(outcomes)
        return {"sockets": len(self.clients), "open_at_end": open_}

    async def close(self) -> None:
        self.tally.stopping = True
        await asyncio.gather(*(client.close() for client in self.clients))
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


class Bystander(Role):
    """Heartbeat round trips of BYSTANDERS normal users in a quiet room."""

    async def setup(self) -> None:
        uids = [f"bystander-{i}" for i in range(BYSTANDERS)]
        self.clients = list(
            await asyncio.gather(
                *(ChatSocket.join(self.url, QUIET_ROOM, uid, **CONNECT_OPTIONS) for uid in uids)
            )
        )
        self.pending = [collections.deque() for _ in self.clients]
        self.rtts_ms: list[float] = []
        for client, pending in zip(self.clients, self.pending, strict=True):
            self.read(client, lambda frame, pending=pending: self.acked(frame, pending))

    def acked(self, frame: dict, pending: collections.deque) -> None:
        # Frames to one socket arrive in order: each ack answers the oldest heartbeat waiting.
        if frame.get("type") == "heartbeat_ack" and pending:
            self.rtts_ms.append((time.monotonic() - pending.popleft()) * 1000)

    async def run(self, start_at: float, end: float) -> None:
        async def beat(index: int) -> None:
            client, pending = self.clients[index], self.pending[index]

            async def one(n: int) -> None:
                pending.append(time.monotonic())
                self.tally.sent += 1
                with contextlib.suppress(ConnectionClosed, TimeoutError):
                    await client.send(heartbeat_probe())

            first = start_at + index * BYSTANDER_INTERVAL / BYSTANDERS
            await paced(first, end, 1 / BYSTANDER_INTERVAL, one)

        await asyncio.gather(*(beat(index) for index in range(len(self.clients))))

    async def finish(self) -> dict[str, Any]:
        deadline = time.monotonic() + 5
        while any(self.pending) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        rtts = sorted(self.rtts_ms)
        return {
            "answered": len(rtts),
            "unanswered": sum(len(pending) for pending in self.pending),
            "p50_ms": percentile(rtts, 0.5),
            "p99_ms": percentile(rtts, 0.99),
            "max_ms": rtts[-1] if rtts else 0.0,
        }


class NonReading(Role):
    """(a) NON_READERS sockets in the busy room that stop reading; the room's own traffic
    (the generator's step) is the attack."""

    async def setup(self) -> None:
        opened = await asyncio.gather(
            *(
                non_reader(self.url, BUSY_ROOM, f"hostile-nonreader-{i}", self.tally)
                for i in range(NON_READERS)
            )
        )
        self.clients = [client for client in opened if client is not None]

    async def finish(self) -> dict[str, Any]:
        return await self.drained()


class HistoryFlood(Role):
    """(b) `history` requests for the largest page, on sockets that do not read, in a room
    whose last messages are as long as messages get."""

    async def setup(self) -> None:
        await asyncio.gather(
            *(self.write_archive(f"archivist-{i}") for i in range(ARCHIVE_WRITERS))
        )
        opened = await asyncio.gather(
            *(
                non_reader(self.url, ARCHIVE_ROOM, f"hostile-historian-{i}", self.tally)
                for i in range(HISTORY_SOCKETS)
            )
        )
        self.clients = [client for client in opened if client is not None]

    async def write_archive(self, uid: str) -> None:
        client = await ChatSocket.join(self.url, ARCHIVE_ROOM, uid, **CONNECT_OPTIONS)
        try:
            text = json.dumps({"type": "message", "content": LONGEST_MESSAGE}, ensure_ascii=False)
            for _ in range(ARCHIVE_EACH):
                await client.send_raw(text)
            echoes = 0
            while echoes < ARCHIVE_EACH:
                frame = await client.recv_type("message", timeout=JOIN_TIMEOUT)
                echoes += frame.get("user_id") == uid
        finally:
            await client.close()

    async def run(self, start_at: float, end: float) -> None:
        request = json.dumps({"type": "history", "limit": HISTORY_MAX_LIMIT})

        async def ask(n: int) -> None:
            if not self.clients:
                return
            self.tally.sent += 1
            try:
                await self.clients[n % len(self.clients)].send_raw(request)
            except (ConnectionClosed, TimeoutError):
                self.tally.counts["send_failed"] += 1

        await paced(start_at, end, HISTORY_RATE, ask)

    async def finish(self) -> dict[str, Any]:
        return await self.drained()


class ReconnectLoop(Role):
    """(c) One user joins the quiet room and leaves at once, again and again."""

    async def run(self, start_at: float, end: float) -> None:
        async def cycle(n: int) -> None:
            self.tally.sent += 1
            client = await open_joined(
                self.url, f"/api/v1/ws/{QUIET_ROOM}", "hostile-reconnector", self.tally
            )
            if client is not None:
                self.tally.counts["joined"] += 1
                await client.close()

        await paced(start_at, end, RECONNECT_RATE, cycle)


class FrameFlood(Role):
    """(d) Frames the server refuses before its rate limit, and padded heartbeats, from one
    socket; a socket the server closes is replaced (at most one attempt a second)."""

    FRAMES = (
        json.dumps({"type": "message", "content": "x" * BIG_FRAME}),  # over the size limit
        '{"type": "message", "content": "' + "x" * BIG_FRAME,  # not JSON (unterminated)
        json.dumps({"type": "heartbeat", "client_timestamp": "x" * PADDED_HEARTBEAT}),
    )
    UID = "hostile-framer"

    async def setup(self) -> None:
        await self.reopen()

    async def reopen(self) -> None:
        self.reopened_at = time.monotonic()
        self.tally.counts["sockets_opened"] += 1
        client = await open_joined(self.url, f"/api/v1/ws/{QUIET_ROOM}", self.UID, self.tally)
        self.client = client
        if client is not None:
            self.clients.append(client)
            self.read(client)

    async def run(self, start_at: float, end: float) -> None:
        async def send(n: int) -> None:
            client = self.client
            if client is None or client.connection.close_code is not None:
                if time.monotonic() - self.reopened_at >= 1:
                    await self.reopen()
                return
            self.tally.sent += 1
            with contextlib.suppress(ConnectionClosed, TimeoutError):
                await client.send_raw(self.FRAMES[n % len(self.FRAMES)])

        await paced(start_at, end, FRAME_RATE, send)


def week_of_minutes() -> list[dict[str, Any]]:
    """A week of minute counts: asleep (0) from 23:00 to 07:00, active otherwise."""
    start = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
    points = []
    for minute in range(WEEK_OF_MINUTES):
        moment = start + timedelta(minutes=minute)
        asleep = moment.hour >= 23 or moment.hour < 7
        points.append({"timestamp": moment.isoformat(), "value": 0.0 if asleep else 250.0})
    return points


class AnalysisFlood(Role):
    """(e) ANALYSTS users, each asking for ANALYSIS_BURST analyses of a week of minute data at
    once every ANALYSIS_INTERVAL s on the health-analysis socket, all users together, without
    waiting for the answers."""

    async def setup(self) -> None:
        self.request = json.dumps(
            {"type": "health_data", "data": {"data_points": week_of_minutes()}}
        )
        opened = await asyncio.gather(
            *(
                open_joined(
                    self.url,
                    f"/api/v1/ws/health-analysis/{uid}",
                    uid,
                    self.tally,
                    join=HEALTH_JOIN,
                )
                for uid in (f"hostile-analyst-{i}" for i in range(ANALYSTS))
            )
        )
        self.clients = [client for client in opened if client is not None]
        for client in self.clients:
            self.read(client, self.progress)
        await self.warm_up()

    async def warm_up(self) -> None:
        """One analysis before the attack, as the busy room is warmed up: the worker starts
        its analysis processes on the first one (a fixed ~90 MB per CHAT_ANALYSIS_PROCESSES,
        not growth), so the attack's RSS is measured from a worker that has them."""
        if not self.clients:
            return
        await self.clients[0].send_raw(self.request)
        deadline = time.monotonic() + 60
        while sum(self.tally.counts.values()) == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        self.tally.counts.clear()

    def progress(self, frame: dict) -> None:
        if frame.get("type") == "analysis_update" and frame.get("status") in {
            "completed",
            "failed",
        }:
            self.tally.counts[f"analyses_{frame['status']}"] += 1

    async def run(self, start_at: float, end: float) -> None:
        async def ask(client: ChatSocket) -> None:
            for _ in range(ANALYSIS_BURST):
                self.tally.sent += 1
                with contextlib.suppress(ConnectionClosed, TimeoutError):
                    await client.send_raw(self.request)

        async def burst(n: int) -> None:
            await asyncio.gather(*(ask(client) for client in self.clients))

        await paced(start_at, end, 1 / ANALYSIS_INTERVAL, burst)


class SlowHandshakes(Role):
    """(f) WebSocket handshakes sent one header line every SLOW_LINE_EVERY s: how many the
    server still holds when the attack ends."""

    async def run(self, start_at: float, end: float) -> None:
        address = urlsplit(self.url)
        self.closed_after: list[float] = []
        self.writers: list[asyncio.StreamWriter] = []

        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            opened = time.monotonic()
            lines = 0
            while True:
                try:
                    data = await asyncio.wait_for(reader.read(65536), SLOW_LINE_EVERY)
                except TimeoutError:
                    lines += 1
                    writer.write(f"X-Slow-{lines}: {lines}\r\n".encode())
                    continue
                except OSError:
                    data = b""
                if not data:
                    self.closed_after.append(time.monotonic() - opened)
                    return

        async def start(n: int) -> None:
            self.tally.sent += 1
            try:
                reader, writer = await asyncio.open_connection(address.hostname, address.port)
            except OSError as exc:
                self.tally.refusals[f"connect {type(exc).__name__}"] += 1
                return
            writer.write(
                f"GET /api/v1/ws/{QUIET_ROOM} HTTP/1.1\r\nHost: {address.netloc}\r\n".encode()
            )
            self.writers.append(writer)
            self.tasks.append(asyncio.create_task(hold(reader, writer)))

        await paced(start_at, end, SLOW_OPEN_RATE, start, limit=SLOW_HANDSHAKES)
        await sleep_until(end)
        self.open_at_end = len(self.writers) - len(self.closed_after)

    async def finish(self) -> dict[str, Any]:
        closed = sorted(self.closed_after)
        return {
            "open_at_end": self.open_at_end,
            "closed_after_p50_s": round(percentile(closed, 0.5), 1),
            "closed_after_max_s": round(closed[-1], 1) if closed else None,
        }

    async def close(self) -> None:
        for writer in getattr(self, "writers", []):
            writer.close()
        await super().close()


ROLES: dict[str, type[Role]] = {
    "bystander": Bystander,
    "none": Role,
    "non-reading": NonReading,
    "history": HistoryFlood,
    "reconnect": ReconnectLoop,
    "frames": FrameFlood,
    "analysis": AnalysisFlood,
    "slow-handshake": SlowHandshakes,
}


class HostileClients:
    """One process's role, driven by the coordinator's commands."""

    def __init__(self) -> None:
        self.role: Role | None = None
        self.task: asyncio.Task | None = None

    async def handle(self, command: dict) -> dict:
        op = command["op"]
        if op == "setup":
            await self.close_all()
            self.role = ROLES[command["role"]](command["url"])
            await self.role.setup()
            return {"ok": True}
        assert self.role is not None, "setup first"
        if op == "start":
            end = command["start_at"] + command["duration"]
            self.task = asyncio.create_task(self.role.run(command["start_at"], end))
            return {"ok": True}
        if op == "collect":
            if self.task is not None:
                await self.task
            figures = await self.role.finish()  # first: it counts how drained sockets ended
            return self.role.tally.to_json() | figures
        if op == "close":
            return await self.close_all()
        raise ValueError(f"unknown op {op!r}")

    async def close_all(self) -> dict:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None
        if self.role is not None:
            await self.role.close()
            self.role = None
        return {"ok": True}


def main(pipe: Any, index: int, processes: int, counters: Any) -> None:
    """Entry point of a hostile-client process (`bench.fleet.Fleet(2, target=main)`)."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(pipe, HostileClients()))
