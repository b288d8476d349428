"""Faults, each a test (issue 5): real daphne workers of this project (tests/servers.py) on a
PRIVATE Redis that the tests start, stop and restart themselves, so the machine's Redis on
6379 (which other suites share) is never disturbed.

1. Redis restarted mid-chat: clients on both workers keep chatting while Redis is killed,
   kept down, and started again on the same port (empty: no persistence). No worker exits,
   no socket is closed with 1011, nobody is wrongly reaped (every liveness key vanished with
   Redis), the room's group memberships come back on both workers, and cross-worker chat
   works again within seconds; the recovery time is measured and printed. Sockets that
   leave during the outage still end their sessions; sockets that try to join are told
   SERVICE_UNAVAILABLE and closed 4013 (never 1011, never a bare HTTP 500). Likewise when
   Redis stalls (SIGSTOP) for longer than the liveness TTL but keeps its data, and when
   Redis restarts under workers that hold no socket (the next sockets join at once); a
   socket that leaves while typing during the outage still ends its session.
2. No acknowledged message is missing from history: every chat message its sender saw
   broadcast back, before, during and after the Redis restart, and around a SIGTERM of one
   worker, is in the room's history afterwards (paged over a fresh socket, and in the DB).
3. Churn: hundreds of connect/disconnect cycles across two workers (clean closes, abrupt TCP
   resets, sockets dropped before their join frames): afterwards no open session, empty
   presence, no new Redis keys and no leftover channel-layer subscriptions.

Every test runs against SQLite and, when 127.0.0.1:5432 answers, PostgreSQL (the ones that do
not depend on the database, on SQLite only), on one pair of workers per database (the SIGTERM
test starts its own). Workers run with CHAT_WORKER_TTL=2 and
CHAT_REAP_INTERVAL=1, each pair under its own REDIS_PREFIX; each test uses its own rooms and
users and ends with their sessions closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.servers import HOST, ChatSocket, Worker, WorkerPair, free_ports, run_workers, token_for
from tests.test_distributed import (
    Database,
    eventually,
    fresh_database,
    http_get,
    presence_of,
)

REDIS_SERVER = shutil.which("redis-server")
WORKER_TTL = 2
REAP_INTERVAL = 1
OUTAGE = 2.5  # seconds Redis stays down
RECOVERY_LIMIT = 10.0  # seconds from Redis answering again to cross-worker chat, at most
ALLOWED_CLOSES = {4012, 4013}  # server restart / backing service unavailable (protocol §10)
# After a cache fault, how long a wrongly reaped user would take to show (a reaper's first
# look, or the end of the cache epoch's warmup, plus a reaper interval to spare).
REAPER_WINDOW = WORKER_TTL + 2 * REAP_INTERVAL + 0.5

pytestmark = pytest.mark.skipif(
    REDIS_SERVER is None, reason="redis-server is not installed (these tests start their own)"
)


# --- a private Redis ------------------------------------------------------------------------


class PrivateRedis:
    """One redis-server on a free loopback port, without persistence: a restart empties it."""

    def __init__(self, directory: Path):
        self.port = free_ports(1)[0]
        self.url = f"redis://{HOST}:{self.port}/0"
        self.log_path = directory / "redis.log"
        self.process: subprocess.Popen | None = None
        self.paused = False

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self) -> redis.Redis:
        return redis.Redis(host=HOST, port=self.port, socket_timeout=5, socket_connect_timeout=1)

    def start(self, timeout: float = 10.0) -> float:
        """Start it (same port every time) and wait until it answers PING; returns the
        monotonic time of the first answer."""
        assert not self.running()
        self.process = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                HOST,
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--logfile",
                str(self.log_path),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        with contextlib.closing(self.client()) as client:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"redis-server exited: {self.log_path.read_text()[-2000:]}")
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                    if client.ping():
                        return time.monotonic()
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"redis-server not answering on {self.port}")
                time.sleep(0.005)

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.running():
            self.resume()
            self.process.send_signal(sig)
            self.process.wait(10)

    def pause(self) -> None:
        """SIGSTOP: connections stay open, nothing is answered (a stalled server)."""
        self.process.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.paused:
            self.process.send_signal(signal.SIGCONT)
            self.paused = False


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop(signal.SIGTERM)


# --- a cluster: two workers on the private Redis -----------------------------------------------


@dataclass
class Cluster(WorkerPair):
    backend: str
    db: Database
    prefix: str
    workers: list[Worker]
    redis: PrivateRedis

    def redis_keys(self) -> list[str]:
        """This run's Redis keys."""
        with contextlib.closing(self.redis.client()) as client:
            return sorted(k.decode() for k in client.scan_iter(match=f"{self.prefix}*", count=1000))

    def subscriptions(self) -> list[str]:
        """Channel-layer pub/sub channels with at least one subscriber (pubsub layer)."""
        with contextlib.closing(self.redis.client()) as client:
            return sorted(c.decode() for c in client.pubsub_channels(f"{self.prefix}*"))


