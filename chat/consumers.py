"""The sockets (protocol §4, §5, §7): authenticate, accept, join, dispatch, leave.

Per-connection state lives on the consumer instance; rooms are channel-layer groups; sessions,
presence, rate-limit counters and history live in the database and the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
from dataclasses import replace
from datetime import timedelta

from autobahn.exception import Disconnected
from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer

from chat import metrics
from chat.access import Refused
from chat.analysis import health_analysis
from chat.analysis_jobs import AnalysisLimits, FrameRejected
from chat.auth import AuthFailure, Identity, authenticate, token_from_scope
from chat.budgets import HEARTBEAT_MAX_SIZE, Refusal, SocketBudget, connect_refused
from chat.context import WorkerContext
from chat.dispatching import dispatch_events
from chat.edits import (
    EditRefused,
    MessageNotFound,
    message_deleted_frame,
    message_updated_frame,
    message_user_change,
)
from chat.inbound import frame_size, frame_type, large_frame, parse_message, small_heartbeat
from chat.joins import ViewRequest
from chat.logs import bind_log_context
from chat.models import Endpoint
from chat.protocol import (
    CHAT_LARGE_TYPES,
    CHAT_SCHEMAS,
    HEALTH_LARGE_TYPES,
    HEALTH_ROOM_PREFIX,
    HEALTH_SCHEMAS,
    AuthIn,
    ChatIn,
    Close,
    DeleteIn,
    EditIn,
    ErrorCode,
    FrameError,
    HeartbeatIn,
    HistoryIn,
    Inbound,
    MessageType,
    ReadIn,
    TypingIn,
    connection_ack_frame,
    decode_json,
    echo_timestamp,
    encode,
    error_frame,
    frame,
    iso,
    now_iso,
)
from chat.ratelimit import rate_limit_hit
from chat.reads import PageRequest
from chat.receipts import ReadMark, read_frame, receipts_to_room
from chat.replies import assistant_reply, room_assistant_mode, wants_reply
from chat.rooms import (
    membership_notice,
    room_event,
    room_group,
    room_id_problem,
    user_group,
    worker_group,
)
from chat.sequence import room_last_seq
from chat.sessions import SessionEnd, SessionRefused, SessionRequest
from chat.timers import Due, SocketTimers

logger = logging.getLogger(__name__)


def scope_header(scope: dict, name: bytes) -> str:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


class Ended(Exception):
    """The socket was closed while handling a frame: nothing more to do with it."""


class SessionConsumer(AsyncWebsocketConsumer):
    """What both endpoints share: authenticate, accept, open a session, the inbound pipeline,
    timers, and the session's end. Subclasses name their room, schemas and handlers."""

    endpoint: Endpoint
    schemas: dict[str, type[Inbound]]
    large_types: frozenset[str]
    handlers: dict

    def __init__(self, *, worker: WorkerContext) -> None:
        super().__init__()
        self.worker = worker

    def target_room(self) -> tuple[str, Close | None]:
        """The room this socket is for, and why the user may not have it (or None)."""
        raise NotImplementedError

    async def joined(self, *, first_in_room: bool) -> None:
        """The endpoint's frames after connection_ack."""
        raise NotImplementedError

    async def leaving(self, *, last_in_room: bool) -> None:
        """What the endpoint tells others when this session has ended."""

    async def __call__(self, scope, receive, send) -> None:
        """Channels' `AsyncConsumer.__call__`, with the cheaper event loop of
        chat.dispatching in place of `await_many_dispatch`."""
        self.scope = scope
        self.channel_layer = get_channel_layer(self.channel_layer_alias)
        self.channel_name = await self.channel_layer.new_channel()
        self.channel_receive = functools.partial(self.channel_layer.receive, self.channel_name)
        self.base_send = send
        with contextlib.suppress(StopConsumer):
            await dispatch_events([receive, self.channel_receive], self.dispatch)

    async def dispatch(self, message: dict) -> None:
        """Channels' dispatch, without its per-event `close_old_connections` thread hop.

        Stock Channels runs `close_old_connections` in the database thread before every
        event, including every room frame a socket receives: one thread round trip per
        delivery, the largest cost of fan-out. Every database call here goes through
        `database_sync_to_async`, which closes stale connections itself around each call."""
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    async def websocket_disconnect(self, message: dict) -> None:
        """Channels' own, without its `close_old_connections` thread hop either (see
        `dispatch`): one round trip per socket through the worker's one database thread, in
        line with the session closes, when a stopping worker's thousands of sockets close at
        once. (This consumer joins no `groups` of Channels' own: `disconnect` leaves its
        groups.)"""
        await self.disconnect(message["code"])
        raise StopConsumer()

    # --- connection ---------------------------------------------------------------------

    async def connect(self) -> None:
        self.config = self.worker.config
        self.identity: Identity | None = None
        self.session_id: str | None = None
        self.room_id: str = ""
        self.closing: Close | None = None
        self.tasks: set[asyncio.Task] = set()
        self.messages_sent = 0
        self.timers_started = False
        self.timers = SocketTimers(
            clock=self.worker.clock, intervals=self.config.timers, on_due=self.on_timers
        )
        # Accept first, so every refusal below reaches the client as an error frame and a
        # typed close code (closing before accept would be a bare HTTP 403).
        await self.accept()
        if self.worker.shutting_down:
            # Reconnecting clients would otherwise join a worker about to close them again.
            return await self.end(Close.SHUTDOWN)
        budgets = self.config.budgets
        address = (self.scope.get("client") or ["", 0])[0] or ""
        try:
            # Connection attempts are paid for first (protocol §16): by address before the
            # token is verified, by user before any join work.
            if address and await connect_refused(
                rule=budgets.connects_per_address, budget="connect_address", key=address
            ):
                return await self.end(Close.RATE_LIMITED)
            self.identity = await authenticate(token_from_scope(self.scope))
            bind_log_context(user_id=self.identity.user_id)
            if await connect_refused(
                rule=budgets.connects_per_user, budget="connect_user", key=self.identity.user_id
            ):
                return await self.end(Close.RATE_LIMITED)
            self.budget = SocketBudget(
                user_id=self.identity.user_id, budgets=budgets, clock=self.worker.clock
            )
            self.room_id, problem = self.target_room()
            if problem is not None:
                return await self.end(problem)
            opened = await self.worker.session_opener.open(
                SessionRequest(
                    identity=self.identity,
                    room_id=self.room_id,
                    endpoint=self.endpoint,
                    channel_name=self.channel_name,
                    client_address=address,
                    user_agent=scope_header(self.scope, b"user-agent"),
                )
            )
        except (AuthFailure, SessionRefused) as refusal:
            return await self.end(refusal.close)
        except Exception:
            logger.exception("connect failed room=%s", self.room_id)
            return await self.end(Close.SERVICE_UNAVAILABLE)
        self.session_id = opened.session_id
        bind_log_context(session_id=self.session_id, room_id=self.room_id)
        self.room_assistant_mode = opened.room_assistant_mode
        self.room_kind = opened.room_kind
        metrics.CONNECTIONS_OPEN.labels(self.endpoint).inc()
        try:
            await self.join_groups()
            await self.send_frame(
                connection_ack_frame(
                    user_id=self.identity.user_id,
                    session_id=self.session_id,
                    room_id=self.room_id,
                    heartbeat_interval=self.config.timers.heartbeat,
                    connection_timeout=self.config.timers.connection_timeout,
                    max_message_size=self.config.max_message_size,
                    rate_limit=self.config.message_rule.max_requests,
                    last_seq=opened.room_last_seq,
                    stream_idle_timeout=self.config.stream_idle_timeout,
                )
            )
            await self.joined(first_in_room=opened.first_in_room)
        except Exception:
            # The session is open: `disconnect` ends it after this close.
            logger.exception("join failed session=%s", self.session_id)
            return await self.end(Close.SERVICE_UNAVAILABLE)
        self.start_timers()
        logger.info(
            "session opened session=%s user=%s room=%s",
            self.session_id,
            self.identity.user_id,
            self.room_id,
        )

    def start_timers(self) -> None:
        """Once the socket's join frames are sent (a `joined` may start them before its
        notice to the room, which can wait a turn: chat.rooms.GroupEvents); never for
        a socket already closing."""
        if self.timers_started or self.closing is not None:
            return
        self.timers_started = True
        self.timers.start(token_expires_at=self.identity.expires_at)

    def groups_joined(self) -> list[str]:
        """The room, this user's sockets (private results), this worker's sockets (shutdown)."""
        return [
            room_group(self.room_id),
            user_group(self.identity.user_id),
            worker_group(self.worker.worker_id),
        ]

    async def join_groups(self) -> None:
        """Join (or renew: a layer may expire memberships) every group of this socket."""
        for group in self.groups_joined():
            await self.channel_layer.group_add(group, self.channel_name)

    async def disconnect(self, code: int) -> None:
        self.timers.stop()
        if self.session_id is None:
            return
        session_id, self.session_id = self.session_id, None
        self.worker.session_toucher.forget(session_id=session_id)
        metrics.CONNECTIONS_OPEN.labels(self.endpoint).dec()
        # Each step on its own: a channel layer that is down (Redis restarting) must not keep
        # the session from being ended.
        if self.timers.typing_withdraw():
            await self.best_effort(
                "typing withdrawal", self.broadcast, self.typing_frame(is_typing=False)
            )
        # A stopping worker's groups go with it (its Redis subscriptions end with its
        # connection): discarding each socket's one by one only delayed the shutdown.
        for group in self.groups_joined() if not self.worker.shutting_down else ():
            await self.best_effort(
                "group discard", self.channel_layer.group_discard, group, self.channel_name
            )
        # A socket whose unsent output passed its bound is closed by the transport, which
        # reports 4009 (clarity_project/transport.py).
        closing = self.closing or (
            Close.SLOW_CONSUMER if code == Close.SLOW_CONSUMER.value.code else None
        )
        try:
            closed = await self.worker.session_closer.close(
                SessionEnd(
                    session_id=session_id,
                    close_code=closing.value.code if closing else code,
                    close_reason=closing.name.lower() if closing else "client",
                    last_seen=self.worker.clock.now(),
                    messages_sent=self.messages_sent,
                    # A stopping worker's users are told to come back (4012): the room
                    # hears of their leaving only if they do not, within the grace.
                    leave_grace=self.config.shutdown_rejoin_grace
                    if closing is Close.SHUTDOWN
                    else 0.0,
                )
            )
        except Exception:
            logger.exception("ending the session failed session=%s", session_id)
            return
        if closed is not None:
            await self.best_effort("leave notice", self.leaving, last_in_room=closed.last_in_room)
        logger.info(
            "session closed session=%s user=%s code=%s", session_id, self.identity.user_id, code
        )

    async def best_effort(self, what: str, step, *args, **kwargs) -> None:
        try:
            await step(*args, **kwargs)
        except Exception:
            logger.exception("%s failed", what)

    async def end(self, close: Close) -> None:
        """Tell the client why (one error frame), then close with the table's code."""
        if self.closing is not None:
            return
        self.closing = close
        # Nothing more is due on a closing socket (the timer work closing it runs on).
        self.timers.stop(cancel_work=False)
        counter = metrics.CLOSES if self.session_id else metrics.CONNECTIONS_REFUSED
        counter.labels(close.value.code).inc()
        await self.send_frame(error_frame(close.value.error))
        await self.close(code=close.value.code, reason=close.value.reason)

    # --- timers (chat/timers.py) ----------------------------------------------------------

    async def on_timers(self, due: frozenset[Due]) -> None:
        if Due.IDLE in due:
            return await self.end(Close.CONNECTION_TIMEOUT)
        if Due.TOKEN_EXPIRED in due:
            return await self.end(Close.TOKEN_EXPIRED)
        if Due.TYPING_EXPIRED in due:
            await self.broadcast(self.typing_frame(is_typing=False))
        if Due.HEARTBEAT in due:
            await self.send_frame(frame(MessageType.HEARTBEAT, client_timestamp=None))
            self.touch()
        if Due.RENEWAL in due:
            await self.join_groups()

    def touch(self) -> None:
        """Note this session's liveness; the worker writes all of them in one statement."""
        self.worker.session_toucher.note(
            session_id=self.session_id,
            last_seen=self.worker.clock.now() - timedelta(seconds=self.timers.idle_for()),
            messages_sent=self.messages_sent,
        )

    # --- inbound ------------------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None):
        if self.session_id is None or self.closing is not None:
            return
        self.timers.inbound()
        try:
            await self.receive_frame(text_data, bytes_data)
        except FrameError as err:
            await self.send_frame(error_frame(err.code, err.details, **err.fmt))
        except Ended:
            pass
        except Exception:
            logger.exception("frame handling failed session=%s", self.session_id)
            await self.send_frame(error_frame(ErrorCode.SERVICE_UNAVAILABLE))

    async def receive_frame(self, text: str | None, raw: bytes | None) -> None:
        """Pay for the frame (chat/budgets.py), then check, decode, validate and handle it."""
        size = frame_size(text, raw)
        heartbeat = small_heartbeat(text, size=size, max_size=HEARTBEAT_MAX_SIZE)
        catch_up = heartbeat is None and self.budget.may_catch_up(text, size=size)
        read = heartbeat is None and not catch_up and self.budget.may_be_read(text, size=size)
        await self.refuse(
            await self.budget.inbound(
                size=size, heartbeat=heartbeat is not None, catch_up=catch_up, read=read
            )
        )
        if heartbeat is not None:
            metrics.FRAMES_IN.labels(MessageType.HEARTBEAT).inc()
            return await self.on_heartbeat(heartbeat)
        try:
            message = self.decoded(text, size=size)
        except FrameError:
            if catch_up or read:  # refused frames are paid for (§16), dressed up or not
                await self.refuse(await self.budget.frame())
            raise
        if catch_up and not (isinstance(message, HistoryIn) and message.catching_up):
            await self.refuse(await self.budget.frame())  # not a catch-up read after all
        if read and not isinstance(message, ReadIn):
            await self.refuse(await self.budget.frame())  # not a `read` after all
        if message is None:
            return await self.request_analysis(text)
        metrics.FRAMES_IN.labels(message.type).inc()
        claimed = getattr(message, "user_id", None)
        if claimed is not None and claimed != self.identity.user_id:
            raise FrameError(ErrorCode.USER_ID_MISMATCH)
        await self.handlers[message.type](self, message)

    def decoded(self, text: str | None, *, size: int) -> Inbound | None:
        """The frame decoded and validated (FrameError if it is not a valid one), or None for
        an analysis request: its text is decoded and validated off the event loop."""
        if large_frame(
            text,
            size=size,
            max_size=self.config.max_message_size,
            max_large_size=self.config.max_health_payload_size,
            large_types=self.large_types,
        ):
            return None  # only an analysis request may be this large: never decoded here
        data = decode_json(text)
        if frame_type(data) in self.large_types:
            return None  # validated with the large ones, from the same text, off the loop
        return parse_message(data, self.schemas)

    async def refuse(self, refusal: Refusal | None) -> None:
        """Over a budget: refuse what was asked (FrameError), or close 4029 if it is abuse."""
        if refusal is None:
            return
        if refusal.abusive:
            await self.end(Close.RATE_LIMITED)
            raise Ended
        raise FrameError(ErrorCode.RATE_LIMIT_EXCEEDED, refusal.details())

    async def on_heartbeat(self, message: HeartbeatIn) -> None:
        await self.send_frame(
            frame(
                MessageType.HEARTBEAT_ACK,
                client_timestamp=echo_timestamp(message.client_timestamp),
                server_timestamp=now_iso(),
            )
        )

    async def on_auth(self, message: AuthIn) -> None:
        try:
            identity = await authenticate(message.token)
        except AuthFailure as refusal:
            if refusal.close is Close.AUTH_UNAVAILABLE:
                # The current token is still good: keep the session, let the client retry.
                raise FrameError(ErrorCode.AUTH_UNAVAILABLE) from None
            return await self.end(Close.INVALID_TOKEN)
        if identity.user_id != self.identity.user_id:
            return await self.end(Close.INVALID_TOKEN)
        # The display name is fixed for the socket's life (protocol §11): what the room was
        # shown on join stays true.
        self.identity = replace(identity, username=self.identity.username)
        self.timers.token_renewed(expires_at=identity.expires_at)
        await self.send_frame(
            frame(
                MessageType.AUTH_ACK, user_id=identity.user_id, expires_at=iso(identity.expires_at)
            )
        )

    # --- outbound -----------------------------------------------------------------------

    async def send(self, text_data=None, bytes_data=None, close=False) -> None:
        """Drop a frame for a socket that is already closing, instead of crashing.

        Until daphne has seen the TCP close, a send to a socket whose closing handshake is
        under way raises autobahn's `Disconnected`; a consumer that died there would never run
        `disconnect`, and its session would stay open for good."""
        try:
            await super().send(text_data=text_data, bytes_data=bytes_data, close=close)
        except Disconnected:
            logger.debug("frame dropped, socket closing: session=%s", self.session_id)

    async def send_frame(self, payload: dict, *, text: str | None = None) -> None:
        """Send `payload` (already encoded as `text`, if the caller had to measure it)."""
        metrics.FRAMES_OUT.labels(payload["type"]).inc()
        if payload["type"] == MessageType.ERROR:
            metrics.ERRORS.labels(payload["error_code"]).inc()
        await self.send(text_data=encode(payload) if text is None else text)

    def typing_frame(self, *, is_typing: bool) -> dict:
        return frame(
            MessageType.TYPING,
            user_id=self.identity.user_id,
            username=self.identity.username,
            is_typing=is_typing,
        )

    async def broadcast(self, payload: dict) -> None:
        """Send one frame to every socket in the room (sender included)."""
        await self.channel_layer.group_send(room_group(self.room_id), room_event(payload))

    async def worker_shutdown(self, event: dict) -> None:
        """This worker is stopping (SIGTERM/SIGINT): the client should reconnect elsewhere.

        The session ends now, with the close on its way, not when the client answers it:
        the stopping worker waits only for its sessions to end (chat.worker), and thousands
        of clients answering at once (or one that never does) would hold up its exit and
        the restart. (`disconnect` ends a session once: daphne's later disconnect event
        finds nothing left to do.)"""
        await self.end(Close.SHUTDOWN)
        await self.disconnect(Close.SHUTDOWN.value.code)

    async def layer_overflow(self, event: dict) -> None:
        """This socket's channel-layer queue filled up (it reads slower than its rooms talk):
        the layer dropped the queue and left this marker; close 4009 (protocol §16)."""
        await self.end(Close.SLOW_CONSUMER)

    async def layer_resubscribed(self, event: dict) -> None:
        """This worker's channel layer lost Redis and subscribed again: room events published
        meanwhile never reached this socket. At a random moment within CHAT_RESYNC_SPREAD
        (not every socket's catch-up at once), tell the client the room's last seq, so that
        it fetches what it missed (`history` `after_seq`, protocol §15)."""
        if self.session_id is None or self.closing is not None:
            return
        delay = random.uniform(0, self.config.resync_spread)
        clock = self.worker.clock
        clock.call_at(clock.monotonic() + delay, lambda: self.spawn(self.resync()))

    async def resync(self) -> None:
        if self.closing is not None:
            return
        last_seq = await database_sync_to_async(room_last_seq)(room_id=self.room_id)
        await self.send_frame(frame(MessageType.RESYNC, room_id=self.room_id, last_seq=last_seq))

    async def room_settings(self, event: dict) -> None:
        """An operator changed this room (admin): its assistant mode applies from now on."""
        self.room_assistant_mode = event["assistant_mode"]
        self.room_kind = event["kind"]

    async def room_revoke(self, event: dict) -> None:
        """The user lost this room (removed, banned), from whichever worker or the admin: stop
        its frames at once, then ROOM_FORBIDDEN and close 4004 (protocol §11)."""
        if event["room_id"] != self.room_id:
            return
        await self.best_effort(
            "group discard",
            self.channel_layer.group_discard,
            room_group(self.room_id),
            self.channel_name,
        )
        await self.end(Close.ROOM_FORBIDDEN)

    async def session_terminate(self, event: dict) -> None:
        """An operator ended this session (admin action), from whichever worker."""
        await self.end(Close.SESSION_TERMINATED)

    async def chat_frame(self, event: dict) -> None:
        if self.closing is not None:
            return
        me = self.identity.user_id
        for text, kind, error_code, excluded in event["frames"]:
            if excluded is not None and excluded == me:
                continue
            metrics.FRAMES_OUT.labels(kind).inc()
            if kind == MessageType.ERROR:
                metrics.ERRORS.labels(error_code).inc()
            await self.send(text_data=text)
        self.worker.delivery_delays.delivered(sent_at=event["sent_at"])

    # --- background work off the receive path ---------------------------------------------

    def spawn(self, coroutine) -> None:
        """Run slow work (assistant, analysis) as its own task, so this socket's frames keep
        flowing."""
        task = asyncio.create_task(self._logged(coroutine))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _logged(self, coroutine) -> None:
        try:
            await coroutine
        except Exception:
            logger.exception("background work failed session=%s", self.session_id)

    async def request_analysis(self, text: str) -> None:
        """An analysis request (protocol §7, §16), from the frame's text: within the user's
        analysis quota and this worker's queue, or refused before any work is queued."""
        verdict = await rate_limit_hit(
            key=f"analysis:{self.identity.user_id}", rule=self.config.analysis_rule
        )
        if verdict.limited:
            metrics.ANALYSES_REFUSED.labels("rate_limit").inc()
            metrics.RATE_LIMITED.labels("analysis").inc()
            raise FrameError(
                ErrorCode.RATE_LIMIT_EXCEEDED,
                {"retry_after": verdict.retry_after, "scope": "analysis"},
            )
        if not self.worker.analyses.admit(capacity=self.config.analysis_queue):
            metrics.ANALYSES_REFUSED.labels("queue_full").inc()
            raise FrameError(ErrorCode.SERVICE_UNAVAILABLE, {"scope": "analysis"})
        self.spawn(self.analyse(text))

    async def analyse(self, text: str) -> None:
        """One accepted analysis: decoded, validated and computed in an analysis process; a
        refusal goes to this socket, the results to this user's sockets only."""
        try:
            try:
                outcome = await self.worker.analysis_pool.run(
                    text,
                    user_id=self.identity.user_id,
                    limits=AnalysisLimits(
                        types=self.large_types,
                        max_message_size=self.config.max_message_size,
                        max_points=self.config.max_data_points,
                    ),
                )
            except Exception as exc:
                logger.warning(
                    "analysis job failed session=%s: %s", self.session_id, type(exc).__name__
                )
                outcome = None
            if isinstance(outcome, FrameRejected):
                return await self.send_frame(error_frame(outcome.code, outcome.details))
            if outcome is not None:
                metrics.FRAMES_IN.labels(outcome.type).inc()
            group = user_group(self.identity.user_id)

            async def emit(payload_frame: dict) -> None:
                await self.channel_layer.group_send(group, room_event(payload_frame))

            await health_analysis(
                provider=self.worker.assistant,
                slots=self.worker.assistant_slots,
                user_id=self.identity.user_id,
                username=self.identity.username,
                metrics=outcome.metrics if outcome is not None else None,
                points=outcome.points if outcome is not None else 0,
                emit=emit,
                turns=self.worker.delta_turns,
            )
        finally:
            self.worker.analyses.release()


