"""What a socket needs from the process it runs in, typed and passed explicitly.

One `WorkerContext` per process, built in `clarity_project/asgi.py` and handed to each
consumer by the routing (`Consumer.as_asgi(worker=...)`), as Django's `as_view(**initkwargs)`
hands a view its configuration: the worker's identity, its clock, the settings a socket
reads (one typed snapshot, rebuilt when a test changes a setting), and the per-process
helpers that belong to the running event loop (the assistant's HTTP client, the batched
writers, the bound on background work).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.signals import setting_changed

from chat.analysis_pool import AnalysisPool, AnalysisQueue
from chat.assistant.base import AssistantProvider, get_provider
from chat.budgets import Budgets
from chat.deltas import STREAM_IDLE_SLACK, DeltaTurns
from chat.joins import RoomViewer, SessionCloser, SessionOpener
from chat.overload import DeliveryDelays
from chat.ratelimit import Rule
from chat.reads import HistoryReader
from chat.receipts import ReadMarker
from chat.rooms import GroupEvents
from chat.timers import Clock, LoopClock, TimerIntervals
from chat.touches import SessionToucher
from chat.writer import MessageWriter


@dataclass(frozen=True)
class SocketConfig:
    """The settings a socket reads, read once (not one `settings` lookup per frame)."""

    max_connections_per_user: int
    open_rooms: bool
    timers: TimerIntervals
    max_message_size: int
    max_health_payload_size: int
    history_max_bytes: int
    max_data_points: int
    history_on_join: int
    resync_spread: float
    shutdown_rejoin_grace: float
    message_rule: Rule
    budgets: Budgets
    assistant_rule: Rule
    assistant_max_concurrency: int
    stream_idle_timeout: float
    analysis_rule: Rule
    analysis_queue: int
    analysis_processes: int

    @classmethod
    def from_settings(cls) -> SocketConfig:
        message_rule = Rule(
            seconds=settings.CHAT_RATE_LIMIT_WINDOW,
            max_requests=settings.CHAT_MESSAGE_RATE_LIMIT,
            close_factor=settings.CHAT_RATE_LIMIT_CLOSE_FACTOR,
        )
        return cls(
            max_connections_per_user=settings.CHAT_MAX_CONNECTIONS_PER_USER,
            open_rooms=settings.CHAT_OPEN_ROOMS,
            timers=TimerIntervals(
                heartbeat=settings.CHAT_HEARTBEAT_INTERVAL,
                connection_timeout=settings.CHAT_CONNECTION_TIMEOUT,
                typing_timeout=settings.CHAT_TYPING_TIMEOUT,
                group_renewal=settings.CHANNEL_LAYER_GROUP_EXPIRY / 2,
            ),
            max_message_size=settings.CHAT_MAX_MESSAGE_SIZE,
            max_health_payload_size=settings.CHAT_MAX_HEALTH_PAYLOAD_SIZE,
            history_max_bytes=settings.CHAT_HISTORY_MAX_BYTES,
            max_data_points=settings.CHAT_MAX_DATA_POINTS,
            history_on_join=settings.CHAT_HISTORY_ON_JOIN,
            resync_spread=settings.CHAT_RESYNC_SPREAD,
            shutdown_rejoin_grace=settings.CHAT_SHUTDOWN_REJOIN_GRACE,
            message_rule=message_rule,
            budgets=Budgets(
                frames=message_rule,
                bytes=_per_minute(
                    settings.CHAT_INBOUND_BYTES_PER_MINUTE,
                    close_factor=settings.CHAT_RATE_LIMIT_CLOSE_FACTOR,
                ),
                catch_up=_per_minute(
                    settings.CHAT_CATCH_UP_RATE_LIMIT,
                    close_factor=settings.CHAT_RATE_LIMIT_CLOSE_FACTOR,
                ),
                connects_per_user=_per_minute(settings.CHAT_CONNECT_RATE_LIMIT),
                connects_per_address=_per_minute(settings.CHAT_CONNECT_RATE_LIMIT_PER_ADDRESS),
                reads=_per_minute(
                    settings.CHAT_READ_RATE_LIMIT,
                    close_factor=settings.CHAT_RATE_LIMIT_CLOSE_FACTOR,
                ),
            ),
            assistant_rule=Rule(
                seconds=settings.ASSISTANT_USER_RATE_WINDOW,
                max_requests=settings.ASSISTANT_USER_RATE_LIMIT,
                close_factor=0,  # over the assistant quota is not abuse: the socket stays open
            ),
            assistant_max_concurrency=settings.ASSISTANT_MAX_CONCURRENCY,
            stream_idle_timeout=settings.ASSISTANT_FIRST_CHUNK_TIMEOUT + STREAM_IDLE_SLACK,
            analysis_rule=Rule(
                seconds=settings.CHAT_ANALYSIS_RATE_WINDOW,
                max_requests=settings.CHAT_ANALYSIS_RATE_LIMIT,
                close_factor=0,  # over the analysis quota is not abuse: the socket stays open
            ),
            analysis_queue=settings.CHAT_ANALYSIS_QUEUE,
            analysis_processes=settings.CHAT_ANALYSIS_PROCESSES,
        )


def _per_minute(limit: int, *, close_factor: int = 0) -> Rule | None:
    """A budget of `limit` per rolling minute; 0 (or less): no budget."""
    return Rule(seconds=60, max_requests=limit, close_factor=close_factor) if limit > 0 else None


class WorkerContext:
    """This worker process, as its sockets see it."""

    def __init__(self, *, worker_id: str, clock: Clock | None = None) -> None:
        self.worker_id = worker_id
        self.clock: Clock = clock or LoopClock()
        self.delivery_delays = DeliveryDelays()
        self._config: SocketConfig | None = None
        self._per_loop: dict[str, tuple[asyncio.AbstractEventLoop, Any]] = {}
        self._analysis_pool: AnalysisPool | None = None
        self._assistant_reads: ThreadPoolExecutor | None = None
        # Set when this worker starts shutting down (SIGTERM): new sockets are told to go
        # elsewhere (4012) instead of joining a worker about to close them.
        self.shutting_down = False
        # What stops the server accepting connections (set by clarity_project/serve.py; none
        # in tests that run the application in process).
        self.stop_listening: Callable[[], None] | None = None
        setting_changed.connect(self._setting_changed)

    def _setting_changed(self, **kwargs: Any) -> None:
        self._config = None

    @property
    def config(self) -> SocketConfig:
        if self._config is None:
            self._config = SocketConfig.from_settings()
        return self._config

    def per_loop(
        self, name: str, factory: Callable[[], Any], *, stop: Callable[[Any], None] | None = None
    ) -> Any:
        """One `factory()` per event loop (what it holds belongs to the loop: an HTTP client,
        pending futures, a task): in a server, one per process. `stop` is called with the
        one of a loop that is gone (tests: one loop per test) when the next is made."""
        loop = asyncio.get_running_loop()
        held = self._per_loop.get(name)
        if held is None or held[0] is not loop:
            if held is not None and stop is not None:
                stop(held[1])
            held = self._per_loop[name] = (loop, factory())
        return held[1]

    @property
    def assistant(self) -> AssistantProvider:
        """The assistant provider (it holds an HTTP connection pool, or the process that
        holds one)."""
        return self.per_loop("assistant", get_provider, stop=lambda provider: provider.close())

    @property
    def assistant_reads(self) -> ThreadPoolExecutor:
        """The assistant's database thread (its context reads), apart from the one the chat
        stores messages on (chat.replies): one per process, not per loop (it holds no loop
        state), made on the first question; `close` stops it."""
        if self._assistant_reads is None:
            self._assistant_reads = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="assistant-reads"
            )
        return self._assistant_reads

    @property
    def assistant_slots(self) -> asyncio.Semaphore:
        """The bound on assistant replies and analysis narratives in flight on this worker."""
        return self.per_loop(
            "assistant_slots", lambda: asyncio.Semaphore(self.config.assistant_max_concurrency)
        )

    @property
    def delta_turns(self) -> DeltaTurns:
        """The assistant deltas of this worker, taking turns per room (chat.deltas)."""
        return self.per_loop("delta_turns", lambda: DeltaTurns(clock=self.clock))

    @property
    def session_toucher(self) -> SessionToucher:
        """Batched liveness writes of this worker's sessions."""
        return self.per_loop("session_toucher", SessionToucher)

    @property
    def session_opener(self) -> SessionOpener:
        """Batched session opens of this worker's sockets (chat.joins)."""
        return self.per_loop(
            "session_opener",
            lambda: SessionOpener(
                worker_id=self.worker_id,
                limits=lambda: (self.config.max_connections_per_user, self.config.open_rooms),
            ),
        )

    @property
    def session_closer(self) -> SessionCloser:
        """Batched session ends of this worker's sockets (chat.joins)."""
        return self.per_loop("session_closer", SessionCloser)

    @property
    def room_viewer(self) -> RoomViewer:
        """Batched presence and history on join of this worker's sockets (chat.joins)."""
        return self.per_loop("room_viewer", RoomViewer)

    @property
    def group_events(self) -> GroupEvents:
        """This worker's events to a group, one channel-layer event per group per turn:
        join and leave notices (chat.rooms.GroupEvents)."""
        return self.per_loop("group_events", GroupEvents)

    @property
    def history_reader(self) -> HistoryReader:
        """Batched `history` requests of this worker's sockets (chat.reads)."""
        return self.per_loop("history_reader", HistoryReader)

    @property
    def read_marker(self) -> ReadMarker:
        """Batched `read` marks of this worker's sockets (chat.receipts)."""
        return self.per_loop("read_marker", ReadMarker)

    @property
    def message_writer(self) -> MessageWriter:
        """Batched storage of this worker's chat messages."""
        return self.per_loop("message_writer", MessageWriter)

    @property
    def analysis_pool(self) -> AnalysisPool:
        """The processes health analyses run in: one pool per process, not per loop (it holds
        no loop state), made on the first analysis; `close` stops it."""
        if self._analysis_pool is None:
            self._analysis_pool = AnalysisPool(processes=self.config.analysis_processes)
        return self._analysis_pool

    @property
    def analyses(self) -> AnalysisQueue:
        """The analyses accepted here and not finished (bounded by CHAT_ANALYSIS_QUEUE)."""
        return self.per_loop("analyses", AnalysisQueue)

    def close(self) -> None:
        """This worker is stopping: stop what outlives a loop (the analysis processes, the
        assistant's database thread, the assistant's process)."""
        self.analysis_pool.shutdown()
        if (held := self._per_loop.get("assistant")) is not None:
            held[1].close()
        if self._assistant_reads is not None:
            self._assistant_reads.shutdown(wait=False, cancel_futures=True)