@contextlib.contextmanager
def start_cluster(directory: Path, backend: str, server: PrivateRedis) -> Iterator[Cluster]:
    prefix = f"faults-{uuid.uuid4().hex}"
    with fresh_database(backend, directory) as db:
        env = {
            "REDIS_URL": server.url,
            "REDIS_PREFIX": prefix,
            "DATABASE_URL": db.url,
            "CHAT_WORKER_TTL": str(WORKER_TTL),
            "CHAT_REAP_INTERVAL": str(REAP_INTERVAL),
            "CHAT_MESSAGE_RATE_LIMIT": "1000",  # the chatter below is not rate-limited
            "LOG_LEVEL": "WARNING",
            "ASSISTANT_MODE": "off",
        }
        try:
            with run_workers(directory, count=2, env=env) as workers:
                cluster = Cluster(backend, db, prefix, workers, server)
                try:
                    yield cluster
                finally:
                    print(cluster.logs())
        finally:
            if server.running():
                with contextlib.closing(server.client()) as client:
                    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
                    if keys:
                        client.delete(*keys)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def shared_cluster(
    backend: str, private_redis: PrivateRedis, tmp_path_factory
) -> Iterator[Cluster]:
    started = time.monotonic()
    directory = tmp_path_factory.mktemp(f"faults-{backend}")
    with start_cluster(directory, backend, private_redis) as running:
        print(f"[{backend}] two workers ready in {time.monotonic() - started:.2f} s")
        yield running


@pytest.fixture
def cluster(shared_cluster: Cluster, private_redis: PrivateRedis) -> Iterator[Cluster]:
    """The module's two workers (per database) for one test. At teardown: Redis answering
    again (whatever the test did to it), the workers' logs printed (pytest shows them for a
    failed test), both workers alive."""
    try:
        yield shared_cluster
    finally:
        private_redis.resume()
        if not private_redis.running():
            private_redis.start()
        print(shared_cluster.logs())
    shared_cluster.assert_alive()


@pytest.fixture
def own_cluster(backend: str, private_redis: PrivateRedis, tmp_path: Path) -> Iterator[Cluster]:
    """Two workers of the test's own (it stops one)."""
    with start_cluster(tmp_path, backend, private_redis) as running:
        yield running


# --- clients that read all the time -------------------------------------------------------------


@dataclass
class Peer:
    """A socket whose frames are read, with their arrival times, by a task of its own."""

    name: str
    uid: str
    worker: Worker
    socket: ChatSocket
    frames: list[tuple[float, dict]] = field(default_factory=list)
    close_code: int | None = None  # -1: the connection ended without a close frame
    sent: dict[str, float] = field(default_factory=dict)  # client message id -> send time
    reader: asyncio.Task | None = None

    @classmethod
    async def join(cls, worker: Worker, room: str, uid: str, name: str) -> Peer:
        peer = cls(name, uid, worker, await ChatSocket.join(worker.url, room, uid, name))
        peer.reader = asyncio.create_task(peer._read())
        return peer

    async def _read(self) -> None:
        try:
            while True:
                text = await self.socket.connection.recv()
                self.frames.append((time.monotonic(), json.loads(text)))
        except ConnectionClosed as closed:
            self.close_code = closed.rcvd.code if closed.rcvd is not None else -1

    @property
    def open(self) -> bool:
        return self.close_code is None

    def of_type(self, type_: str) -> list[dict]:
        return [f for _, f in self.frames if f["type"] == type_]

    def acknowledged(self) -> dict[str, str]:
        """Client message id -> stored message id, for this peer's own messages it saw
        broadcast back (stored, then sent to the room)."""
        return {
            f["client_message_id"]: f["message_id"]
            for f in self.of_type("message")
            if f["user_id"] == self.uid and f["client_message_id"] in self.sent
        }

    async def send_message(self, cid: str) -> bool:
        self.sent[cid] = time.monotonic()
        try:
            await self.socket.send(
                {"type": "message", "content": f"{self.name}: {cid}", "message_id": cid}
            )
        except (ConnectionClosed, TimeoutError):
            return False
        return True

    async def close(self) -> None:
        await self.socket.close()
        if self.reader is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.reader, 5)


