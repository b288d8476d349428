"""This process among the workers: its identity, its housekeeping, and the reaping of
workers that died without closing their sessions (SIGKILL, OOM, a lost machine).

Each worker refreshes its liveness key (chat/liveness.py) every CHAT_REAP_INTERVAL seconds
with a CHAT_WORKER_TTL lifetime. Any live worker that finds open sessions owned by a worker
without that key ends them (reason `worker_lost`), removes their channels from the room
groups and tells the rooms those users left. `manage.py reapsessions` does the same on
demand. A failed or slow (over CHAT_REAP_INTERVAL) liveness call of this worker suspends its
reaping for CHAT_WORKER_TTL: keys may have expired meanwhile while their workers lived.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Awaitable
from datetime import datetime

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings

from chat.context import WorkerContext
from chat.liveness import LivenessUnknown, worker_mark_alive, workers_dead
from chat.metrics import REAPED_SESSIONS
from chat.overload import watch_overload
from chat.rooms import (
    membership_notice,
    room_events_join,
    room_group,
    user_group,
    worker_group,
)
from chat.sessions import (
    SessionClosed,
    departures_due,
    session_workers,
    sessions_open_on,
    sessions_reap,
)

logger = logging.getLogger(__name__)

# Fixed for the life of the process and recorded on every session it opens.
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


async def reap_dead_workers(
    *, exclude: set[str] | None = None, assume_all_dead: bool = False, strict: bool = False
) -> int:
    """End the sessions of workers whose liveness key is gone (or of every worker, when no
    server is running); returns how many sessions were ended. When liveness is unknown
    (see LivenessUnknown) nothing is reaped: logged, or raised if `strict`."""
    layer = get_channel_layer()
    owners = await database_sync_to_async(session_workers)() - (exclude or set())
    if not owners:
        return 0
    if assume_all_dead:
        dead = owners
    else:
        try:
            dead = await asyncio.to_thread(workers_dead, worker_ids=owners)
        except LivenessUnknown as unknown:
            if strict:
                raise
            logger.warning("not reaping: %s; try again in %s s", unknown, settings.CHAT_WORKER_TTL)
            return 0
    total = 0
    for worker_id in sorted(dead):
        reaped = await database_sync_to_async(sessions_reap)(worker_id=worker_id)
        for session in reaped:
            # Every group the socket's consumer joined (as its disconnect would have).
            for joined in (
                room_group(session.room_id),
                user_group(session.user_id),
                worker_group(worker_id),
            ):
                await layer.group_discard(joined, session.channel_name)
        await announce_leaves(departures=[session for session in reaped if session.last_in_room])
        total += len(reaped)
        REAPED_SESSIONS.inc(len(reaped))
        logger.warning("reaped %d sessions of dead worker %s", len(reaped), worker_id)
    return total


async def announce_departures(*, now: datetime | None = None) -> int:
    """Tell the rooms of the users a stopping worker closed who have not come back within
    CHAT_SHUTDOWN_REJOIN_GRACE (`system` + `user_left`, one event per room); how many."""
    gone = await database_sync_to_async(departures_due)(now=now)
    await announce_leaves(departures=gone)
    return len(gone)


async def announce_leaves(*, departures: list[SessionClosed]) -> None:
    """`system` + `user_left` to each departed user's room, from this worker (not from a
    socket: the reaper, the end of a rejoin grace), one event per room."""
    notices: dict[str, list[dict]] = {}
    for departure in departures:
        notices.setdefault(room_group(departure.room_id), []).append(
            membership_notice(user_id=departure.user_id, username=departure.username, joined=False)
        )
    layer = get_channel_layer()
    for group, events in notices.items():
        await layer.group_send(group, room_events_join(events))


class WorkerLifecycle:
    """ASGI wrapper for the life of this worker process.

    On the first request on an event loop: mark the worker alive (before any session can be
    recorded under its id), start its housekeeping loop, and chain a graceful shutdown onto
    the server's SIGTERM/SIGINT handlers: every socket of this worker is closed with 4012 and
    its session ended (reason `shutdown`; ended in batches, chat.joins.SessionCloser), within
    CHAT_SHUTDOWN_GRACE seconds (the server stops listening first; a socket accepted before
    that is closed 4012 at once instead of joining), and its
    analysis processes stopped (chat/analysis_pool.py), before the server's own handler stops
    it. (daphne 4.2's own shutdown cannot do this: it fails with a KeyError while WebSockets
    are open and leaves the consumers pending.)

    The consumers get what they need of the process (chat/context.py) from the routing, not
    from here: this wrapper only runs the process's housekeeping around the application.
    """

    def __init__(self, app, *, worker: WorkerContext) -> None:
        self.app = app
        self.worker = worker
        self.task: asyncio.Task | None = None
        self.overload_task: asyncio.Task | None = None
        self.assistant_task: asyncio.Task | None = None
        # When this worker's last liveness call failed or stalled (monotonic): reaping waits a
        # full CHAT_WORKER_TTL after it (see the module docstring).
        self.liveness_trouble_at = -math.inf

    _asgi_single_callable = True  # for asgiref: an ASGI 3 application all the same

    def __call__(self, scope, receive, send) -> Awaitable[None]:
        """Not a coroutine once the worker has started: it returns the application's own
        awaitable, so a socket holds no suspended frame of this middleware (~0.4 KB each)."""
        if scope["type"] not in {"websocket", "http"}:
            return self.app(scope, receive, send)
        if not self.started():
            return self.start_then(self.app, scope, receive, send)
        return self.app(scope, receive, send)

    def started(self) -> bool:
        """Whether this worker's housekeeping runs on the running event loop."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        return self.task is not None and self.task.get_loop() is loop and not self.task.done()

    async def start_then(self, app, scope, receive, send) -> None:
        """The first request on an event loop: mark this worker alive, start housekeeping."""
        if not self.started():
            await self.mark_alive()
            if not self.started():
                loop = asyncio.get_running_loop()
                self.task = loop.create_task(self.housekeeping())
                self.overload_task = loop.create_task(
                    watch_overload(
                        store_backlog=lambda: len(self.worker.message_writer.pending),
                        delays=self.worker.delivery_delays,
                    )
                )
                self.chain_signal_handlers(loop)
                self.assistant_task = loop.create_task(self.prepare_assistant())
        return await app(scope, receive, send)

    async def prepare_assistant(self) -> None:
        """Set the assistant's provider up now, not at the first question: for Gemini, its
        process (~1.5 s to import the SDK; chat/assistant/process.py)."""
        try:
            await self.worker.assistant.prepare()
        except Exception:
            logger.exception("the assistant could not be set up; the first question tries again")

    def chain_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> None:
        """Only where a server installed handlers to chain to (not in tests), and only from
        the main thread (the only one Python lets install signal handlers)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            server_handler = signal.getsignal(signum)
            if not callable(server_handler) or server_handler is signal.default_int_handler:
                continue

            def on_signal(number, frame, server_handler=server_handler):
                # A fresh context: the handler interrupts whatever the main thread was running,
                # and a task copying that context could inherit its database-thread state
                # (asgiref: "Single thread executor already being used, would deadlock").
                loop.call_soon_threadsafe(
                    loop.create_task,
                    self.shutdown(server_handler, number, frame),
                    context=contextvars.Context(),
                )

            signal.signal(signum, on_signal)

    async def shutdown(self, server_handler, number, frame) -> None:
        logger.info("shutting down: closing this worker's sockets")
        self.worker.shutting_down = True
        try:
            if self.worker.stop_listening is not None:
                self.worker.stop_listening()
            layer = get_channel_layer()
            if hasattr(layer, "worker_stopping"):  # Redis: no UNSUBSCRIBE per closing socket
                layer.worker_stopping()
            await layer.group_send(worker_group(self.worker.worker_id), {"type": "worker.shutdown"})
            deadline = time.monotonic() + settings.CHAT_SHUTDOWN_GRACE
            while time.monotonic() < deadline:
                if not await database_sync_to_async(sessions_open_on)(
                    worker_id=self.worker.worker_id
                ):
                    break
                await asyncio.sleep(0.05)
            else:
                logger.warning("shutdown grace over with sessions still open")
        except Exception:
            logger.exception("graceful shutdown failed; the reaper will end the sessions")
        if self.task is not None:
            self.task.cancel()
        self.worker.close()
        server_handler(number, frame)

    def liveness_trouble(self) -> None:
        self.liveness_trouble_at = time.monotonic()

    def liveness_trusted(self) -> bool:
        """Whether this worker's liveness calls have gone well for a full CHAT_WORKER_TTL (so
        every live worker has had the time to mark itself alive since)."""
        return time.monotonic() - self.liveness_trouble_at >= settings.CHAT_WORKER_TTL

    async def housekeeping(self) -> None:
        # The liveness key is refreshed by a task of its own: the reap's database calls wait
        # for this process's single database thread, and a stall there (a lock, a slow query)
        # must not let the key expire while this worker's event loop and sockets are fine.
        keep_alive = asyncio.create_task(self.keep_alive())
        try:
            while True:
                if self.liveness_trusted():
                    try:
                        await reap_dead_workers(exclude={WORKER_ID}, strict=True)
                    except LivenessUnknown as unknown:
                        self.liveness_trouble()
                        logger.warning(
                            "not reaping for %s s: %s", settings.CHAT_WORKER_TTL, unknown
                        )
                    except Exception:
                        self.liveness_trouble()
                        logger.exception("worker housekeeping failed")
                try:
                    await announce_departures()
                except Exception:
                    logger.exception("announcing departures failed")
                await asyncio.sleep(settings.CHAT_REAP_INTERVAL)
        finally:
            keep_alive.cancel()

    async def keep_alive(self) -> None:
        while True:
            await self.mark_alive()
            await asyncio.sleep(settings.CHAT_REAP_INTERVAL)

    async def mark_alive(self) -> None:
        """Refresh this worker's liveness key; a failure or a stall is liveness trouble (and
        never reaches a client: the first request also comes through here)."""

        def timed() -> float:
            started = time.monotonic()
            worker_mark_alive(worker_id=WORKER_ID)
            return time.monotonic() - started

        try:
            if await asyncio.to_thread(timed) > settings.CHAT_REAP_INTERVAL:
                self.liveness_trouble()
                logger.warning("worker liveness refresh stalled")
        except Exception:
            self.liveness_trouble()
            logger.exception("worker liveness refresh failed")
