"""Overload is visible (chat/overload.py): a late event loop or a storage backlog counts in
`clarity_overload_ticks_total` and logs a warning; a worker keeping up stays quiet."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from prometheus_client import REGISTRY

from chat.overload import DeliveryDelays, watch_overload


async def watched(
    backlog: list[int],
    seconds: float,
    *,
    block: float = 0.0,
    delays: DeliveryDelays | None = None,
) -> int:
    """Run the watch for `seconds` (blocking the loop for `block` s once); ticks counted."""
    delays = delays or DeliveryDelays()
    before = REGISTRY.get_sample_value("clarity_overload_ticks_total")
    task = asyncio.create_task(
        watch_overload(store_backlog=lambda: backlog[0], delays=delays, interval=0.05)
    )
    await asyncio.sleep(0.02)
    if block:
        time.sleep(block)  # the worker busy with something else: the loop cannot run
    await asyncio.sleep(seconds)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return int(REGISTRY.get_sample_value("clarity_overload_ticks_total") - before)


async def test_a_worker_keeping_up_is_quiet(caplog, settings):
    with caplog.at_level(logging.WARNING, logger="chat.overload"):
        assert await watched([0], 0.3) == 0
    assert not caplog.records


async def test_a_late_event_loop_is_counted_and_logged_once(caplog, settings):
    settings.CHAT_OVERLOAD_LAG = 0.1
    with caplog.at_level(logging.WARNING, logger="chat.overload"):
        assert await watched([0], 0.2, block=0.3) >= 1
    [record] = caplog.records
    assert record.getMessage().startswith("worker overloaded: event loop")


async def test_messages_waiting_to_be_stored_count_as_overload(caplog, settings):
    settings.CHAT_OVERLOAD_BACKLOG = 10
    with caplog.at_level(logging.WARNING, logger="chat.overload"):
        assert await watched([11], 0.3) >= 3
    assert len(caplog.records) == 1  # one warning per WARNING_EVERY, not one per tick
    assert "11 messages waiting to be stored" in caplog.text


async def test_room_frames_delivered_late_count_as_overload(caplog, settings):
    settings.CHAT_OVERLOAD_LAG = 0.1
    delays = DeliveryDelays()
    delays.delivered(sent_at=time.time() - 0.5)  # queued half a second on its way here
    with caplog.at_level(logging.WARNING, logger="chat.overload"):
        assert await watched([0], 0.3, delays=delays) == 1  # counted once: taken, then reset
    assert "room frames delivered up to 5" in caplog.text