async def chatter(peer: Peer, phase: str, stop: asyncio.Event, every: float = 0.15) -> None:
    """One message every `every` seconds until `stop` (or until the socket closes)."""
    n = 0
    while not stop.is_set() and peer.open:
        if not await peer.send_message(f"{phase}-{n}"):
            return
        n += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


async def until(check, timeout: float, what: str, step: float = 0.01) -> float:
    """Poll a cheap in-loop `check` until truthy; returns the monotonic time it became so."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(step)
    return time.monotonic()


async def room_history(worker: Worker, room: str, uid: str) -> list[dict]:
    """Every stored message of the room, oldest first, paged over a fresh socket."""
    client = await ChatSocket.join(worker.url, room, uid, "Auditor")
    try:
        page = client.history
        messages = list(page["messages"])
        while page["has_more"]:
            await client.send(
                {"type": "history", "before": int(messages[0]["message_id"]), "limit": 100}
            )
            page = await client.recv_type("history", 5)
            messages = page["messages"] + messages
        return messages
    finally:
        await client.close()


def stored_ids(db: Database, room: str) -> set[str]:
    rows = db.rows("SELECT id FROM chat_chatmessage WHERE room_id = %s", room)
    return {str(pk) for (pk,) in rows}


async def all_sessions_closed(db: Database, timeout: float = 15) -> None:
    await eventually(lambda: not db.open_sessions(), timeout=timeout, what="all sessions closed")


async def connect_during_outage(worker: Worker, room: str, uid: str) -> str:
    """How a new socket fares while Redis is down: "HTTP <status>" when the handshake is
    refused, the close code when the server closes it, "open" if it were accepted."""
    try:
        client = await ChatSocket.open(worker.url, f"/api/v1/ws/{room}", token=token_for(uid))
    except InvalidStatus as refused:
        return f"HTTP {refused.response.status_code}"
    try:
        while True:
            await client.recv(5)
    except ConnectionClosed as closed:
        return str(closed.rcvd.code if closed.rcvd is not None else "no close frame")
    except TimeoutError:
        return "open"
    finally:
        await client.close()


# --- a room chatting across both workers -------------------------------------------------------


class Room:
    """Four users, two per worker, chatting in one room (a message every 0.15 s each)."""

    def __init__(self, cluster: Cluster, base: str):
        self.cluster = cluster
        self.tag = uuid.uuid4().hex[:8]
        self.name = f"{base}-{self.tag}"
        self.peers: list[Peer] = []
        self.others: list[Peer] = []  # more sockets in the room (closed by `close`)
        self.stop = asyncio.Event()
        self.senders: list[asyncio.Task] = []

    async def join(self) -> None:
        a, b = self.cluster.a, self.cluster.b
        for name, worker in (("Alice", a), ("Bob", b), ("Carol", a), ("Dave", b)):
            self.peers.append(await Peer.join(worker, self.name, self.uid(name), name))

    def uid(self, name: str) -> str:
        return f"{name.lower()}-{self.tag}"

    async def join_other(self, worker: Worker, name: str) -> Peer:
        peer = await Peer.join(worker, self.name, self.uid(name), name)
        self.others.append(peer)
        return peer

    async def settled(self) -> set[str]:
        """Until everyone's join notices have arrived (none is mistaken for a reaper's
        later); the open sessions of the four."""
        everyone = len(self.peers) + len(self.others)
        await until(
            lambda: len(self.peers[0].of_type("user_joined")) == everyone - 1, 5, "join notices"
        )
        return {p.socket.ack["session_id"] for p in self.peers}

    def start_chatter(self) -> None:
        self.senders = [asyncio.create_task(chatter(p, "chat", self.stop)) for p in self.peers]

    async def stop_chatter(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.senders)

    def on(self, worker: Worker) -> set[str]:
        return {p.uid for p in self.peers if p.worker is worker}

    def first_cross(self, to: Worker, since: float) -> float | None:
        """When a message sent at `since` or later first reached a socket on `to` from a
        sender on the other worker."""
        sender = {p.uid: p for p in self.peers}
        return min(
            (
                at
                for p in self.peers
                if p.worker is to
                for at, f in p.frames
                if f["type"] == "message"
                and f["user_id"] in sender
                and sender[f["user_id"]].worker is not to
                and sender[f["user_id"]].sent.get(f["client_message_id"], 0) >= since
            ),
            default=None,
        )

    async def recovery(self, since: float) -> tuple[float, float]:
        """Seconds from `since` until chat crossed again A -> B and B -> A."""
        a, b = self.cluster.a, self.cluster.b
        await until(
            lambda: self.first_cross(b, since) and self.first_cross(a, since),
            RECOVERY_LIMIT,
            "cross-worker chat again",
        )
        return self.first_cross(b, since) - since, self.first_cross(a, since) - since

    async def everyone_gets_everyone(self, cid: str) -> None:
        """One more message from each of the four; each socket (both workers) gets all four:
        the room's group memberships work on both workers."""
        for p in self.peers:
            assert await p.send_message(cid)
        expected = {p.uid for p in self.peers}

        def got_all(p: Peer) -> bool:
            return {
                f["user_id"] for f in p.of_type("message") if f["client_message_id"] == cid
            } == (expected)

        await until(lambda: all(got_all(p) for p in self.peers), 5, f"{cid} everywhere")

    def errors(self) -> list[str]:
        return [f["error_code"] for p in self.peers for f in p.of_type("error")]

    def acknowledged(self) -> dict[tuple[str, str], str]:
        return {(p.uid, cid): mid for p in self.peers for cid, mid in p.acknowledged().items()}

    def sent(self) -> int:
        return sum(len(p.sent) for p in self.peers)

    async def assert_nobody_reaped(self, sessions: set[str], gone: set[str] = frozenset()):
        """No live user shown as left, no session ended as `worker_lost`, the four's sessions
        open, and presence (over HTTP, from both workers) exactly the four."""
        db = self.cluster.db
        left = {f["user_id"] for p in self.peers for f in p.of_type("user_left")}
        assert left <= gone, f"live users shown as left: {left - gone}"
        rows = await asyncio.to_thread(
            db.rows,
            "SELECT session_id, user_id, disconnected_at, close_reason FROM chat_chatsession "
            "WHERE room_id = %s",
            self.name,
        )
        assert not [r for r in rows if r[3] == "worker_lost"], rows
        open_ids = {str(uuid.UUID(str(r[0]))) for r in rows if r[2] is None}
        assert sessions <= open_ids, rows
        assert {r[1] for r in rows if r[2] is None} == {p.uid for p in self.peers}, rows
        token = token_for(self.peers[0].uid)
        for worker in self.cluster.workers:
            url = f"{worker.http_url}/api/v1/ws/chat/users/{self.name}"
            users = presence_of((await http_get(url, token=token)).json())
            assert sorted(users) == sorted((p.uid, 1) for p in self.peers), users

    async def assert_acknowledged_in_history(self) -> int:
        """Every message a sender saw broadcast back is in the room's history: paged over a
        fresh socket, and in the database. Returns how many."""
        acked = set(self.acknowledged().values())
        assert acked, "nothing was acknowledged"
        history = await room_history(self.cluster.b, self.name, self.uid("Auditor"))
        missing = acked - {m["message_id"] for m in history}
        assert not missing, f"acknowledged but not in history: {sorted(missing)}"
        assert acked <= await asyncio.to_thread(stored_ids, self.cluster.db, self.name)
        return len(acked)

    def assert_delivered_outside(self, fault_from: float, fault_to: float) -> None:
        """What was acknowledged well before the fault or after recovery reached every
        socket, and nobody got a message twice."""
        for p in self.peers:
            seen = [f["message_id"] for f in p.of_type("message")]
            assert len(seen) == len(set(seen)), f"{p.name} got a message twice"
            for (uid, cid), mid in self.acknowledged().items():
                at = next(s for s in self.peers if s.uid == uid).sent[cid]
                if at < fault_from - 0.5 or at > fault_to + 0.5:
                    assert mid in seen, (p.name, uid, cid)

    async def close(self) -> None:
        await asyncio.gather(*(p.close() for p in [*self.peers, *self.others]))
        await eventually(
            lambda: (
                not self.cluster.db.rows(
                    "SELECT 1 FROM chat_chatsession WHERE room_id = %s AND disconnected_at IS NULL",
                    self.name,
                )
            ),
            timeout=15,
            what=f"{self.name}: all sessions closed",
        )