class ChatConsumer(SessionConsumer):
    """`/api/v1/ws/{room_id}` and `/api/v1/chat/{room_id}` (protocol §4, §5)."""

    endpoint = Endpoint.CHAT
    schemas = CHAT_SCHEMAS
    large_types = CHAT_LARGE_TYPES

    def target_room(self) -> tuple[str, Close | None]:
        room_id = self.scope["url_route"]["kwargs"]["room_id"]
        return room_id, room_id_problem(room_id=room_id)

    async def joined(self, *, first_in_room: bool) -> None:
        try:
            view = await self.worker.room_viewer.view(
                ViewRequest(
                    user_id=self.identity.user_id,
                    room_id=self.room_id,
                    history_limit=self.config.history_on_join,
                    history_max_bytes=self.config.history_max_bytes,
                )
            )
        except Refused:
            return await self.end(Close.ROOM_FORBIDDEN)
        await self.send_frame(
            frame(MessageType.PRESENCE, room_id=self.room_id, users=view.presence)
        )
        await self.send_history_page(
            messages=view.history, has_more=view.has_more, request_id=None, joining=True
        )
        self.start_timers()
        if first_in_room:
            await self.announce(joined=True)

    async def leaving(self, *, last_in_room: bool) -> None:
        if last_in_room:
            await self.announce(joined=False)

    async def on_message(self, message: ChatIn) -> None:
        stored = await self.worker.message_writer.store(
            room_id=self.room_id,
            user_id=self.identity.user_id,
            username=self.identity.username,
            content=message.content,
            metadata=message.metadata,
            client_message_id=message.message_id,
        )
        if not stored.new:
            # Sent before (a retry after a lost echo, protocol §15): the room has it already;
            # the sender gets the stored message's echo, and nothing else happens again.
            return await self.send_frame(stored.frame)
        self.messages_sent += 1
        await self.broadcast(stored.frame)
        mode = room_assistant_mode(stored=self.room_assistant_mode, kind=self.room_kind)
        if wants_reply(mode=mode, content=message.content):
            await self.ask_assistant(stored.frame)

    async def ask_assistant(self, question: dict) -> None:
        """The assistant answers within the user's quota (ASSISTANT_USER_RATE_LIMIT); past
        it the message stands unanswered and the sender is told when to try again."""
        verdict = await rate_limit_hit(
            key=f"assistant:{self.identity.user_id}", rule=self.config.assistant_rule
        )
        if verdict.limited:
            metrics.RATE_LIMITED.labels("assistant").inc()
            raise FrameError(
                ErrorCode.RATE_LIMIT_EXCEEDED,
                {"retry_after": verdict.retry_after, "scope": "assistant"},
            )
        self.spawn(self.answer(question))

    async def on_typing(self, message: TypingIn) -> None:
        self.timers.typing(is_typing=message.is_typing)
        await self.broadcast(self.typing_frame(is_typing=message.is_typing))

    async def on_history(self, message: HistoryIn) -> None:
        await self.send_history(
            limit=message.limit,
            before=message.before,
            after=message.after,
            before_seq=message.before_seq,
            after_seq=message.after_seq,
            request_id=message.request_id,
        )

    async def send_history(
        self,
        *,
        limit: int,
        request_id: str | None,
        before: int | None = None,
        after: int | None = None,
        before_seq: int | None = None,
        after_seq: int | None = None,
    ) -> None:
        """A requested history page, asked of the rule again in the same database call: the
        user may have been removed since the socket joined, even a moment ago (batched with
        the worker's other requests, chat.reads)."""
        try:
            messages, has_more = await self.worker.history_reader.read(
                PageRequest(
                    user_id=self.identity.user_id,
                    room_id=self.room_id,
                    limit=limit,
                    max_bytes=self.config.history_max_bytes,
                    before=before,
                    after=after,
                    before_seq=before_seq,
                    after_seq=after_seq,
                )
            )
        except Refused:
            return await self.end(Close.ROOM_FORBIDDEN)
        await self.send_history_page(
            messages=messages, has_more=has_more, request_id=request_id, joining=False
        )

    async def send_history_page(
        self, *, messages: list[dict], has_more: bool, request_id: str | None, joining: bool
    ) -> None:
        """A history page, paid for by its size before it is sent (protocol §16): over the
        user's byte budget a request is refused, and a join gets the refusal instead of its
        page."""
        payload = frame(
            MessageType.HISTORY,
            room_id=self.room_id,
            messages=messages,
            has_more=has_more,
            request_id=request_id,
        )
        text = encode(payload)
        refusal = await self.budget.reply(size=len(text))
        if refusal is not None and joining:
            return await self.send_frame(
                error_frame(ErrorCode.RATE_LIMIT_EXCEEDED, refusal.details())
            )
        await self.refuse(refusal)
        await self.send_frame(payload, text=text)

    # --- edits and deletions (protocol §12; chat.edits) ---------------------------------------

    async def on_edit(self, message: EditIn) -> None:
        await self.change_message(message.message_id, content=message.content)

    async def on_delete(self, message: DeleteIn) -> None:
        await self.change_message(message.message_id, content=None)

    async def change_message(self, message_id: int, *, content: str | None) -> None:
        """Edit (`content`) or delete a message of this room, as the rule allows; the change
        is broadcast with its own seq. An edit to the same content changes nothing."""
        try:
            stored = await database_sync_to_async(message_user_change)(
                room_id=self.room_id,
                message_id=message_id,
                user_id=self.identity.user_id,
                content=content,
            )
        except MessageNotFound:
            raise FrameError(ErrorCode.MESSAGE_NOT_FOUND) from None
        except EditRefused as refused:
            errors = [{"loc": ["content"], "msg": str(refused), "type": "value_error"}]
            raise FrameError(ErrorCode.MESSAGE_PARSE_ERROR, {"errors": errors}) from None
        except Refused as refused:
            if refused.code == ErrorCode.ROOM_FORBIDDEN:
                return await self.end(Close.ROOM_FORBIDDEN)
            raise FrameError(refused.code) from None
        if stored is None:
            return
        await self.broadcast(
            message_updated_frame(stored)
            if content is not None
            else message_deleted_frame(stored, deleted_by=self.identity.user_id)
        )

    # --- read positions (protocol §12; chat.receipts) ----------------------------------------

    # The highest seq this socket was told was read, and the highest it has had stored: the
    # socket's `read` frames are coalesced, one mark in flight at a time.
    read_wanted = 0
    read_asked = 0
    reads_storing = False

    async def on_read(self, message: ReadIn) -> None:
        self.read_wanted = max(self.read_wanted, message.seq)
        if not self.reads_storing and self.read_wanted > self.read_asked:
            self.reads_storing = True
            self.spawn(self.store_reads())

    async def store_reads(self) -> None:
        """Store this socket's read position until it has caught up with its `read` frames;
        each mark that moved it is told to the room (private and direct rooms) or to the
        user's own sockets (the others)."""
        try:
            while self.read_wanted > self.read_asked and self.closing is None:
                self.read_asked = self.read_wanted
                try:
                    marked = await self.worker.read_marker.mark(
                        ReadMark(
                            user_id=self.identity.user_id,
                            room_id=self.room_id,
                            seq=self.read_asked,
                        )
                    )
                except Refused:
                    return await self.end(Close.ROOM_FORBIDDEN)
                if not marked.advanced:
                    continue
                receipt = room_event(
                    read_frame(room_id=self.room_id, user_id=self.identity.user_id, seq=marked.seq)
                )
                group = (
                    room_group(self.room_id)
                    if receipts_to_room(self.room_kind)
                    else user_group(self.identity.user_id)
                )
                await self.channel_layer.group_send(group, receipt)
        finally:
            self.reads_storing = False

    async def announce(self, *, joined: bool) -> None:
        await self.worker.group_events.send(
            layer=self.channel_layer,
            group=room_group(self.room_id),
            event=membership_notice(
                user_id=self.identity.user_id, username=self.identity.username, joined=joined
            ),
        )

    async def answer(self, question: dict) -> None:
        """The assistant's reply, streamed to the room and then stored. It runs on even if
        this socket closes meanwhile: it sends to the room's group, not to this socket."""
        group = room_group(question["room_id"])

        async def emit(payload: dict) -> None:
            await self.channel_layer.group_send(group, room_event(payload))

        async with self.worker.assistant_slots:
            reply = await assistant_reply(
                provider=self.worker.assistant,
                question=question,
                user_id=self.identity.user_id,
                username=self.identity.username,
                emit=emit,
                turns=self.worker.delta_turns,
                reads=self.worker.assistant_reads,
                writer=self.worker.message_writer,
            )
        await emit(reply)

    handlers = {
        MessageType.MESSAGE: on_message,
        MessageType.TYPING: on_typing,
        MessageType.HEARTBEAT: SessionConsumer.on_heartbeat,
        MessageType.HISTORY: on_history,
        MessageType.AUTH: SessionConsumer.on_auth,
        MessageType.READ: on_read,
        MessageType.EDIT: on_edit,
        MessageType.DELETE: on_delete,
    }


