"""Faults, each a test (issue 5): real daphne workers of this project (chat/testing/) on a
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

No test waits for a fixed time. The chat itself is the clock of a scenario: Redis stays down,
or stalled, while each user sends so many messages, and after a fault the chat goes on until
each user has seen so many more of its messages come back; what must not happen (a user
wrongly shown as left) would have arrived before a heartbeat barrier's answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import signal
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from chat.testing.client import ChatSocket, heartbeat_probe, http_request, presence_of, token_for
from chat.testing.cluster import Cluster
from chat.testing.databases import BACKENDS, Database
from chat.testing.processes import Worker
from chat.testing.redis_server import REDIS_SERVER, PrivateRedis
from chat.testing.waiting import eventually
from tests.servers import REAP_INTERVAL, WORKER_TTL, start_cluster

ENV = {"CHAT_MESSAGE_RATE_LIMIT": "1000"}  # the chatter below is not rate-limited
CHATTER_EVERY = 0.15  # seconds between two messages of one user: the chat's pace
# Redis stays down while each user sends this many messages (about 2.5 s of chat).
OUTAGE_MESSAGES = math.ceil(2.5 / CHATTER_EVERY)
# Redis stays stalled while each user sends this many: longer than the liveness TTL, so that
# every liveness key expires on Redis's clock meanwhile.
STALL_MESSAGES = math.ceil((WORKER_TTL + 1) / CHATTER_EVERY)
# Once every liveness key is back (and no epoch warmup is under way), a reaper that had seen
# one missing would have struck within a reaper interval: the chat goes on for two.
REAPER_MESSAGES = math.ceil(2 * REAP_INTERVAL / CHATTER_EVERY)
RECOVERY_LIMIT = 10.0  # seconds from Redis answering again to cross-worker chat, at most
# Messages the gap-free test stores without publishing them (missed live by every socket).
GAP_MESSAGES = 3
GHOST = "ghost"  # their sender
ALLOWED_CLOSES = {4012, 4013}  # server restart / backing service unavailable (protocol §10)

pytestmark = pytest.mark.skipif(
    REDIS_SERVER is None, reason="redis-server is not installed (these tests start their own)"
)


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def shared_cluster(
    backend: str, private_redis: PrivateRedis, tmp_path_factory
) -> Iterator[Cluster]:
    directory = tmp_path_factory.mktemp(f"faults-{backend}")
    with start_cluster(directory, backend=backend, redis_url=private_redis.url, env=ENV) as running:
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
    with start_cluster(tmp_path, backend=backend, redis_url=private_redis.url, env=ENV) as running:
        yield running


async def liveness_back(cluster: Cluster) -> float:
    """Until both workers' liveness keys and the cache epoch are in Redis and no epoch warmup
    is under way (chat/liveness.py): from then on, no reaper can find a live worker's key
    missing. Returns when."""
    await eventually(
        lambda: (
            len(cluster.redis_keys(":state:worker:*")) == len(cluster.workers)
            and cluster.redis_keys(":state:workers:epoch")
            and not cluster.redis_keys(":state:workers:warmup")
        ),
        timeout=WORKER_TTL + 5 * REAP_INTERVAL,
        what="both liveness keys and the epoch in Redis, no warmup",
    )
    return time.monotonic()


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

    def sent_since(self, since: float, *, acknowledged: bool = False) -> int:
        """How many messages this peer sent at `since` or later (that came back, if
        `acknowledged`). Safe from a thread: it reads a copy of what the loop adds to."""
        back = self.acknowledged() if acknowledged else None
        return sum(
            1
            for cid, at in dict(self.sent).items()
            if at >= since and (back is None or cid in back)
        )

    async def send_message(self, cid: str) -> bool:
        self.sent[cid] = time.monotonic()
        try:
            await self.socket.send(
                {"type": "message", "content": f"{self.name}: {cid}", "message_id": cid}
            )
        except (ConnectionClosed, TimeoutError):
            return False
        return True

    async def barrier(self) -> None:
        """Every frame sent to this peer so far is in `frames`: the answer to a heartbeat sent
        now has arrived (frames to one socket arrive in order)."""
        probe = heartbeat_probe()
        await self.socket.send(probe)
        await eventually(
            lambda: any(
                f.get("client_timestamp") == probe["client_timestamp"]
                for f in self.of_type("heartbeat_ack")
            ),
            what=f"{self.name}'s heartbeat answered",
        )

    async def close(self) -> None:
        await self.socket.close()
        if self.reader is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.reader, 5)


async def chatter(peer: Peer, phase: str, stop: asyncio.Event) -> None:
    """One message every CHATTER_EVERY seconds (the pace of the chat, not a wait) until `stop`
    (or until the socket closes)."""
    n = 0
    while not stop.is_set() and peer.open:
        if not await peer.send_message(f"{phase}-{n}"):
            return
        n += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), CHATTER_EVERY)


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
    """Four users, two per worker, chatting in one room (a message every CHATTER_EVERY s)."""

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
        await eventually(
            lambda: len(self.peers[0].of_type("user_joined")) == everyone - 1, what="join notices"
        )
        return {p.socket.ack["session_id"] for p in self.peers}

    def start_chatter(self) -> None:
        self.senders = [asyncio.create_task(chatter(p, "chat", self.stop)) for p in self.peers]

    async def stop_chatter(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.senders)

    async def chat_until(
        self, *, since: float, sent: int = 0, acknowledged: int = 0, what: str
    ) -> None:
        """Until each of the four has sent `sent` messages at `since` or later, and seen
        `acknowledged` of those come back: the chat is the clock of a scenario."""
        await eventually(
            lambda: all(
                p.sent_since(since) >= sent
                and p.sent_since(since, acknowledged=True) >= acknowledged
                for p in self.peers
            ),
            timeout=30,
            what=what,
        )

    async def chat_past_the_reapers(self) -> None:
        """After a Redis fault: chat on past the time a wrong reaper would strike (until every
        liveness key is back and no epoch warmup is under way, then for a reaper's next
        looks); stop; one more message from each, which everyone gets; and everything sent
        to the four so far, a wrong `user_left` included, has arrived (`Peer.barrier`)."""
        reaping_again = await liveness_back(self.cluster)
        await self.chat_until(
            since=reaping_again, acknowledged=REAPER_MESSAGES, what="chat, reapers looking"
        )
        await self.stop_chatter()
        await self.everyone_gets_everyone("final")
        await asyncio.gather(*(p.barrier() for p in self.peers))

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
        await eventually(
            lambda: self.first_cross(b, since) and self.first_cross(a, since),
            timeout=RECOVERY_LIMIT,
            what="cross-worker chat again",
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

        await eventually(lambda: all(got_all(p) for p in self.peers), what=f"{cid} everywhere")

    def errors(self) -> list[str]:
        return [f["error_code"] for p in self.peers for f in p.of_type("error")]

    def acknowledged(self) -> dict[tuple[str, str], str]:
        return {(p.uid, cid): mid for p in self.peers for cid, mid in p.acknowledged().items()}

    def sent(self) -> int:
        return sum(len(p.sent) for p in self.peers)

    async def assert_nobody_reaped(self, sessions: set[str], gone: set[str] = frozenset()):
        """No live user shown as left, no session ended as `worker_lost`, the four's sessions
        open, and presence (over HTTP, from both workers) exactly the four."""
        db = self.cluster.database
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
            users = presence_of((await http_request("GET", url, token=token)).json())
            assert sorted(users) == sorted((p.uid, 1) for p in self.peers), users

    async def assert_acknowledged_in_history(self) -> int:
        """Every message a sender saw broadcast back is in the room's history: paged over a
        fresh socket, and in the database. Returns how many."""
        acked = set(self.acknowledged().values())
        assert acked, "nothing was acknowledged"
        history = await room_history(self.cluster.b, self.name, self.uid("Auditor"))
        missing = acked - {m["message_id"] for m in history}
        assert not missing, f"acknowledged but not in history: {sorted(missing)}"
        assert acked <= await asyncio.to_thread(stored_ids, self.cluster.database, self.name)
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
                not self.cluster.database.rows(
                    "SELECT 1 FROM chat_chatsession WHERE room_id = %s AND disconnected_at IS NULL",
                    self.name,
                )
            ),
            timeout=15,
            what=f"{self.name}: all sessions closed",
        )


# --- 1 + 2. Redis restarted mid-chat ----------------------------------------------------------


async def test_redis_restart_mid_chat(cluster: Cluster, private_redis: PrivateRedis, capsys):
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
        await room.chat_until(since=0, acknowledged=1, what="chat before the fault")

        killed_at = time.monotonic()
        private_redis.stop(signal.SIGKILL)
        # Leaving during the outage: the sessions still end (not open for good, a ghost).
        await erin.close()
        reset_connection(frank.socket)
        # Connecting during the outage: accepted, told SERVICE_UNAVAILABLE and closed 4013
        # (retry later); not a bare HTTP 500 at the handshake, never a 1011.
        refusals = [
            await connect_during_outage(w, room.name, room.uid(f"late{w.index}")) for w in (a, b)
        ]
        # The outage lasts while each user sends OUTAGE_MESSAGES (the scenario, not a wait).
        await room.chat_until(since=killed_at, sent=OUTAGE_MESSAGES, what="chat, Redis down")
        up_at = private_redis.start()
        a_to_b, b_to_a = await room.recovery(since=up_at)
        recovery = max(a_to_b, b_to_a)
        await room.chat_past_the_reapers()  # every liveness key was lost with Redis

        errors = room.errors()
        with capsys.disabled():
            print(
                f"\n[{cluster.database.backend}] Redis restart: down {up_at - killed_at:.2f} s; "
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
        # Nobody was reaped; those who left during the outage are gone, no late joiner is in.
        await room.assert_nobody_reaped(sessions, gone={erin.uid, frank.uid})
        assert len([k for k in cluster.redis_keys() if ":worker:" in k]) == 2, cluster.redis_keys()

        # 2. Every acknowledged message is in history.
        await room.assert_acknowledged_in_history()
        room.assert_delivered_outside(killed_at, up_at + recovery)
    finally:
        if not private_redis.running():
            private_redis.start()
        await room.close()


# --- 1c. gap-free recovery through a Redis restart (protocol §15) -----------------------------


def seq_view(peer: Peer) -> dict[int, dict]:
    """The room as this client knows it: every message frame it received, live or in a
    catch-up page (`history` with request id `cu-...`), by seq (a later state of a message
    replaces an earlier one)."""
    view: dict[int, dict] = {}
    for _, f in peer.frames:
        if f["type"] == "message":
            view[f["seq"]] = f
        elif f["type"] == "history" and (f["request_id"] or "").startswith("cu-"):
            for m in f["messages"]:
                view[m["seq"]] = m
    return view


def store_unpublished(db: Database, room: str, cid: str) -> None:
    """A message stored as the server stores one (the room's next seq, chat/sequence.py),
    with nothing published. (Two statements: nothing else writes to the room meanwhile.)"""
    db.execute("UPDATE chat_room SET last_seq = last_seq + 1 WHERE name = %s", room)
    db.execute(
        "INSERT INTO chat_chatmessage (room_id, user_id, username, content, client_message_id, "
        "created_at, seq, latest_seq) SELECT name, %s, %s, %s, %s, CURRENT_TIMESTAMP, "
        "last_seq, last_seq FROM chat_room WHERE name = %s",
        GHOST,
        "Ghost",
        f"unpublished {cid}",
        cid,
        room,
    )


def contiguous(view: dict[int, dict]) -> int:
    """The highest seq up to which this client has every message."""
    n = 0
    while n + 1 in view:
        n += 1
    return n


async def catch_up(peer: Peer, tag: str) -> int:
    """What a client does on `resync`: page `history` after the highest seq it has, until
    nothing more. Returns how many pages it took."""
    pages = 0
    while True:
        pages += 1
        request_id = f"cu-{tag}-{pages}"
        await peer.socket.send(
            {
                "type": "history",
                "after_seq": contiguous(seq_view(peer)),
                "limit": 100,
                "request_id": request_id,
            }
        )
        await eventually(
            lambda request_id=request_id: any(
                f["request_id"] == request_id for f in peer.of_type("history")
            ),
            what=f"{peer.name}'s catch-up page",
        )
        page = next(f for f in peer.of_type("history") if f["request_id"] == request_id)
        if not page["has_more"]:
            return pages


async def test_every_acknowledged_message_reaches_every_connected_client_through_a_restart(
    cluster: Cluster, private_redis: PrivateRedis, capsys
):
    """Clients stay connected while Redis is killed and started again empty, mid-chat. What
    was published while a worker was not subscribed never reached its sockets (pub/sub keeps
    nothing); each socket is told `resync` once its worker has subscribed again, and fetches
    what it missed by seq. Senders whose messages got SERVICE_UNAVAILABLE instead of an echo
    send them again with the same client id. At the end every connected client has every
    message of the room, seq 1 to the room's last, each once, and no message was stored twice."""
    room = Room(cluster, "gapfree")
    await room.join()
    try:
        await room.settled()
        room.start_chatter()
        await room.chat_until(since=0, acknowledged=2, what="chat before the fault")
        killed_at = time.monotonic()
        private_redis.stop(signal.SIGKILL)
        await room.chat_until(since=killed_at, sent=OUTAGE_MESSAGES, what="chat, Redis down")
        up_at = private_redis.start()
        await room.recovery(since=up_at)
        # Every socket is told to catch up (each worker's layer subscribed again) ...
        await eventually(
            lambda: all(p.of_type("resync") for p in room.peers),
            timeout=RECOVERY_LIMIT,
            what="resync on every socket",
        )
        await room.stop_chatter()
        # ... and does; senders retry what was never echoed, with the same client ids.
        retried_cids: dict[str, set[str]] = {}
        for p in room.peers:
            retried_cids[p.uid] = set(p.sent) - set(p.acknowledged())
            for cid in sorted(retried_cids[p.uid]):
                assert await p.send_message(cid)
        retried = sum(len(cids) for cids in retried_cids.values())
        await eventually(
            lambda: all(set(p.sent) <= set(p.acknowledged()) for p in room.peers),
            what="every message echoed to its sender",
        )
        # Messages that reached no socket live: stored (each taking the room's next seq)
        # with nothing published, as what a worker's layer misses between losing its
        # subscriptions and subscribing again (a window whose length depends on timing).
        # Then the workers' subscriptions are cut, with Redis up: each worker subscribes again
        # at once (redis-py reconnects by itself) and its sockets are told to resync.
        for n in range(GAP_MESSAGES):
            await asyncio.to_thread(store_unpublished, cluster.database, room.name, f"gap-{n}")
        resyncs = [len(p.of_type("resync")) for p in room.peers]
        await asyncio.to_thread(private_redis.client().client_kill_filter, _type="pubsub")
        await eventually(
            lambda: all(
                len(p.of_type("resync")) > n for p, n in zip(room.peers, resyncs, strict=True)
            ),
            timeout=RECOVERY_LIMIT,
            what="resync on every socket after the subscriptions were cut",
        )
        await room.everyone_gets_everyone("final")
        pages = [await catch_up(p, "end") for p in room.peers]
        await asyncio.gather(*(p.barrier() for p in room.peers))

        rows = await asyncio.to_thread(
            cluster.database.rows,
            "SELECT user_id, client_message_id, seq FROM chat_chatmessage WHERE room_id = %s",
            room.name,
        )
        last_seq = max(seq for _, _, seq in rows)
        retried_ids = {
            p.uid: {p.acknowledged()[cid] for cid in retried_cids[p.uid]} for p in room.peers
        }
        missed_live = [last_seq - len({f["seq"] for f in p.of_type("message")}) for p in room.peers]
        with capsys.disabled():
            print(
                f"\n[{cluster.database.backend}] gap-free restart: down {up_at - killed_at:.2f} s; "
                f"{len(rows)} messages stored (last seq {last_seq}), {retried} sent again after "
                f"SERVICE_UNAVAILABLE; resyncs {[len(p.of_type('resync')) for p in room.peers]}; "
                f"catch-up pages {pages}; missed live, then caught up: {missed_live}"
            )
        # Nothing stored twice: each (sender, client id) is one row, the seqs 1..last.
        pairs = [(uid, cid) for uid, cid, _ in rows]
        assert len(pairs) == len(set(pairs)), "a message stored twice"
        assert sorted(seq for _, _, seq in rows) == list(range(1, last_seq + 1))
        for p in room.peers:
            view = seq_view(p)
            # Every message, acknowledged or not, in every connected client's view, once.
            assert sorted(view) == list(range(1, last_seq + 1)), (p.name, sorted(view))
            ids = [m["message_id"] for m in view.values()]
            assert len(ids) == len(set(ids)), p.name
            assert {(m["user_id"], m["client_message_id"]) for m in view.values()} == set(pairs)
            # Received live twice: only a sender's own retry of a message whose broadcast was
            # still on its way (the retry's echo is the sender's alone).
            live = [f["message_id"] for f in p.of_type("message")]
            twice = {mid for mid in live if live.count(mid) > 1}
            assert twice <= retried_ids[p.uid], (p.name, twice)
        assert all(p.open for p in room.peers)
        # Each socket missed the unpublished ones live, and caught up on them.
        assert all(missed >= GAP_MESSAGES for missed in missed_live), missed_live
    finally:
        if not private_redis.running():
            private_redis.start()
        await room.close()


# --- 1a. idle workers across a Redis restart ---------------------------------------------------


async def test_idle_workers_take_sockets_right_after_a_redis_restart(
    cluster: Cluster, private_redis: PrivateRedis, capsys
):
    """No socket on either worker (so nothing reads their channel-layer connections) while
    Redis restarts: the next sockets, right after, join normally (no 1011, no 500) and chat
    across the workers. (Once, on SQLite: independent of the database.)"""
    if cluster.database.backend != "sqlite":
        pytest.skip("independent of the database: run once, on SQLite")
    tag = uuid.uuid4().hex[:8]
    for worker in cluster.workers:  # each worker's layer has connected to Redis
        await (
            await ChatSocket.join(worker.url, f"warm-{tag}", f"warm{worker.index}-{tag}")
        ).close()
    await all_sessions_closed(cluster.database)  # and now holds no socket, no subscription
    private_redis.stop(signal.SIGKILL)
    up_at = private_redis.start()
    room = Room(cluster, "idle")
    try:
        await room.join()
        await room.settled()
        joined = time.monotonic() - up_at
        await room.everyone_gets_everyone("hello")
        with capsys.disabled():
            print(
                f"\n[{cluster.database.backend}] idle workers, Redis restarted: four sockets "
                f"joined {joined:.2f} s and chatted across {time.monotonic() - up_at:.2f} s "
                f"after Redis answered; errors {room.errors()}"
            )
        assert room.errors() == []
    finally:
        await room.close()


# --- 1b. Redis stalled longer than the liveness TTL --------------------------------------------


async def test_redis_stall_longer_than_the_liveness_ttl(
    cluster: Cluster, private_redis: PrivateRedis, capsys
):
    """Redis stops answering (SIGSTOP) for longer than CHAT_WORKER_TTL but keeps its data:
    every liveness key expires on Redis's clock meanwhile while the cache epoch survives, so
    only a worker that knows its cache calls stalled can tell. Nobody may be reaped; chat
    resumes on both workers; nothing acknowledged is lost. (Once, on SQLite: the reaper's
    judgement does not depend on the database.)"""
    if cluster.database.backend != "sqlite":
        pytest.skip("independent of the database: run once, on SQLite")
    room = Room(cluster, "stall")
    await room.join()
    try:
        sessions = await room.settled()
        room.start_chatter()
        await room.chat_until(since=0, acknowledged=1, what="chat before the fault")
        stalled_at = time.monotonic()
        private_redis.pause()
        # The stall lasts while each user sends STALL_MESSAGES (the scenario, not a wait).
        await room.chat_until(since=stalled_at, sent=STALL_MESSAGES, what="chat, Redis stalled")
        private_redis.resume()
        resumed_at = time.monotonic()
        a_to_b, b_to_a = await room.recovery(since=resumed_at)
        await room.chat_past_the_reapers()  # every liveness key expired during the stall

        errors = room.errors()
        with capsys.disabled():
            print(
                f"\n[{cluster.database.backend}] Redis stalled {resumed_at - stalled_at:.2f} s "
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
        private_redis.resume()
        await room.close()


# --- 1c. leaving while typing, during an outage ------------------------------------------------


async def test_leaving_while_typing_during_an_outage_ends_the_session(
    cluster: Cluster, private_redis: PrivateRedis
):
    if cluster.database.backend != "sqlite":
        pytest.skip("independent of the database: run once, on SQLite")
    room = Room(cluster, "typing")
    gina = await room.join_other(cluster.a, "Gina")
    try:
        await gina.socket.send({"type": "typing", "is_typing": True})
        await eventually(lambda: gina.of_type("typing"), what="Gina's typing notice")
        open_on_a = await asyncio.to_thread(cluster.a.metric, "clarity_connections_open")
        private_redis.stop(signal.SIGKILL)
        await gina.close()
        # Redis stays down until worker A has begun ending her session (the first thing its
        # disconnect does is to count her socket gone).
        await eventually(
            lambda: cluster.a.metric("clarity_connections_open") == open_on_a - 1,
            what="worker A handling Gina's leave",
        )
        private_redis.start()
        await eventually(
            lambda: cluster.database.session(gina.socket.ack["session_id"])["disconnected_at"],
            timeout=3,
            what="Gina's session ended",
        )
    finally:
        if not private_redis.running():
            private_redis.start()
        # Bury the ghost, so the next tests start without an open session.
        await asyncio.to_thread(
            cluster.database.execute,
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
    a, b, db = cluster.a, cluster.b, cluster.database
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
                await eventually(lambda p=peer: not p.open, what=f"{peer.name} closed")
                assert peer.close_code == 4012, (peer.name, peer.close_code)
                generation += 1
                peer = await Peer.join(b, room, peer.uid, peer.name)
                everyone.append(peer)

        senders = [asyncio.create_task(chat_and_reconnect(p)) for p in peers]
        await eventually(lambda: all(p.acknowledged() for p in peers), what="chat before the stop")
        stopped_at = time.monotonic()
        a.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(a.reap, 15) == 0, a.logs()
        exited_at = time.monotonic()

        def chatting_on_b() -> bool:
            """A's two users are back, on B, and everyone on B has seen three of the messages
            it sent after A exited come back."""
            on_b = [p for p in list(everyone) if p.worker is b]
            return len(on_b) == len(peers) and all(
                p.sent_since(exited_at, acknowledged=True) >= 3 for p in on_b
            )

        await eventually(chatting_on_b, timeout=30, what="chat on B after the stop")
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
                f"\n[{cluster.database.backend}] SIGTERM: worker A exited in "
                f"{exited_at - stopped_at:.2f} s; "
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
BUDGET_KEYS = ":state:rl:"  # rate-limit windows (chat/budgets.py), each expiring on its own


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
    a, b, db = cluster.a, cluster.b, cluster.database
    tag = uuid.uuid4().hex[:8]
    rooms = [f"churn{r}-{tag}" for r in range(CHURN_ROOMS)]
    # One observer per room, alternating workers: the rooms' groups stay alive on both.
    observers = [
        await Peer.join(cluster.workers[r % 2], room, f"obs{r}-{tag}", f"Obs{r}")
        for r, room in enumerate(rooms)
    ]
    try:
        await liveness_back(cluster)  # liveness keys and epoch written, no warmup key
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
            response = await http_request("GET", f"{worker.http_url}/readyz")
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
                    await http_request(
                        "GET", f"{worker.http_url}/api/v1/ws/chat/users/{room}", token=token
                    )
                ).json()
                assert presence_of(body) == [(observers[r].uid, 1)], (room, body)

        # Each observer heard each churned user of its room join and leave, once each.
        def notices(observer: Peer) -> tuple[list[str], list[str]]:
            return (
                sorted(f["user_id"] for f in observer.of_type("user_joined")),
                sorted(f["user_id"] for f in observer.of_type("user_left")),
            )

        await eventually(
            lambda: all(len(set(j)) == len(j) and j == left for j, left in map(notices, observers)),
            what="a left notice for every joined one",
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
        # Rate-limit windows expire by themselves; any other new key would be a leak.
        budget_keys = {k for k in grown if BUDGET_KEYS in k}
        assert all(cluster.redis_ttl(k) > 0 for k in budget_keys), budget_keys
        grown = [k for k in grown if k not in budget_keys]
        subs_after = cluster.subscriptions()
        with capsys.disabled():
            print(
                f"\n[{cluster.database.backend}] churn: {CHURN_CYCLES} connect/disconnect cycles "
                f"({', '.join(f'{k} {kinds.count(k)}' for k in sorted(set(kinds)))}) "
                f"and {READYZ_PROBES} /readyz in "
                f"{elapsed:.2f} s ({CHURN_CYCLES / elapsed:.0f}/s); {total_sessions} sessions "
                f"recorded, closed {reasons}; open after {settled:.2f} s: observers only; "
                f"observers heard {heard} users join and leave; "
                f"Redis keys {len(keys_before)} -> {len(keys_after)}, pub/sub channels "
                f"{len(subs_before)} -> {len(subs_after)}"
            )
        assert grown == [], grown
        assert len(keys_after) - len(budget_keys) <= len(keys_before), (keys_before, keys_after)
        assert subs_after == subs_before, set(subs_after) ^ set(subs_before)
        assert "worker_lost" not in reasons
        cluster.assert_alive()
    finally:
        await asyncio.gather(*(o.close() for o in observers))
    await all_sessions_closed(db)
    # With the observers gone too: not one session open, and (with no socket left on either
    # worker) not one channel-layer subscription left in Redis, after all this module's faults.
    assert not db.open_sessions()
    await eventually(lambda: not cluster.subscriptions(), what="no subscription left")