# --- 1 + 2. Redis restarted mid-chat ----------------------------------------------------------


async def test_redis_restart_mid_chat(cluster: Cluster, capsys):
    """Redis killed (SIGKILL) and started again empty on the same port while both workers'
    clients chat. Two more users leave during the outage (a clean close, a TCP reset) and
    two try to connect (one per worker)."""
    a, b = cluster.a, cluster.b
    room = Room(cluster, "restart")
    await room.join()
    erin = await room.join_other(a, "Erin")
    frank = await room.join_other(b, "Frank")
    try:
        sessions = await room.settled()
        room.start_chatter()
        await asyncio.sleep(1.0)
        assert all(p.acknowledged() for p in room.peers), "no chat before the fault"

        killed_at = time.monotonic()
        cluster.redis.stop(signal.SIGKILL)
        await asyncio.sleep(0.3)
        # Leaving during the outage: the sessions still end (not open for good, a ghost).
        await erin.close()
        reset_connection(frank.socket)
        # Connecting during the outage: accepted, told SERVICE_UNAVAILABLE and closed 4013
        # (retry later); not a bare HTTP 500 at the handshake, never a 1011.
        refusals = [
            await connect_during_outage(w, room.name, room.uid(f"late{w.index}")) for w in (a, b)
        ]
        await asyncio.sleep(max(0.0, killed_at + OUTAGE - time.monotonic()))  # chat goes on
        up_at = cluster.redis.start()
        a_to_b, b_to_a = await room.recovery(since=up_at)
        recovery = max(a_to_b, b_to_a)

        # Chat on past the time a wrong reaper would strike (every liveness key was lost with
        # Redis): at a reaper's first look, or when the new cache epoch's warmup ends.
        await asyncio.sleep(max(0.0, up_at + REAPER_WINDOW - time.monotonic()))
        await room.stop_chatter()
        await room.everyone_gets_everyone("final")
        await asyncio.sleep(0.3)  # anything late (a wrong user_left) would show now

        errors = room.errors()
        with capsys.disabled():
            print(
                f"\n[{cluster.backend}] Redis restart: down {up_at - killed_at:.2f} s; "
                f"recovery (Redis answering -> first cross-worker message) {recovery:.2f} s "
                f"(A->B {a_to_b:.2f} s, B->A {b_to_a:.2f} s); {room.sent()} messages sent, "
                f"{len(room.acknowledged())} acknowledged, {len(errors)} error frames "
                f"{sorted(set(errors))}; connects during the outage: {refusals}"
            )

        # 1. No worker exited, no socket closed (any close would have to be 4012/4013).
        cluster.assert_alive()
        closes = {p.name: p.close_code for p in room.peers if not p.open}
        assert set(closes.values()) <= ALLOWED_CLOSES, closes
        assert not closes, f"sockets closed during the outage: {closes}"
        assert refusals == ["4013", "4013"], refusals
        # Frames refused during the outage got typed errors.
        assert set(errors) <= {"SERVICE_UNAVAILABLE"}, errors
        assert recovery <= RECOVERY_LIMIT
        # Nobody was reaped; those who left during the outage are gone, no late joiner is in.
        await room.assert_nobody_reaped(sessions, gone={erin.uid, frank.uid})
        assert len([k for k in cluster.redis_keys() if ":worker:" in k]) == 2, cluster.redis_keys()

        # 2. Every acknowledged message is in history.
        await room.assert_acknowledged_in_history()
        room.assert_delivered_outside(killed_at, up_at + recovery)
    finally:
        if not cluster.redis.running():
            cluster.redis.start()
        await room.close()


