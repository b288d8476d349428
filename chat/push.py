"""Push notifications (protocol §13): an outbox in the database, filled by the chat workers
as messages are stored and drained by the push worker (`manage.py pushworker`), so that the
Firebase Admin SDK's blocking calls (a thread per message in `send_each`, a blocking OAuth
refresh) never run on a chat worker's event loop, and nothing owed is lost to a restart.

- **Queued** (`pushes_queue`, in the message writer's batch, after the messages are
  committed): for each room of the batch that is not public, each member who has a device,
  has not muted the room, is not banned, has no open session in that room on any worker
  (the sessions table is shared: presence across workers), and did not write all of the
  batch's messages there. A member with a push already owed for that room is not queued
  again; one pushed less than CHAT_PUSH_COALESCE seconds ago is queued for when that time
  is up: at most one push per room per user per CHAT_PUSH_COALESCE.
- **Sent** (`pushes_send`): one FCM message per device of the user, content-free (title
  CHAT_PUSH_TITLE, body "New message", and the room's opaque id as data to open it: never
  its name, which can itself be health information, nor the message), unless the user
  asked for previews where CHAT_PUSH_PREVIEW_ALLOWED permits: then the body is the sender
  and the first 100 characters of the latest message owed. A token FCM calls
  unregistered or registered to another sender is deleted; any other failure leaves the
  push owed, tried again after a backoff, up to CHAT_PUSH_MAX_ATTEMPTS.
- **Claimed** by a push worker for CHAT_PUSH_LEASE seconds before it sends (on PostgreSQL
  with SKIP LOCKED, so several push workers share the outbox); a worker that dies mid-send
  leaves its claims to expire, and they are sent again.

A push failure never affects chat: queueing errors are logged and the messages stand.
"""

from __future__ import annotations

import logging
import signal
import threading
import warnings
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import close_old_connections, connections, transaction
from django.utils import timezone
from firebase_admin import exceptions as firebase_errors
from firebase_admin import messaging
from prometheus_client import Counter

from chat.models import (
    ChatMessage,
    ChatSession,
    ChatUser,
    Device,
    PushState,
    RoomKind,
    RoomMember,
)
from chat.protocol import AI_USER_ID

logger = logging.getLogger(__name__)

PUSHES = Counter(
    "clarity_pushes_total",
    "Push notifications by outcome: queued (owed to a member), sent (to a device), failed "
    "(a device's send failed; retried), pruned (a token FCM refused for good was deleted)",
    ["outcome"],
)
PUSH_BODY = "New message"
PREVIEW_CHARS = 100  # of the message, in a preview (protocol §13)
RETRY_BASE = 30.0  # s: the first retry of a failed push; doubled per attempt, capped
RETRY_CAP = 3600.0


def pushes_queue(*, messages: list[tuple[str, str, int]], now: datetime | None = None) -> int:
    """Queue the pushes owed for these stored messages (`(room_id, author_id, message_id)`);
    how many members now have one owed that did not before. Blocking (database). All in one
    transaction (a savepoint, inside the caller's): a failure leaves the caller's own
    transaction usable (the messages stored stand)."""
    if not messages:
        return 0
    with transaction.atomic():
        queued = _pushes_queue(messages=messages, now=now or timezone.now())
    PUSHES.labels("queued").inc(queued)
    return queued


