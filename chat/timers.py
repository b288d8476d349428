"""A socket's timers: server heartbeats, idle timeout, token expiry, typing expiry and group
renewal, as one small object with an injectable clock.

One timer per socket, armed for its earliest deadline (no task while it waits): 10,000
sockets cost 10,000 timer handles, not 10,000 sleeping tasks. When it fires, the timers work
out what is due, move their own deadlines on, and hand the consumer the set of what is due;
the consumer decides what to send. Deadlines that only move later (an inbound frame, a
refreshed token) need no re-arming: the timer fires, finds nothing due yet, and re-arms.

The clock is the event loop's by default (`LoopClock`); tests pass a manual clock
(`chat.testing.clock.ManualClock`) and move time on instead of waiting for it.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Protocol

logger = logging.getLogger(__name__)


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """Monotonic seconds for deadlines, wall time for token expiry, and a way to be called
    back at a monotonic time."""

    def monotonic(self) -> float: ...

    def now(self) -> datetime: ...

    def call_at(self, when: float, callback: Callable[[], None]) -> TimerHandle: ...


class LoopClock:
    """The running event loop's clock (the default)."""

    def monotonic(self) -> float:
        return asyncio.get_running_loop().time()

    def now(self) -> datetime:
        return datetime.now(UTC)

    def call_at(self, when: float, callback: Callable[[], None]) -> TimerHandle:
        return asyncio.get_running_loop().call_at(when, callback)


class Due(Enum):
    IDLE = "idle"  # no inbound frame for connection_timeout: close 1000
    TOKEN_EXPIRED = "token_expired"  # close 4003
    TYPING_EXPIRED = "typing_expired"  # withdraw the user's is_typing
    HEARTBEAT = "heartbeat"  # send a server heartbeat, note liveness
    RENEWAL = "renewal"  # renew every group the socket joined


@dataclass(frozen=True)
class TimerIntervals:
    heartbeat: float
    connection_timeout: float
    typing_timeout: float
    group_renewal: float


class SocketTimers:
    """The deadlines of one socket. `on_due` runs (as a task) with what is due; the timer is
    re-armed once it has returned."""

    __slots__ = (
        "clock",
        "handle",
        "intervals",
        "last_inbound",
        "next_heartbeat",
        "next_renewal",
        "on_due",
        "stopped",
        "token_expires_at",
        "typing_until",
        "work",
    )

    def __init__(
        self,
        *,
        clock: Clock,
        intervals: TimerIntervals,
        on_due: Callable[[frozenset[Due]], Awaitable[None]],
    ) -> None:
        self.clock = clock
        self.intervals = intervals
        self.on_due = on_due
        now = clock.monotonic()
        self.token_expires_at: datetime | None = None
        self.last_inbound = now
        self.typing_until: float | None = None
        self.next_heartbeat = self.next_renewal = math.inf
        self.handle: TimerHandle | None = None
        self.work: asyncio.Task | None = None
        self.stopped = True

    # --- what the consumer tells the timers ------------------------------------------------

    def start(self, *, token_expires_at: datetime) -> None:
        """The socket has joined: heartbeats and renewals from now on."""
        now = self.clock.monotonic()
        self.token_expires_at = token_expires_at
        self.next_heartbeat = now + self.intervals.heartbeat
        self.next_renewal = now + self.intervals.group_renewal
        self.stopped = False
        self.arm()

    def inbound(self) -> None:
        """A frame arrived: the idle deadline moves later (no re-arming needed)."""
        self.last_inbound = self.clock.monotonic()

    def typing(self, *, is_typing: bool) -> None:
        if is_typing:
            self.typing_until = self.clock.monotonic() + self.intervals.typing_timeout
            self.arm()
        else:
            self.typing_until = None

    def typing_withdraw(self) -> bool:
        """Forget a pending typing expiry; whether the user was typing."""
        was_typing, self.typing_until = self.typing_until is not None, None
        return was_typing

    def token_renewed(self, *, expires_at: datetime) -> None:
        self.token_expires_at = expires_at
        self.arm()  # the new token may expire sooner than the old one

    def idle_for(self) -> float:
        """Seconds since the last inbound frame."""
        return self.clock.monotonic() - self.last_inbound

    def stop(self, *, cancel_work: bool = True) -> None:
        """Nothing more is due on this socket. `cancel_work=False` lets the timer work that
        is running (the one closing the socket) finish."""
        self.stopped = True
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        if cancel_work and self.work is not None:
            self.work.cancel()

    # --- the timer ---------------------------------------------------------------------------

    def deadline(self) -> float:
        """When this socket next has something to do (monotonic)."""
        now = self.clock.monotonic()
        token_deadline = now + (self.token_expires_at - self.clock.now()).total_seconds()
        return min(
            self.next_heartbeat,
            self.last_inbound + self.intervals.connection_timeout,
            token_deadline,
            self.typing_until if self.typing_until is not None else math.inf,
            self.next_renewal,
        )

    def arm(self) -> None:
        """(Re)arm the timer for the earliest deadline."""
        if self.stopped:
            return
        if self.handle is not None:
            self.handle.cancel()
        self.handle = self.clock.call_at(self.deadline(), self.fire)

    def fire(self) -> None:
        self.handle = None
        if self.work is None:  # else the running work re-arms when it ends
            self.work = asyncio.create_task(self.run_due())

    def take_due(self) -> frozenset[Due]:
        """What is due now; the deadlines of what is due move on. An idle socket or an expired
        token is the end: nothing is due after it."""
        now = self.clock.monotonic()
        if now >= self.last_inbound + self.intervals.connection_timeout:
            self.stopped = True
            return frozenset({Due.IDLE})
        if self.clock.now() >= self.token_expires_at:
            self.stopped = True
            return frozenset({Due.TOKEN_EXPIRED})
        due = set()
        if self.typing_until is not None and now >= self.typing_until:
            self.typing_until = None
            due.add(Due.TYPING_EXPIRED)
        if now >= self.next_heartbeat:
            self.next_heartbeat = now + self.intervals.heartbeat
            due.add(Due.HEARTBEAT)
        if now >= self.next_renewal:
            self.next_renewal = now + self.intervals.group_renewal
            due.add(Due.RENEWAL)
        return frozenset(due)

    async def run_due(self) -> None:
        try:
            due = self.take_due()
            # Armed for the next deadline before the work: what the work sends is never
            # seen before the timer that follows it is set.
            self.arm()
            if due:
                await self.on_due(due)
        except Exception:
            logger.exception("timer work failed")
        finally:
            self.work = None
            if self.handle is None:  # fired again while the work ran
                self.arm()