# --- 1a. idle workers across a Redis restart ---------------------------------------------------


async def test_idle_workers_take_sockets_right_after_a_redis_restart(cluster: Cluster, capsys):
    """No socket on either worker (so nothing reads their channel-layer connections) while
    Redis restarts: the next sockets, right after, join normally (no 1011, no 500) and chat
    across the workers. (Once, on SQLite: independent of the database.)"""
    if cluster.backend != "sqlite":
        pytest.skip("independent of the database: run once, on SQLite")
    tag = uuid.uuid4().hex[:8]
    for worker in cluster.workers:  # each worker's layer has connected to Redis
        await (
            await ChatSocket.join(worker.url, f"warm-{tag}", f"warm{worker.index}-{tag}")
        ).close()
    await all_sessions_closed(cluster.db)  # and now holds no socket, no subscription
    cluster.redis.stop(signal.SIGKILL)
    up_at = cluster.redis.start()
    room = Room(cluster, "idle")
    try:
        await room.join()
        await room.settled()
        joined = time.monotonic() - up_at
        await room.everyone_gets_everyone("hello")
        with capsys.disabled():
            print(
                f"\n[{cluster.backend}] idle workers, Redis restarted: four sockets joined "
                f"{joined:.2f} s and chatted across {time.monotonic() - up_at:.2f} s after Redis "
                f"answered; errors {room.errors()}"
            )
        assert room.errors() == []
    finally:
        await room.close()


# --- 1b. Redis stalled longer than the liveness TTL --------------------------------------------

STALL = WORKER_TTL + 1.0