class HealthAnalysisConsumer(SessionConsumer):
    """`/api/v1/ws/health-analysis/{user_id}` (and its /chat alias): one user's private
    analysis socket, in the reserved room `health_analysis_{user_id}` (protocol §7)."""

    endpoint = Endpoint.HEALTH
    schemas = HEALTH_SCHEMAS
    large_types = HEALTH_LARGE_TYPES
    WELCOME = "Connected to health analysis service. Send health data to start analysis."

    def target_room(self) -> tuple[str, Close | None]:
        path_user = self.scope["url_route"]["kwargs"]["user_id"]
        if path_user != self.identity.user_id:
            return "", Close.USER_ID_MISMATCH
        room_id = f"{HEALTH_ROOM_PREFIX}{self.identity.user_id}"
        return room_id, room_id_problem(room_id=room_id)

    async def joined(self, *, first_in_room: bool) -> None:
        await self.send_frame(frame(MessageType.SYSTEM, content=self.WELCOME, level="info"))

    handlers = {
        MessageType.HEARTBEAT: SessionConsumer.on_heartbeat,
        MessageType.AUTH: SessionConsumer.on_auth,
    }


class UnroutedConsumer(AsyncWebsocketConsumer):
    """A WebSocket to a path no endpoint serves (protocol §16): INVALID_ROOM and close 4004,
    the answer a room the user may not have gets, so it says nothing more."""

    async def connect(self) -> None:
        await self.accept()
        close = Close.INVALID_ROOM
        metrics.CONNECTIONS_REFUSED.labels(close.value.code).inc()
        metrics.ERRORS.labels(close.value.error).inc()
        await self.send(text_data=encode(error_frame(close.value.error)))
        await self.close(code=close.value.code, reason=close.value.reason)
