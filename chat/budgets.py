"""What a client's traffic costs its user (protocol §16): every inbound frame is paid for.

- Frames: every frame counts toward the user's message rate limit (CHAT_MESSAGE_RATE_LIMIT),
  refused ones included (binary, over the size limit, not JSON, unknown type, invalid),
  except one heartbeat per second per socket, and only a heartbeat small enough to be one.
- Catch-up reads (`history` with `after_seq`, protocol §15) count toward their own allowance
  (CHAT_CATCH_UP_RATE_LIMIT) instead: a frame small enough to be one that names `after_seq`
  is charged there before it is decoded, and charged as a frame after all if it turns out to
  be anything else.
- Bytes: every inbound frame's size, and every history reply's, counts toward the user's
  byte budget (CHAT_INBOUND_BYTES_PER_MINUTE). A socket adds its frames up and charges them
  once they reach `BYTES_PER_CHARGE`, so a chat frame costs no extra round trip; a history
  reply is charged whole before it is sent, and refused if it does not fit.
- Connection attempts: per user and per client address (CHAT_CONNECT_RATE_LIMIT,
  CHAT_CONNECT_RATE_LIMIT_PER_ADDRESS), checked before any join work.

Every counter is one of chat/ratelimit.py's rolling windows in the shared state: the user's
sockets on every worker spend from one budget. A rule of None is off.
"""

from __future__ import annotations

from dataclasses import dataclass

from chat import metrics
from chat.ratelimit import Rule, Verdict, rate_limit_hit
from chat.timers import Clock

# A socket charges its inbound bytes in lumps of at least this many (a frame this large or
# larger is charged at once). What one socket can spend unseen by its others is below it.
BYTES_PER_CHARGE = 4096
# Larger than any heartbeat a client sends (~70 bytes): a larger one is charged as a frame.
HEARTBEAT_MAX_SIZE = 512
# Larger than any catch-up read a client sends (~120 bytes): a larger one is charged as a frame.
CATCH_UP_MAX_SIZE = 512
# Larger than any `read` a client sends (~40 bytes): a larger one is charged as a frame.
READ_MAX_SIZE = 128
# One heartbeat per this many seconds per socket is free.
FREE_HEARTBEAT_SPACING = 1.0


@dataclass(frozen=True)
class Budgets:
    """The rules, from settings (chat/context.py's SocketConfig)."""

    frames: Rule
    bytes: Rule | None
    catch_up: Rule | None
    connects_per_user: Rule | None
    connects_per_address: Rule | None
    reads: Rule | None = None  # `read` frames (protocol §12): apart from the rate limit


@dataclass(frozen=True)
class Refusal:
    """Over a budget: the frame (or reply) is refused; `abusive`: close 4029."""

    retry_after: int
    abusive: bool
    # The budget's name, sent as details.scope: None for the message rate limit (the v1
    # frame, `{retry_after}` only).
    scope: str | None

    def details(self) -> dict:
        details: dict = {"retry_after": self.retry_after}
        if self.scope is not None:
            details["scope"] = self.scope
        return details


def _refusal(verdict: Verdict, *, budget: str, scope: str | None) -> Refusal | None:
    if not verdict.limited:
        return None
    metrics.RATE_LIMITED.labels(budget).inc()
    return Refusal(retry_after=verdict.retry_after, abusive=verdict.abusive, scope=scope)


class SocketBudget:
    """One socket's spending from its user's budgets (state on the consumer instance)."""

    def __init__(self, *, user_id: str, budgets: Budgets, clock: Clock) -> None:
        self.user_id = user_id
        self.budgets = budgets
        self.clock = clock
        self.unpaid_bytes = 0
        self.free_heartbeat_from = float("-inf")

    def small_enough_for_heartbeat(self, size: int) -> bool:
        return size <= HEARTBEAT_MAX_SIZE

    def may_catch_up(self, text: str | None, *, size: int) -> bool:
        """Whether a frame may be a catch-up read, to be paid from that allowance (a
        substring search, no decoding: `frame` charges it after all if it is not one)."""
        return (
            self.budgets.catch_up is not None
            and text is not None
            and size <= CATCH_UP_MAX_SIZE
            and '"after_seq"' in text
        )

    def may_be_read(self, text: str | None, *, size: int) -> bool:
        """Whether a frame may be a `read`, to be paid from that allowance (a substring
        search, no decoding: `frame` charges it after all if it is not one)."""
        return (
            self.budgets.reads is not None
            and text is not None
            and size <= READ_MAX_SIZE
            and '"read"' in text
        )

    async def inbound(
        self, *, size: int, heartbeat: bool, catch_up: bool = False, read: bool = False
    ) -> Refusal | None:
        """Pay for one inbound frame of `size` bytes, before anything else is done with it;
        `heartbeat`: it is a well-formed heartbeat (free if the last free one was at least a
        second ago); `catch_up`: it may be a catch-up read (`may_catch_up`); `read`: it may be
        a `read` (`may_be_read`). A Refusal: the
        frame must be dropped."""
        self.unpaid_bytes += size
        if self.budgets.bytes is not None and self.unpaid_bytes >= BYTES_PER_CHARGE:
            refusal = await self._charge_bytes(self.unpaid_bytes)
            self.unpaid_bytes = 0
            if refusal is not None:
                return refusal
        if heartbeat:
            now = self.clock.monotonic()
            if now >= self.free_heartbeat_from:
                self.free_heartbeat_from = now + FREE_HEARTBEAT_SPACING
                return None
        if catch_up and self.budgets.catch_up is not None:
            verdict = await rate_limit_hit(
                key=f"catch_up:{self.user_id}", rule=self.budgets.catch_up
            )
            return _refusal(verdict, budget="catch_up", scope="catch_up")
        if read and self.budgets.reads is not None:
            verdict = await rate_limit_hit(key=f"read:{self.user_id}", rule=self.budgets.reads)
            return _refusal(verdict, budget="read", scope="read")
        return await self.frame()

    async def frame(self) -> Refusal | None:
        """Count one frame toward the user's message rate limit."""
        verdict = await rate_limit_hit(key=f"user:{self.user_id}", rule=self.budgets.frames)
        return _refusal(verdict, budget="frames", scope=None)

    async def reply(self, *, size: int) -> Refusal | None:
        """Pay for a reply of `size` bytes (a history page) before it is sent."""
        if self.budgets.bytes is None:
            return None
        return await self._charge_bytes(size)

    async def _charge_bytes(self, size: int) -> Refusal | None:
        verdict = await rate_limit_hit(
            key=f"bytes:{self.user_id}", rule=self.budgets.bytes, cost=size
        )
        return _refusal(verdict, budget="bytes", scope="bytes")


async def connect_refused(*, rule: Rule | None, budget: str, key: str) -> bool:
    """Count one connection attempt of `key` (a user, an address); whether it is over."""
    if rule is None:
        return False
    verdict = await rate_limit_hit(key=f"connect:{budget}:{key}", rule=rule)
    return _refusal(verdict, budget=budget, scope=budget) is not None