async def test_redis_stall_longer_than_the_liveness_ttl(cluster: Cluster, capsys):
    """Redis stops answering (SIGSTOP) for longer than CHAT_WORKER_TTL but keeps its data:
    every liveness key expires on Redis's clock meanwhile while the cache epoch survives, so
    only a worker that knows its cache calls stalled can tell. Nobody may be reaped; chat
    resumes on both workers; nothing acknowledged is lost. (Once, on SQLite: the reaper's
    judgement does not depend on the database.)"""
    if cluster.backend != "sqlite":
        pytest.skip("independent of the database: run once, on SQLite")
    room = Room(cluster, "stall")
    await room.join()
    try:
        sessions = await room.settled()
        room.start_chatter()
        await asyncio.sleep(0.6)
        stalled_at = time.monotonic()
        cluster.redis.pause()
        await asyncio.sleep(STALL)
        cluster.redis.resume()
        resumed_at = time.monotonic()
        a_to_b, b_to_a = await room.recovery(since=resumed_at)
        await asyncio.sleep(max(0.0, resumed_at + REAPER_WINDOW - time.monotonic()))
        await room.stop_chatter()
        await room.everyone_gets_everyone("final")
        await asyncio.sleep(0.3)

        errors = room.errors()
        with capsys.disabled():
            print(
                f"\n[{cluster.backend}] Redis stalled {resumed_at - stalled_at:.2f} s "
                f"(CHAT_WORKER_TTL={WORKER_TTL}): chat crossed again after "
                f"{max(a_to_b, b_to_a):.2f} s; {room.sent()} sent, "
                f"{len(room.acknowledged())} acknowledged, errors {sorted(set(errors))}"
            )
        cluster.assert_alive()
        assert all(p.open for p in room.peers), [(p.name, p.close_code) for p in room.peers]
        assert set(errors) <= {"SERVICE_UNAVAILABLE"}, errors
        await room.assert_nobody_reaped(sessions)
        await room.assert_acknowledged_in_history()
        room.assert_delivered_outside(stalled_at, resumed_at + max(a_to_b, b_to_a))
    finally:
        if cluster.redis.paused:
            cluster.redis.resume()
        await room.close()


# --- 1c. leaving while typing, during an outage ------------------------------------------------


async def test_leaving_while_typing_during_an_outage_ends_the_session(cluster: Cluster):
    if cluster.backend != "sqlite":
        pytest.skip("independent of the database: run once, on SQLite")
    room = Room(cluster, "typing")
    gina = await room.join_other(cluster.a, "Gina")
    try:
        await gina.socket.send({"type": "typing", "is_typing": True})
        await until(lambda: gina.of_type("typing"), 3, "Gina's typing notice")
        cluster.redis.stop(signal.SIGKILL)
        await gina.close()
        await asyncio.sleep(0.3)
        cluster.redis.start()
        await eventually(
            lambda: cluster.db.session(gina.socket.ack["session_id"])["disconnected_at"],
            timeout=3,
            what="Gina's session ended",
        )
    finally:
        if not cluster.redis.running():
            cluster.redis.start()
        # Bury the ghost, so the next tests start without an open session.
        await asyncio.to_thread(
            cluster.db.execute,
            "UPDATE chat_chatsession SET disconnected_at = CURRENT_TIMESTAMP "
            "WHERE room_id = %s AND disconnected_at IS NULL",
            room.name,
        )
        await room.close()


# --- 2. around a SIGTERM of one worker --------------------------------------------------------


