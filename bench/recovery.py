"""What a protocol client keeps of its room to recover after a reconnect (protocol §15), for
the `restart` scenario: the browser client's rules (chat/static/chat/connection.js) in
Python, plus the measurement's own account.

The client's rules: `contiguous` is the highest seq up to which it has seen every room event
(from the ack's `last_seq` at the first join, then messages and history entries); it fetches
`history` `after_seq: contiguous`, page after page, after a reconnect, on `resync`, and when
a gap (a seq beyond contiguous + 1) is still open GAP_WAIT after it opened; one catch-up at a
time; a catch-up refused by a budget is asked again after `retry_after`; messages whose echo
has not come are sent again after a reconnect with the same client `message_id`; reconnects
wait a capped exponential backoff with jitter.

The measurement's account counts only what arrived: `held` is the highest seq up to which a
message arrived for every seq (the client's `contiguous` also moves over seqs a last page did
not show, as messages gone meanwhile: none are in the bench, so any difference is a gap).
"""

from __future__ import annotations

import collections
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from chat.protocol import HISTORY_MAX_LIMIT

BACKOFF_BASE = 0.2  # s: the first retry comes 0.1-0.2 s after the close
BACKOFF_CAP = 2.0  # s
GAP_WAIT = 1.0  # s a gap may stay open before it is fetched (frames may come out of order)
RATE_LIMITED_CLOSE = 4029
# The `scope` of the rate-limit refusals a catch-up read can get.
CATCH_UP_REFUSALS = {None, "catch_up", "bytes"}


def backoff_delay(
    attempt: int, *, rate_limited: bool = False, rng: Callable[[], float] = random.random
) -> float:
    """Seconds before reconnect `attempt` (0 first): "equal jitter", half the step fixed and
    half random, so clients that dropped together do not come back together; the step doubles
    up to BACKOFF_CAP, and is the cap at once after a rate-limit close."""
    step = BACKOFF_CAP if rate_limited else min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt)
    return step / 2 + rng() * step / 2


def seq_of(value: Any) -> int | None:
    """A room event's seq, or None (a frame of no room event)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def latest_seq(message: dict) -> int | None:
    """The seq of a message's latest event: its last change, else its creation."""
    return seq_of(message.get("changed_seq")) or seq_of(message.get("seq"))


@dataclass(frozen=True)
class CatchUp:
    """A catch-up page awaited: asked after `after`; `target` is caught up once pages end."""

    request_id: str
    after: int
    target: int