def _pushes_queue(*, messages: list[tuple[str, str, int]], now: datetime) -> int:
    authors: dict[str, set[str]] = {}
    latest: dict[str, int] = {}  # room -> its newest message of the batch (for a preview)
    for room_id, author, message_id in messages:
        authors.setdefault(room_id, set()).add(author)
        latest[room_id] = max(latest.get(room_id, 0), message_id)
    members = (
        RoomMember.objects.filter(
            room_id__in=authors,
            muted=False,
            banned=False,
            room__kind__in=[RoomKind.PRIVATE, RoomKind.DIRECT],
            user_id__in=Device.objects.values("user_id"),
        )
        .exclude(user_id=AI_USER_ID)
        .values_list("room_id", "user_id")
    )
    present = set(
        ChatSession.objects.filter(room_id__in=authors, disconnected_at__isnull=True).values_list(
            "room_id", "user_id"
        )
    )
    owed = [
        (room_id, user_id)
        for room_id, user_id in members
        if (room_id, user_id) not in present and authors[room_id] - {user_id}
    ]
    if not owed:
        return 0
    coalesce = timedelta(seconds=settings.CHAT_PUSH_COALESCE)
    queued = 0
    states = {
        (state.room_id, state.user_id): state
        for state in PushState.objects.select_for_update().filter(
            room_id__in={room for room, _ in owed}, user_id__in={user for _, user in owed}
        )
    }
    fresh, changed = [], []
    for room_id, user_id in owed:
        state = states.get((room_id, user_id))
        if state is None:
            fresh.append(
                PushState(
                    room_id=room_id,
                    user_id=user_id,
                    pending=True,
                    due_at=now,
                    message_id=latest[room_id],
                )
            )
            queued += 1
            continue
        if not state.pending:
            state.pending, state.attempts = True, 0
            last = state.last_sent_at
            state.due_at = max(now, last + coalesce) if last is not None else now
            queued += 1
        state.message_id = latest[room_id]  # a push owed already shows the newest
        changed.append(state)
    PushState.objects.bulk_create(fresh, ignore_conflicts=True)
    PushState.objects.bulk_update(changed, ["pending", "attempts", "due_at", "message_id"])
    return queued


def pushes_claim(*, now: datetime | None = None, limit: int = 100) -> list[PushState]:
    """The pushes due now, claimed for CHAT_PUSH_LEASE seconds (another push worker skips
    them meanwhile). Blocking (database)."""
    now = now or timezone.now()
    with transaction.atomic():
        due = list(
            PushState.objects.select_for_update(skip_locked=True)
            .filter(pending=True, due_at__lte=now)
            .order_by("due_at")[:limit]
        )
        lease = now + timedelta(seconds=settings.CHAT_PUSH_LEASE)
        PushState.objects.filter(pk__in=[state.pk for state in due]).update(due_at=lease)
    return due


@dataclass(frozen=True)
class Outcome:
    sent: int
    failed: int
    pruned: int


def _bodies(states: list[PushState]) -> dict[int, str]:
    """Each push's body: "New message", or, where CHAT_PUSH_PREVIEW_ALLOWED permits and its
    user asked for previews, the sender and the first PREVIEW_CHARS characters of the latest
    message it is owed for (unless that was deleted since)."""
    bodies = {state.pk: PUSH_BODY for state in states}
    if not settings.CHAT_PUSH_PREVIEW_ALLOWED:
        return bodies
    wanting = set(
        ChatUser.objects.filter(
            pk__in={state.user_id for state in states}, push_previews=True
        ).values_list("pk", flat=True)
    )
    asked = [state for state in states if state.user_id in wanting and state.message_id]
    messages = {
        pk: (username, content)
        for pk, username, content in ChatMessage.objects.filter(
            pk__in={state.message_id for state in asked}, deleted_at__isnull=True
        ).values_list("pk", "username", "content")
    }
    for state in asked:
        if state.message_id in messages:
            username, content = messages[state.message_id]
            bodies[state.pk] = f"{username}: {content[:PREVIEW_CHARS]}"
    return bodies


def _message(token: str, room_id: str, body: str = PUSH_BODY) -> messaging.Message:
    # Clients register FCM registration tokens (protocol §13), which FCM's v1 API takes as
    # `message.token`; firebase-admin 7.7 deprecates that field for installation ids (`fid`),
    # a different identifier the clients do not send. Its warning is expected here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Message.token is deprecated", DeprecationWarning)
        return messaging.Message(
            token=token,
            notification=messaging.Notification(title=settings.CHAT_PUSH_TITLE, body=body),
            data={"room_id": room_id},
        )


