"""chat.dispatching: a socket's two event sources handed to the consumer one at a time, in
order per source, as Channels' `await_many_dispatch` does (the consumer tests drive it end to
end; these pin its contract)."""

from __future__ import annotations

import asyncio

import pytest
from channels.exceptions import StopConsumer

from chat.dispatching import dispatch_events


def source(queue: asyncio.Queue):
    return queue.get


async def test_events_of_each_source_arrive_in_order_one_dispatch_at_a_time():
    socket, channel = asyncio.Queue(), asyncio.Queue()
    seen: list[tuple[str, int]] = []
    running = 0

    async def dispatch(event):
        nonlocal running
        running += 1
        assert running == 1  # never two at once
        await asyncio.sleep(0)
        seen.append(event)
        running -= 1
        if len(seen) == 200:
            raise StopConsumer

    for n in range(100):
        socket.put_nowait(("socket", n))
        channel.put_nowait(("channel", n))
    with pytest.raises(StopConsumer):
        await asyncio.wait_for(dispatch_events([source(socket), source(channel)], dispatch), 5)
    for name in ("socket", "channel"):
        assert [n for kind, n in seen if kind == name] == list(range(100))


async def test_a_source_that_fails_ends_the_loop_with_its_error_and_cancels_the_other():
    channel_reads: list[asyncio.Task] = []

    async def broken():
        await asyncio.sleep(0)  # fails once the other source is waiting
        raise RuntimeError("layer gone")

    async def waiting():
        channel_reads.append(asyncio.current_task())
        await asyncio.sleep(3600)

    async def dispatch(event):
        raise AssertionError("nothing to dispatch")

    with pytest.raises(RuntimeError, match="layer gone"):
        await asyncio.wait_for(dispatch_events([broken, waiting], dispatch), 5)
    assert channel_reads and all(task.cancelled() for task in channel_reads)


async def test_an_idle_loop_waits_then_dispatches_what_comes():
    queue = asyncio.Queue()
    got = []

    async def dispatch(event):
        got.append(event)
        if event == "last":
            raise StopConsumer

    loop_task = asyncio.create_task(dispatch_events([source(queue)], dispatch))
    for _ in range(10):  # the loop runs and finds nothing: it waits
        await asyncio.sleep(0)
    assert got == [] and not loop_task.done()
    for event in ("a", "b", "last"):
        queue.put_nowait(event)
        for _ in range(10):
            await asyncio.sleep(0)
    with pytest.raises(StopConsumer):
        await asyncio.wait_for(loop_task, 5)
    assert got == ["a", "b", "last"]
