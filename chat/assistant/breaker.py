"""A circuit breaker per provider, shared by every worker through the shared state
(chat/shared_state/).

Closed: calls go through; each failure increments a counter and any success resets it.
After settings.ASSISTANT_BREAKER_FAILURES consecutive failures it opens: calls are refused,
with no request to the provider, for settings.ASSISTANT_BREAKER_RESET seconds. Then it is
half-open: the one caller that wins an atomic `add` makes a trial call while the others
are still refused; the trial's success closes the breaker, its failure opens it again.

The open period is stored as a deadline (wall-clock time) rather than as a key's expiry, so
the breaker's clock is the callers' (`now`), on either backend.
A trial claim expires after max(reset, ASSISTANT_TIMEOUT), so a trial caller that vanished
without reporting holds the breaker half-open no longer than that.

The functions are synchronous calls; `Guard` runs them with asyncio.to_thread for async
callers (chat/assistant/base.py `ask`), so the event loop never waits on Redis.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from django.conf import settings

from chat.shared_state import shared_state
from chat.timers import Clock, LoopClock

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Permit:
    allowed: bool
    # This call is the half-open trial.
    trial: bool = False
    # Seconds until the breaker will let a trial through (refused calls only).
    retry_after: float = 0.0


def _keys(name: str) -> tuple[str, str, str]:
    prefix = f"assistant-breaker:{name}"
    return f"{prefix}:failures", f"{prefix}:open-until", f"{prefix}:trial"


def breaker_allow(*, name: str, now: float | None = None) -> Permit:
    """May a call to provider `name` go ahead?"""
    now = time.time() if now is None else now
    state = shared_state()
    failures_key, open_until_key, trial_key = _keys(name)
    found = state.get_many([failures_key, open_until_key])
    if int(found.get(failures_key, 0)) < settings.ASSISTANT_BREAKER_FAILURES:
        return Permit(allowed=True)
    # A missing deadline (not yet written by the failing call) counts as elapsed.
    open_until = float(found.get(open_until_key, 0.0))
    if now < open_until:
        return Permit(allowed=False, retry_after=open_until - now)
    trial_ttl = max(settings.ASSISTANT_BREAKER_RESET, settings.ASSISTANT_TIMEOUT)
    if state.add(trial_key, now, ttl=trial_ttl):
        return Permit(allowed=True, trial=True)
    return Permit(allowed=False, retry_after=settings.ASSISTANT_BREAKER_RESET)


def breaker_record_success(*, name: str) -> None:
    """Close the breaker: the provider answered."""
    failures_key, _, trial_key = _keys(name)
    shared_state().delete_many([failures_key, trial_key])


def breaker_record_failure(*, name: str, now: float | None = None) -> None:
    """Count a failure; open the breaker (again) once there are enough in a row."""
    now = time.time() if now is None else now
    state = shared_state()
    failures_key, open_until_key, trial_key = _keys(name)
    # No expiry: "consecutive" spans any quiet period, and only a success resets the count.
    failures, _ = state.count(failures_key, 1, ttl=None)
    if failures >= settings.ASSISTANT_BREAKER_FAILURES:
        state.set(open_until_key, now + settings.ASSISTANT_BREAKER_RESET, ttl=None)
        state.delete_many([trial_key])


class Guard:
    """A provider's breaker as the async assistant code uses it: the calls above run in a
    thread, and time comes from `clock` (tests move it by hand)."""

    def __init__(self, *, name: str, clock: Clock | None = None) -> None:
        self.name = name
        self.clock: Clock = clock or LoopClock()

    def _now(self) -> float:
        return self.clock.now().timestamp()

    async def admit(self) -> Permit:
        """May a call go ahead? Unknown state (shared state unreachable) raises."""
        return await asyncio.to_thread(breaker_allow, name=self.name, now=self._now())

    async def record(self, *, ok: bool) -> None:
        """The call's outcome; a failure to record it is logged, not raised."""
        try:
            if ok:
                await asyncio.to_thread(breaker_record_success, name=self.name)
            else:
                await asyncio.to_thread(breaker_record_failure, name=self.name, now=self._now())
        except Exception:
            logger.warning("circuit breaker update failed for %s", self.name, exc_info=True)
