"""One suite for both shared-state backends (chat/shared_state/): every test here runs on
this process's memory and on a real Redis (127.0.0.1:6379, a prefix of its own), as
Django's `contrib.sessions` tests run one suite against each of its backends. Then what is
built on the API, on both: worker liveness and its epoch, the assistant's breaker.

Expiries are checked as what is left of a key's life (`expires_in`), never by waiting; the
memory backend's own expiry runs on an injected clock."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from chat.assistant.breaker import breaker_allow, breaker_record_failure, breaker_record_success
from chat.liveness import (
    EPOCH_KEY,
    WARMUP_KEY,
    LivenessUnknown,
    liveness_is_shared,
    worker_mark_alive,
    workers_dead,
)
from chat.shared_state import MemoryState, RedisState, SharedState
from chat.testing.redis_server import REDIS_URL, redis_answers
from tests.conftest import use_backend


@pytest.fixture(params=["memory", "redis"])
def state(request, settings) -> SharedState:
    backend = use_backend(request.param, settings)
    yield backend
    backend.clear()


@pytest.fixture
def redis_state(settings) -> SharedState:
    backend = use_backend("redis", settings)
    yield backend
    backend.clear()


# --- the API -------------------------------------------------------------------------------


def test_count_creates_adds_and_reads_the_other_counter(state):
    assert state.count("c", 1, ttl=10) == (1, 0)
    assert state.count("c", 2, ttl=10) == (3, 0)
    assert state.count("c", -1, ttl=10) == (2, 0)
    assert state.count("d", 5, ttl=10, also_read="c") == (5, 2)
    assert state.count("d", 0, ttl=10, also_read="missing") == (5, 0)


def test_a_counter_expires_ttl_after_its_creation_however_often_it_is_counted(state):
    state.count("c", 1, ttl=100)
    first = state.expires_in("c")
    assert 99 < first <= 100
    state.count("c", 1, ttl=1000)  # a later ttl does not extend it
    assert state.expires_in("c") <= first
    state.count("forever", 1, ttl=None)
    assert state.expires_in("forever") is None


async def test_acount_is_count_on_the_event_loop(state):
    assert await state.acount("c", 1, ttl=10) == (1, 0)
    assert await state.acount("c", 1, ttl=10, also_read="c") == (2, 2)
    assert state.count("c", 0, ttl=10) == (2, 0)
    assert 9 < state.expires_in("c") <= 10


async def test_concurrent_counts_are_atomic(state):
    async def hits(n: int) -> list[int]:
        return [(await state.acount("c", 1, ttl=10))[0] for _ in range(n)]

    values = [
        value for batch in await asyncio.gather(*(hits(25) for _ in range(4))) for value in batch
    ]
    assert sorted(values) == list(range(1, 101))


async def test_counts_of_one_turn_share_a_round_trip_and_keep_their_own_outcomes(redis_state):
    """On Redis a turn's counts go as one pipeline: each caller still gets its own value,
    a count Redis refuses fails alone, and a script cache Redis lost is loaded again."""
    redis_state.set("text", "not a number", ttl=10)
    redis_state.client.script_flush()  # as after a Redis restart
    outcomes = await asyncio.gather(
        *(redis_state.acount("c", 1, ttl=10) for _ in range(20)),
        redis_state.acount("text", 1, ttl=10),
        redis_state.acount("d", 5, ttl=10, also_read="c"),
        return_exceptions=True,
    )
    assert sorted(value for value, _ in outcomes[:20]) == list(range(1, 21))
    assert isinstance(outcomes[20], Exception)  # INCRBY of a string: that caller's error
    assert outcomes[21] == (5, 20)  # counted after the 20 before it in the same pipeline
    assert redis_state.count("c", 0, ttl=10) == (20, 0)


def test_add_sets_only_an_absent_key(state):
    assert state.add("k", "first", ttl=10)
    assert not state.add("k", "second", ttl=10)
    assert state.get_many(["k"]) == {"k": "first"}


def test_values_keep_their_json_type(state):
    state.set("int", 3, ttl=None)
    state.set("float", 1.5, ttl=None)
    state.set("str", "x", ttl=None)
    assert state.get_many(["int", "float", "str", "absent"]) == {
        "int": 3,
        "float": 1.5,
        "str": "x",
    }
    assert state.get_many([]) == {}


def test_set_replaces_value_and_expiry(state):
    state.set("k", 1, ttl=10)
    state.set("k", 2, ttl=None)
    assert state.get_many(["k"]) == {"k": 2}
    assert state.expires_in("k") is None


def test_add_many_writes_only_absent_keys_each_with_its_ttl(state):
    state.set("old", "kept", ttl=None)
    state.add_many({"old": ("new", 5), "a": (1, 5), "b": (2, None)})
    assert state.get_many(["old", "a", "b"]) == {"old": "kept", "a": 1, "b": 2}
    assert 4 < state.expires_in("a") <= 5
    assert state.expires_in("b") is None
    assert state.expires_in("old") is None


def test_delete_many_and_clear(state):
    for key in ("a", "b", "c"):
        state.set(key, 1, ttl=None)
    state.delete_many(["a", "b", "never-there"])
    state.delete_many([])
    assert state.get_many(["a", "b", "c"]) == {"c": 1}
    state.clear()
    assert state.get_many(["c"]) == {}
    with pytest.raises(KeyError):
        state.expires_in("c")


def test_backends_are_shared_only_on_redis(state):
    assert state.shared is isinstance(state, RedisState)
    assert liveness_is_shared() is state.shared


def test_redis_keys_stay_under_the_deployments_prefix():
    if not redis_answers():
        pytest.skip(f"no Redis at {REDIS_URL}")
    ours = RedisState(url=REDIS_URL, prefix=f"test-state-{uuid.uuid4().hex}")
    theirs = RedisState(url=REDIS_URL, prefix=f"test-state-{uuid.uuid4().hex}")
    try:
        ours.set("k", "ours", ttl=None)
        theirs.set("k", "theirs", ttl=None)
        ours.clear()
        assert ours.get_many(["k"]) == {}
        assert theirs.get_many(["k"]) == {"k": "theirs"}
    finally:
        theirs.clear()


def test_memory_keys_expire_on_its_clock():
    now = [1000.0]
    state = MemoryState(clock=lambda: now[0])
    state.count("c", 1, ttl=10)
    state.set("s", "x", ttl=5)
    state.add("forever", 1, ttl=None)
    now[0] += 5
    assert state.get_many(["c", "s", "forever"]) == {"c": 1, "forever": 1}
    now[0] += 5
    assert state.get_many(["c", "s", "forever"]) == {"forever": 1}
    assert state.count("c", 1, ttl=10) == (1, 0)  # a new counter, a new life
    assert state.expires_in("c") == 10
    assert state.add("s", "y", ttl=5)


# --- worker liveness -------------------------------------------------------------------------


def test_live_and_dead_workers(state, settings):
    settings.CHAT_WORKER_TTL = 30
    worker_mark_alive(worker_id="alive")
    if state.shared:
        # A fresh Redis: the first mark starts an epoch, and nobody can be called dead
        # until every worker has had a TTL to mark itself.
        with pytest.raises(LivenessUnknown, match="still marking"):
            workers_dead(worker_ids={"alive", "gone"})
        state.delete_many([WARMUP_KEY])  # the warmup is over
    assert workers_dead(worker_ids={"alive", "gone"}) == {"gone"}
    assert 29 < state.expires_in("worker:alive") <= 30


def test_a_store_that_lost_its_data_starts_a_new_epoch_and_reaps_nothing(redis_state):
    """Redis only: memory is this process's own, it cannot lose data under a live worker."""
    state = redis_state
    worker_mark_alive(worker_id="alive")
    state.clear()  # Redis restarted without persistence
    with pytest.raises(LivenessUnknown, match="epoch missing"):
        workers_dead(worker_ids={"alive"})
    found = state.get_many([EPOCH_KEY, WARMUP_KEY])
    assert set(found) == {EPOCH_KEY, WARMUP_KEY}
    with pytest.raises(LivenessUnknown, match="still marking"):
        workers_dead(worker_ids={"alive"})


# --- the assistant's circuit breaker -------------------------------------------------------------


def test_breaker_state_is_the_backends(state, settings):
    settings.ASSISTANT_BREAKER_FAILURES = 2
    settings.ASSISTANT_BREAKER_RESET = 60
    breaker_record_failure(name="p", now=1000)
    breaker_record_failure(name="p", now=1000)
    assert not breaker_allow(name="p", now=1030).allowed
    trial = breaker_allow(name="p", now=1061)
    assert trial.trial
    assert not breaker_allow(name="p", now=1061).allowed  # one trial at a time
    assert state.expires_in("assistant-breaker:p:trial") is not None
    breaker_record_success(name="p")
    assert breaker_allow(name="p", now=1062).allowed
    assert state.get_many(["assistant-breaker:p:failures"]) == {}