@dataclass
class RoomView:
    """One user's view of its room across its sockets: the client's rules and the account."""

    user_id: str = ""
    sessions: int = 0  # connection_acks received
    # The client's rules.
    contiguous: int = 0
    seen: set[int] = field(default_factory=set)  # seqs beyond contiguous + 1
    target: int = 0  # the room's last seq, as the server last said (ack, resync)
    gap: tuple[int, float] | None = None  # (the missing seq, since when) of an open gap
    request: CatchUp | None = None
    retry_at: float = 0.0  # a refused catch-up is asked again from then
    unacknowledged: dict[str, str] = field(default_factory=dict)  # client id -> frame sent
    # The account.
    baseline: int = 0  # the room's last seq at the first join: every later event is due
    held: int = 0  # a message arrived for every seq up to this
    arrived: set[int] = field(default_factory=set)  # seqs beyond held + 1 that arrived
    by_seq: dict[int, str] = field(default_factory=dict)  # seq -> stored id, beyond baseline
    clients: dict[tuple[str, str], str] = field(default_factory=dict)  # (author, client id)
    acknowledged: dict[str, tuple[str, int]] = field(default_factory=dict)  # own: id, seq
    redelivered: int = 0  # a stored id again (normal: a live frame and a page overlap)
    duplicates: int = 0  # one client message under a second stored id
    seq_clashes: int = 0  # two stored ids with one seq
    catch_ups: int = 0
    catch_up_refused: int = 0
    gap_fetches: int = 0
    # This session: when it joined (None while closed), the room's last seq in its ack, and
    # when every event up to that had arrived.
    joined_at: float | None = None
    session_target: int = 0
    caught_up_at: float | None = None
    # Reconnects.
    away: bool = False  # closed, and not yet back and caught up
    attempts: int = 0
    refusals: collections.Counter = field(default_factory=collections.Counter)
    closes: collections.Counter = field(default_factory=collections.Counter)

    # --- frames -----------------------------------------------------------------------------

    def joined(self, ack: dict, now: float) -> None:
        self.user_id = ack.get("user_id") or self.user_id
        last_seq = seq_of((ack.get("server_info") or {}).get("last_seq")) or 0
        if self.sessions == 0:
            self.baseline = self.held = last_seq
            self.advance_to(last_seq, now)
        self.sessions += 1
        self.joined_at, self.session_target, self.caught_up_at = now, last_seq, None
        self.resync(last_seq)

    def closed(self, code: int) -> None:
        self.closes[str(code)] += 1
        self.joined_at = None
        self.request = None
        self.gap = None
        self.retry_at = 0.0

    def message_seen(self, message: dict, now: float) -> bool:
        """Whether this message is new to the view."""
        seq, stored = seq_of(message.get("seq")), str(message.get("message_id"))
        client_id = message.get("client_message_id")
        if message.get("user_id") == self.user_id and client_id and seq is not None:
            self.unacknowledged.pop(client_id, None)
            self.acknowledged.setdefault(client_id, (stored, seq))
        new = self.account(seq, stored, message.get("user_id"), client_id)
        self.note_seq(seq, now)
        return new

    def page_seen(self, page: dict, now: float) -> int:
        """How many of the page's messages are new to the view."""
        new = 0
        for message in page.get("messages") or []:
            new += self.message_seen(message, now)
            self.note_seq(seq_of(message.get("changed_seq")), now)
        if self.request is not None and page.get("request_id") == self.request.request_id:
            self.caught_up_to(page, now)
        return new

    def resync(self, last_seq: Any) -> None:
        self.target = max(self.target, seq_of(last_seq) or 0)

    def refused(self, error: dict, now: float) -> None:
        """A catch-up read refused by a budget is asked again once the server says it fits."""
        details = error.get("details") or {}
        retry_after = details.get("retry_after")
        if error.get("error_code") != "RATE_LIMIT_EXCEEDED" or not retry_after:
            return
        if self.request is None or details.get("scope") not in CATCH_UP_REFUSALS:
            return
        self.catch_up_refused += 1
        self.request = None
        self.retry_at = now + float(retry_after)

    # --- the client's rules -----------------------------------------------------------------

    def note_seq(self, seq: int | None, now: float) -> None:
        if seq is None or seq <= self.contiguous:
            return
        self.seen.add(seq)
        self.advance_to(self.contiguous, now)

    def advance_to(self, seq: int, now: float) -> None:
        self.contiguous = max(self.contiguous, seq)
        self.seen = {known for known in self.seen if known > self.contiguous}
        while self.contiguous + 1 in self.seen:
            self.contiguous += 1
            self.seen.discard(self.contiguous)
        if not self.seen:
            self.gap = None
        elif self.gap is None or self.contiguous >= self.gap[0]:
            self.gap = (self.contiguous + 1, now)  # each gap gets its own wait

    def catch_up_request(self, now: float) -> dict | None:
        """The `history` frame to send now, if any (and it is then awaited)."""
        if self.joined_at is None or self.request is not None or now < self.retry_at:
            return None
        behind = self.contiguous < self.target
        gap_due = self.gap is not None and now - self.gap[1] >= GAP_WAIT
        if not behind and not gap_due:
            return None
        self.gap_fetches += not behind
        self.catch_ups += 1
        # Whatever the server stored before it reads this page is in it (or in the next).
        target = max(self.target, *self.seen) if self.seen else self.target
        self.request = CatchUp(f"catch-up-{self.catch_ups}", self.contiguous, target)
        return {
            "type": "history",
            "after_seq": self.contiguous,
            "limit": HISTORY_MAX_LIMIT,
            "request_id": self.request.request_id,
        }

    def caught_up_to(self, page: dict, now: float) -> None:
        """A catch-up page arrived: every event up to its last entry's seq has been seen;
        after the last page, seqs up to the request's target that no entry showed are gone."""
        request, self.request = self.request, None
        assert request is not None
        messages = page.get("messages") or []
        if messages:
            self.advance_to(latest_seq(messages[-1]) or request.after, now)
        if not (page.get("has_more") and messages):
            self.advance_to(request.target, now)

    # --- the account ------------------------------------------------------------------------

    def account(self, seq: int | None, stored: str, author: Any, client_id: Any) -> bool:
        if seq is None or seq <= self.baseline:
            return False
        known = self.by_seq.get(seq)
        if known is not None:
            self.redelivered += known == stored
            self.seq_clashes += known != stored
            return False
        self.by_seq[seq] = stored
        if client_id:
            first = self.clients.setdefault((str(author), str(client_id)), stored)
            self.duplicates += first != stored
        if seq > self.held:
            self.arrived.add(seq)
            while self.held + 1 in self.arrived:
                self.held += 1
                self.arrived.discard(self.held)
        return True

    def caught_up(self, now: float) -> bool:
        """Whether this session has just become caught up: every event up to its ack's last
        seq has arrived."""
        if self.joined_at is None or self.caught_up_at is not None:
            return False
        if self.held < self.session_target:
            return False
        self.caught_up_at = now
        return True

    def settled(self) -> bool:
        """Nothing more expected: open, caught up, no gap, no catch-up or echo awaited."""
        return (
            self.joined_at is not None
            and not self.away
            and self.request is None
            and not self.seen
            and not self.unacknowledged
        )

    def report(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline,
            "held": self.held,
            "highest": max(self.by_seq, default=self.baseline),
            "ids": list(self.by_seq.values()),
            "sessions": self.sessions,
            "attempts": self.attempts,
            "refusals": dict(self.refusals),
            "closes": dict(self.closes),
            "joined_at": self.joined_at,
            "caught_up_at": self.caught_up_at,
            "away": self.away,
            "unacknowledged": len(self.unacknowledged),
            "acknowledged": list(self.acknowledged.values()),
            "redelivered": self.redelivered,
            "duplicates": self.duplicates,
            "seq_clashes": self.seq_clashes,
            "catch_ups": self.catch_ups,
            "catch_up_refused": self.catch_up_refused,
            "gap_fetches": self.gap_fetches,
        }
