"""Which workers are alive: each worker's liveness key and the cache epoch, in the shared
state (chat/shared_state/).

Each worker refreshes `worker:<id>` every CHAT_REAP_INTERVAL seconds with a CHAT_WORKER_TTL
lifetime (chat/worker.py); a worker whose key is missing is dead, and its sessions are
reaped. A missing key means "dead" only if the store could have kept it. Two faults make
every key vanish while the workers live, and then liveness is unknown until each live worker
has had a full CHAT_WORKER_TTL to mark itself again:

- The store lost its data (Redis restarted without persistence, flushed): seen by the
  epoch. `workers:epoch` (no expiry) is written, together with `workers:warmup` (expiring
  after CHAT_WORKER_TTL) in one step, by the first worker that finds it missing; while the
  epoch is missing or the warmup key still there, liveness is unknown.
- The store was unreachable or stalled for a worker (keys expire on Redis's clock
  meanwhile): a read slower than CHAT_REAP_INTERVAL proves nothing (LivenessUnknown), and
  chat/worker.py suspends its reaping for CHAT_WORKER_TTL after any failed or slow call.

In memory (one process, no Redis) other processes cannot see these keys: only this
process's own key is there, and the epoch does not apply (`liveness_is_shared()`).

The functions are synchronous: callers on the event loop run them in a thread.
"""

from __future__ import annotations

import logging
import time

from django.conf import settings

from chat.shared_state import shared_state

logger = logging.getLogger(__name__)

# The epoch: present while the store has kept its data; the warmup key, written with it,
# expires CHAT_WORKER_TTL later (by then every live worker has marked itself again).
EPOCH_KEY = "workers:epoch"
WARMUP_KEY = "workers:warmup"


class LivenessUnknown(Exception):
    """Missing liveness keys cannot be trusted now (the store lost its data or stalled)."""


def liveness_key(worker_id: str) -> str:
    return f"worker:{worker_id}"


def liveness_is_shared() -> bool:
    """Whether other processes can see this process's liveness key (Redis, not memory)."""
    return shared_state().shared


def epoch_begin() -> None:
    """Start a new epoch (the store lost its data): the warmup key and the epoch, both or
    neither, so no worker sees an epoch without its warmup."""
    shared_state().add_many(
        {
            WARMUP_KEY: (1, settings.CHAT_WORKER_TTL),
            EPOCH_KEY: (int(time.time()), None),
        }
    )


def worker_mark_alive(*, worker_id: str) -> None:
    """Refresh `worker_id`'s key (and start a new epoch if the store lost its data)."""
    state = shared_state()
    state.set(liveness_key(worker_id), time.time(), ttl=settings.CHAT_WORKER_TTL)
    if state.shared and not state.get_many([EPOCH_KEY]):
        logger.warning("liveness epoch missing (Redis restarted or flushed?): new epoch")
        epoch_begin()


def workers_dead(*, worker_ids: set[str]) -> set[str]:
    """The workers among these whose liveness key is missing; LivenessUnknown when missing
    keys prove nothing (a new epoch, or a read slow enough for keys to have expired while
    their workers' refreshes waited)."""
    state = shared_state()
    keys = [liveness_key(worker_id) for worker_id in worker_ids]
    if not state.shared:
        found = state.get_many(keys)
    else:
        started = time.monotonic()
        found = state.get_many([EPOCH_KEY, WARMUP_KEY, *keys])
        if EPOCH_KEY not in found:
            epoch_begin()
            raise LivenessUnknown("liveness epoch missing: the store lost its data")
        if WARMUP_KEY in found:
            raise LivenessUnknown("new liveness epoch: workers are still marking themselves alive")
        if time.monotonic() - started > settings.CHAT_REAP_INTERVAL:
            raise LivenessUnknown("liveness read too slow: the store stalled")
    return {worker_id for worker_id in worker_ids if liveness_key(worker_id) not in found}
