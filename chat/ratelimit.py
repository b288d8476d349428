"""Rate limits shared by every socket and worker, through the shared state (chat/shared_state/):
a user's frames, bytes, assistant questions and analyses, and connection attempts per user
and per client address (chat/budgets.py says which rule counts what).

In the manner of Zulip's rate limiter: the rule is data, the answer is `(limited,
retry_after)`. The window is rolling, estimated from two fixed windows (the current count
plus the previous window's count weighted by how much of it still overlaps), so each frame
costs one atomic increment (of its `cost`: 1, or its size in bytes). What the limit refuses
is not counted against it (as the original), but counts toward the abuse threshold that
closes the socket, estimated over the same rolling window.

On Redis that increment is one script round trip made on the event loop, with no thread
(chat/shared_state/redis.py says why); in memory it runs inline.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from chat.shared_state import shared_state

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rule:
    seconds: int
    max_requests: int
    # More than max_requests * close_factor frames (accepted or refused) in the rolling window
    # is abuse: close the socket.
    close_factor: int = 3


@dataclass(frozen=True)
class Verdict:
    limited: bool
    retry_after: int = 0
    abusive: bool = False


def _retry_after(*, rule: Rule, previous: int, current: int, elapsed: float, cost: int = 1) -> int:
    """Seconds until `cost` more would fit under the rolling estimate."""
    seconds, limit = rule.seconds, rule.max_requests
    if cost > limit:
        return 2 * seconds  # never fits in one window; the caller caps what it charges
    if current + cost <= limit and previous > 0:
        wait = seconds * (1 - (limit - current - cost) / previous) - elapsed
    else:
        # Only once this window is over, and its own weight has decayed enough.
        decay = seconds * (1 - (limit - cost) / current) if current > 0 else 0.0
        wait = (seconds - elapsed) + max(decay, 0.0)
    return max(1, math.ceil(wait))


async def rate_limit_hit(
    *, key: str, rule: Rule, cost: int = 1, now: float | None = None
) -> Verdict:
    """Count `cost` (one frame, or that many bytes) for `key` and say whether it is over the
    rule; what is over is not counted, but counts toward the abuse threshold."""
    now = time.time() if now is None else now
    window = int(now // rule.seconds)
    elapsed = now - window * rule.seconds
    ttl = rule.seconds * 2 + 1
    accepted_key = f"rl:{key}:{window}"
    state = shared_state()
    current, previous = await state.acount(
        accepted_key, cost, ttl=ttl, also_read=f"rl:{key}:{window - 1}"
    )
    estimate = previous * (1 - elapsed / rule.seconds) + current
    if estimate <= rule.max_requests:
        return Verdict(limited=False)
    current, _ = await state.acount(accepted_key, -cost, ttl=ttl)
    refused, previous_refused = await state.acount(
        f"rl:{key}:{window}:refused", cost, ttl=ttl, also_read=f"rl:{key}:{window - 1}:refused"
    )
    # Abuse is judged on the same rolling estimate as the limit, accepted and refused alike:
    # a burst that straddles two fixed windows is still one burst.
    sent = (previous + previous_refused) * (1 - elapsed / rule.seconds) + current + refused
    return Verdict(
        limited=True,
        retry_after=_retry_after(
            rule=rule, previous=previous, current=current, elapsed=elapsed, cost=cost
        ),
        abusive=sent > rule.max_requests * rule.close_factor,
    )