async def test_sigterm_no_acknowledged_message_lost(own_cluster: Cluster, capsys):
    """Chat on both workers while A stops gracefully: A's sockets close with 4012 (nothing
    else), their users reconnect to B and chat on; every message a sender saw broadcast
    back, before, during and after the stop, is in history afterwards."""
    cluster = own_cluster
    a, b, db = cluster.a, cluster.b, cluster.db
    tag = uuid.uuid4().hex[:8]
    room = f"term-{tag}"
    cast = [("Alice", a), ("Bob", b), ("Carol", a), ("Dave", b)]
    peers = [await Peer.join(w, room, f"{n.lower()}-{tag}", n) for n, w in cast]
    everyone = list(peers)  # and the reconnected sockets below
    try:
        stop = asyncio.Event()

        async def chat_and_reconnect(peer: Peer) -> None:
            """Chat; when A closes the socket, reconnect to B (as a client would) and go on."""
            generation = 0
            while True:
                await chatter(peer, f"g{generation}", stop)
                if stop.is_set():
                    return
                await until(lambda p=peer: not p.open, 5, f"{peer.name} closed")
                assert peer.close_code == 4012, (peer.name, peer.close_code)
                generation += 1
                peer = await Peer.join(b, room, peer.uid, peer.name)
                everyone.append(peer)

        senders = [asyncio.create_task(chat_and_reconnect(p)) for p in peers]
        await asyncio.sleep(1.0)
        stopped_at = time.monotonic()
        a.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(a.reap, 15) == 0, a.logs()
        exited = time.monotonic() - stopped_at
        await asyncio.sleep(1.0)  # chat on B after the stop
        stop.set()
        await asyncio.gather(*senders)

        for peer in peers:
            if peer.worker is a:
                assert peer.close_code == 4012, (peer.name, peer.close_code)
                assert [f["error_code"] for f in peer.of_type("error")] == ["SERVICE_UNAVAILABLE"]
        for peer in everyone:
            if peer.worker is b:
                assert peer.open, (peer.name, peer.close_code)
                assert not peer.of_type("error"), peer.of_type("error")
        assert b.alive(), cluster.logs()

        acked = {(p.uid, cid): mid for p in everyone for cid, mid in p.acknowledged().items()}
        history = await room_history(b, room, f"auditor-{tag}")
        in_history = {m["message_id"] for m in history}
        missing = {key: mid for key, mid in acked.items() if mid not in in_history}
        assert not missing, f"acknowledged but not in history: {missing}"
        assert set(acked.values()) <= await asyncio.to_thread(stored_ids, db, room)
        rows = await asyncio.to_thread(
            db.rows,
            "SELECT close_reason, COUNT(*) FROM chat_chatsession WHERE worker_id LIKE %s "
            "GROUP BY close_reason",
            f"%:{a.pid}:%",
        )
        assert rows == [("shutdown", 2)], rows
        with capsys.disabled():
            print(
                f"\n[{cluster.backend}] SIGTERM: worker A exited in {exited:.2f} s; "
                f"{sum(len(p.sent) for p in everyone)} messages sent, {len(acked)} "
                f"acknowledged, all {len(acked)} in history ({len(history)} stored)"
            )
    finally:
        await asyncio.gather(*(p.close() for p in everyone))
    await all_sessions_closed(db)


# --- 3. churn ---------------------------------------------------------------------------------

CHURN_CYCLES = 300
CHURN_CONCURRENCY = 12
CHURN_ROOMS = 4
READYZ_PROBES = 20  # readiness probes meanwhile (each makes a channel of its own)
FIXED_KEYS = (":worker:", ":workers:")  # a liveness key per worker; the cache epoch


def reset_connection(client: ChatSocket) -> None:
    """Drop the TCP connection at once with a RST (SO_LINGER 0): no close frame, no FIN."""
    transport = client.connection.transport
    sock = transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def churn_cycle(n: int, worker: Worker, room: str, uid: str) -> str:
    """One connect/disconnect, of one of four kinds (by n)."""
    kind = ("clean", "reset", "abort", "early-reset")[n % 4]
    if kind == "early-reset":  # gone before the server has even opened the session
        client = await ChatSocket.open(worker.url, f"/api/v1/ws/{room}", token=token_for(uid))
        reset_connection(client)
        await client.close()
        return kind
    # Unbounded receive queue: a client that does not read (its frames pile up while it
    # churns) must still see the server's close frame (websockets pauses reading at 16).
    client = await ChatSocket.open(
        worker.url, f"/api/v1/ws/{room}", token=token_for(uid, f"Churn{n}"), max_queue=None
    )
    for type_ in ("connection_ack", "presence", "history"):
        await client.expect(type_)
    if n % 3 == 0:
        await client.send({"type": "heartbeat"})  # exempt from the rate limit: no key
        await client.recv_type("heartbeat_ack")
    if kind == "clean":
        started = time.monotonic()
        await client.close()
        took = time.monotonic() - started
        assert client.connection.close_code == 1000, (n, client.connection.close_code, took)
    elif kind == "reset":
        reset_connection(client)
    else:  # abort: the transport just goes away (FIN, or RST if frames were unread)
        client.connection.transport.abort()
    await client.close()
    return kind


