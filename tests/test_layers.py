"""The in-memory channel layer of the embedded default (chat/layers.py): channels' semantics,
with drops for full channels counted and logged instead of silent."""

from __future__ import annotations

import logging

import pytest
from channels.exceptions import ChannelFull
from prometheus_client import REGISTRY

from chat.layers import InMemoryChannelLayer


async def test_group_send_gives_every_member_its_own_copy():
    layer = InMemoryChannelLayer(capacity=10)
    await layer.group_add("room.a", "one!x")
    await layer.group_add("room.a", "two!y")
    await layer.group_send("room.a", {"type": "chat.frame", "text": "hi"})
    first, second = await layer.receive("one!x"), await layer.receive("two!y")
    assert first == second == {"type": "chat.frame", "text": "hi"}
    first["text"] = "changed"
    assert second["text"] == "hi"


async def test_a_full_member_queue_drops_visibly_and_the_others_still_receive(caplog):
    layer = InMemoryChannelLayer(capacity=2)
    await layer.group_add("room.a", "slow!x")
    await layer.group_add("room.a", "fast!y")
    before = REGISTRY.get_sample_value("clarity_layer_dropped_total")
    with caplog.at_level(logging.WARNING, logger="chat.layers"):
        for n in range(3):
            await layer.group_send("room.a", {"type": "chat.frame", "text": str(n)})
            if n < 2:
                await layer.receive("fast!y")
    assert REGISTRY.get_sample_value("clarity_layer_dropped_total") - before == 1
    assert "1 of group room.a's members missed a chat.frame event (capacity 2)" in caplog.text
    assert [(await layer.receive("slow!x"))["text"] for _ in range(2)] == ["0", "1"]
    assert (await layer.receive("fast!y"))["text"] == "2"
    with pytest.raises(ChannelFull):
        await layer.send("slow!x", {"type": "a"})
        await layer.send("slow!x", {"type": "b"})
        await layer.send("slow!x", {"type": "c"})


async def test_expired_messages_and_memberships_are_cleaned_at_most_once_per_interval():
    layer = InMemoryChannelLayer(capacity=10, expiry=0, group_expiry=0, clean_interval=3600)
    await layer.group_add("room.a", "gone!x")
    await layer.send("gone!x", {"type": "a"})
    await layer.group_send("room.a", {"type": "b"})  # first clean: the message has expired
    assert "gone!x" not in layer.groups.get("room.a", {})
    await layer.group_add("room.a", "gone!x")
    await layer.group_send("room.a", {"type": "c"})  # within the interval: no scan
    assert "gone!x" in layer.groups["room.a"]