def _pruned(error: Exception | None) -> bool:
    """FCM says the token will never work again (only then is it deleted)."""
    return isinstance(error, messaging.UnregisteredError | messaging.SenderIdMismatchError)


def pushes_send(*, states: list[PushState], app, now: datetime | None = None) -> Outcome:
    """Send the claimed pushes: one FCM message per device of each user (one `send_each`
    call for them all), then settle each push: done if any device got it or none is left,
    else owed again after a backoff (given up after CHAT_PUSH_MAX_ATTEMPTS). Blocking."""
    now = now or timezone.now()
    devices: dict[str, list[str]] = {}
    for user_id, token in Device.objects.filter(
        user_id__in={state.user_id for state in states}
    ).values_list("user_id", "token"):
        devices.setdefault(user_id, []).append(token)
    batch = [(state, token) for state in states for token in devices.get(state.user_id, [])]
    bodies = _bodies(states) if batch else {}
    responses = []
    if batch:
        try:
            responses = messaging.send_each(
                [_message(token, state.room_id, bodies[state.pk]) for state, token in batch],
                app=app,
            ).responses
        except firebase_errors.FirebaseError as error:
            logger.warning("push batch failed: %s", type(error).__name__)
            responses = [messaging.SendResponse(None, error)] * len(batch)
    delivered: set[int] = set()
    failed_states: set[int] = set()
    gone: list[str] = []
    sent = failed = 0
    for (state, token), response in zip(batch, responses, strict=True):
        if response.success:
            sent += 1
            delivered.add(state.pk)
        elif _pruned(response.exception):
            gone.append(token)
        else:
            failed += 1
            failed_states.add(state.pk)
            logger.warning("push failed: %s", type(response.exception).__name__)
    # A token FCM refused for good, unless it moved to another user meanwhile.
    for state, token in batch:
        if token in gone:
            Device.objects.filter(token=token, user_id=state.user_id).delete()
    with transaction.atomic():
        for state in states:
            _settle(
                state, now=now, delivered=state.pk in delivered, failed=state.pk in failed_states
            )
    PUSHES.labels("sent").inc(sent)
    PUSHES.labels("failed").inc(failed)
    PUSHES.labels("pruned").inc(len(set(gone)))
    return Outcome(sent=sent, failed=failed, pruned=len(set(gone)))


def _settle(state: PushState, *, now: datetime, delivered: bool, failed: bool) -> None:
    """After a send: owed again after a backoff if every device failed (up to
    CHAT_PUSH_MAX_ATTEMPTS), else done. A push owed for a newer message than the one claimed
    (queued while this one was being sent) stays owed, for when the coalescing is over."""
    row = PushState.objects.filter(pk=state.pk)
    if failed and not delivered and state.attempts + 1 < settings.CHAT_PUSH_MAX_ATTEMPTS:
        wait = min(RETRY_BASE * 2**state.attempts, RETRY_CAP)
        row.update(attempts=state.attempts + 1, due_at=now + timedelta(seconds=wait))
        return
    sent_at = now if delivered else state.last_sent_at
    if row.filter(message_id=state.message_id).update(
        pending=False, attempts=0, due_at=None, last_sent_at=sent_at
    ):
        return
    coalesce = timedelta(seconds=settings.CHAT_PUSH_COALESCE)
    row.update(attempts=0, due_at=sent_at + coalesce if delivered else now, last_sent_at=sent_at)


def push_worker_run(*, app, stop: threading.Event, poll: float) -> None:
    """The push worker's loop: claim what is due, send it, until `stop` is set. Each round
    starts on a usable database connection (a broken or expired one is replaced); the
    thread's connections are closed when it stops."""
    try:
        while not stop.is_set():
            close_old_connections()
            try:
                states = pushes_claim()
                if states:
                    pushes_send(states=states, app=app)
                    continue
            except Exception:
                logger.exception("push round failed")
            stop.wait(poll)
    finally:
        connections.close_all()


def stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM and SIGINT end the loop after the round in flight."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