async def test_churn_leaves_no_sessions_presence_keys_or_subscriptions(cluster: Cluster, capsys):
    a, b, db = cluster.a, cluster.b, cluster.db
    tag = uuid.uuid4().hex[:8]
    rooms = [f"churn{r}-{tag}" for r in range(CHURN_ROOMS)]
    # One observer per room, alternating workers: the rooms' groups stay alive on both.
    observers = [
        await Peer.join(cluster.workers[r % 2], room, f"obs{r}-{tag}", f"Obs{r}")
        for r, room in enumerate(rooms)
    ]
    try:
        await asyncio.sleep(REAP_INTERVAL + 0.5)  # liveness keys and epoch written
        keys_before = cluster.redis_keys()
        subs_before = cluster.subscriptions()

        slots = asyncio.Semaphore(CHURN_CONCURRENCY)
        kinds: list[str] = []

        async def cycle(n: int) -> None:
            async with slots:
                # Each kind on both workers, in every room.
                worker, room = cluster.workers[(n // 4) % 2], rooms[(n // 8) % CHURN_ROOMS]
                kinds.append(await churn_cycle(n, worker, room, f"churn{n}-{tag}"))

        async def probe(worker: Worker) -> None:  # a channel-layer round trip each
            response = await http_get(f"{worker.http_url}/readyz")
            assert response.status_code == 200, response.text

        started = time.monotonic()
        await asyncio.gather(
            *(cycle(n) for n in range(CHURN_CYCLES)),
            *(probe(cluster.workers[n % 2]) for n in range(READYZ_PROBES)),
        )
        elapsed = time.monotonic() - started

        observer_ids = {o.uid for o in observers}

        def only_observers_open() -> bool:
            return {row[1] for row in db.open_sessions()} == observer_ids

        await eventually(only_observers_open, timeout=15, what="churned sessions closed")
        settled = time.monotonic() - started - elapsed
        in_rooms = f"room_id IN ({', '.join(['%s'] * len(rooms))})"
        total_sessions = db.rows(f"SELECT COUNT(*) FROM chat_chatsession WHERE {in_rooms}", *rooms)[
            0
        ][0]
        reasons = dict(
            db.rows(
                "SELECT close_reason, COUNT(*) FROM chat_chatsession "
                f"WHERE disconnected_at IS NOT NULL AND {in_rooms} GROUP BY close_reason",
                *rooms,
            )
        )
        # Presence (over HTTP, from both workers, asked by the room's member): each room
        # holds just its observer.
        for r, room in enumerate(rooms):
            token = token_for(observers[r].uid)
            for worker in (a, b):
                body = (
                    await http_get(f"{worker.http_url}/api/v1/ws/chat/users/{room}", token=token)
                ).json()
                assert presence_of(body) == [(observers[r].uid, 1)], (room, body)

        # Each observer heard each churned user of its room join and leave, once each.
        def notices(observer: Peer) -> tuple[list[str], list[str]]:
            return (
                sorted(f["user_id"] for f in observer.of_type("user_joined")),
                sorted(f["user_id"] for f in observer.of_type("user_left")),
            )

        await until(
            lambda: all(len(set(j)) == len(j) and j == left for j, left in map(notices, observers)),
            5,
            "a left notice for every joined one",
        )
        heard = sum(len(notices(o)[0]) for o in observers)

        # Redis: no new keys (only the fixed per-worker ones may differ), no leftover
        # channel-layer subscriptions.
        keys_after = cluster.redis_keys()
        grown = sorted(
            set(keys_after)
            - {k for k in keys_before}
            - {k for k in keys_after if any(fixed in k for fixed in FIXED_KEYS)}
        )
        subs_after = cluster.subscriptions()
        with capsys.disabled():
            print(
                f"\n[{cluster.backend}] churn: {CHURN_CYCLES} connect/disconnect cycles "
                f"({', '.join(f'{k} {kinds.count(k)}' for k in sorted(set(kinds)))}) "
                f"and {READYZ_PROBES} /readyz in "
                f"{elapsed:.2f} s ({CHURN_CYCLES / elapsed:.0f}/s); {total_sessions} sessions "
                f"recorded, closed {reasons}; open after {settled:.2f} s: observers only; "
                f"observers heard {heard} users join and leave; "
                f"Redis keys {len(keys_before)} -> {len(keys_after)}, pub/sub channels "
                f"{len(subs_before)} -> {len(subs_after)}"
            )
        assert grown == [], grown
        assert len(keys_after) <= len(keys_before), (keys_before, keys_after)
        assert subs_after == subs_before, set(subs_after) ^ set(subs_before)
        assert "worker_lost" not in reasons
        cluster.assert_alive()
    finally:
        await asyncio.gather(*(o.close() for o in observers))
    await all_sessions_closed(db)
    # With the observers gone too: not one session open, and (with no socket left on either
    # worker) not one channel-layer subscription left in Redis, after all this module's faults.
    assert not db.open_sessions()
    await eventually(lambda: not cluster.subscriptions(), 5, "no subscription left")
