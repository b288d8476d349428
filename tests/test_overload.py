"""Overload is visible (chat/overload.py): a late event loop, a storage backlog or late room
frames count in `clarity_overload_ticks_total` and log a warning, at most one per
WARNING_EVERY; a worker keeping up stays quiet. The ticks are given their lag and time here:
nothing blocks the loop or waits for time to pass."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from prometheus_client import REGISTRY

from chat.overload import WARNING_EVERY, DeliveryDelays, OverloadWatch, watch_overload


def overload_ticks() -> float:
    return REGISTRY.get_sample_value("clarity_overload_ticks_total")


def watch_of(backlog: int = 0, delays: DeliveryDelays | None = None) -> OverloadWatch:
    return OverloadWatch(store_backlog=lambda: backlog, delays=delays or DeliveryDelays())


def test_a_worker_keeping_up_is_quiet(caplog, settings):
    settings.CHAT_OVERLOAD_LAG = 0.1
    settings.CHAT_OVERLOAD_BACKLOG = 10
    watch = watch_of(backlog=10)
    before = overload_ticks()
    with caplog.at_level(logging.WARNING, logger="chat.overload"):
        assert not any(watch.tick(lag=lag, now=n * 0.5) for n, lag in enumerate([0, 0.05, 0.1]))
    assert overload_ticks() == before
    assert not caplog.records


def test_a_late_event_loop_is_counted_and_logged_once(caplog, settings):
    settings.CHAT_OVERLOAD_LAG = 0.1
    watch = watch_of()
    before = overload_ticks()
    with caplog.at_level(logging.WARNING, logger="chat.overload"):
        assert watch.tick(lag=0.3, now=0)
        assert watch.tick(lag=0.2, now=0.8)
        assert not watch.tick(lag=0, now=1.3)
    assert overload_ticks() == before + 2
    [record] = caplog.records
    assert record.getMessage().startswith("worker overloaded: event loop 300 ms late")


def test_messages_waiting_to_be_stored_count_as_overload(caplog, settings):
    settings.CHAT_OVERLOAD_BACKLOG = 10
    watch = watch_of(backlog=11)
    before = overload_ticks()
    with caplog.at_level(logging.WARNING, logger="chat.overload"):
        assert all(watch.tick(lag=0, now=n * 0.5) for n in range(3))
        assert len(caplog.records) == 1  # one warning per WARNING_EVERY, not one per tick
        assert watch.tick(lag=0, now=WARNING_EVERY)
    assert overload_ticks() == before + 4
    assert len(caplog.records) == 2
    assert "11 messages waiting to be stored" in caplog.text


def test_room_frames_delivered_late_count_as_overload(caplog, settings):
    settings.CHAT_OVERLOAD_LAG = 0.1
    delays = DeliveryDelays()
    delays.delivered(sent_at=time.time() - 0.5)  # queued half a second on its way here
    watch = watch_of(delays=delays)
    with caplog.at_level(logging.WARNING, logger="chat.overload"):
        assert watch.tick(lag=0, now=0)
        assert not watch.tick(lag=0, now=0.5)  # counted once: taken, then reset
    assert "room frames delivered up to 5" in caplog.text


async def test_the_watch_runs_on_the_event_loop(caplog, settings):
    settings.CHAT_OVERLOAD_BACKLOG = 10
    looked = asyncio.Event()

    def backlog() -> int:
        looked.set()
        return 11

    before = overload_ticks()
    with caplog.at_level(logging.WARNING, logger="chat.overload"):
        task = asyncio.create_task(
            watch_overload(store_backlog=backlog, delays=DeliveryDelays(), interval=0.01)
        )
        try:
            await asyncio.wait_for(looked.wait(), 10)  # a tick is one synchronous step
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert overload_ticks() >= before + 1
    assert "11 messages waiting to be stored" in caplog.text


def test_the_longest_event_loop_lag_is_kept():
    watch = watch_of()
    for lag in (0.02, 0.4, 0.1, 0):
        watch.tick(lag=lag, now=0)
    assert REGISTRY.get_sample_value("clarity_event_loop_lag_max_seconds") == 0.4
