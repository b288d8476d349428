"""The `assistant_delta` frames of the answers being written (protocol §14).

The model's pieces are fed in as they arrive (`DeltaStream.write`, never waiting): what may
be shown of them (chat/assistant/streamed_text.py StreamText: sanitised and capped) goes out
as one frame — the first at once (the time to the first words), the next ones when it is the
reply's turn. The replies streaming from this worker to one group (a room; a user's sockets
for analysis narratives) take turns (`DeltaTurns`): every ASSISTANT_STREAM_INTERVAL, the
next of them with new text sends it all as one frame. So a reply alone in its room gets a
frame per interval, and a room where n replies stream at once still gets one frame per
interval from this worker (each reply one every n intervals): what the room's sockets are
sent while answers are written is bounded by the interval, not by how many people ask at
once. Every frame goes to every socket of the group, so in a room of many sockets the turns
are further apart: what the deltas cost (frames x sockets) stays within
ASSISTANT_STREAM_DELIVERIES a second, the turns at most MAX_TURN_INTERVAL apart. A slow
channel layer slows the turns,
never the reading of the model. `finish` sends what completes the stored text as the last
delta; on failure, what the model had written before it (and not yet sent) goes out and the
deltas stop. The stored message that follows carries
`metadata.stream_id`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from django.conf import settings

from chat import metrics
from chat.assistant.streamed_text import StreamText
from chat.protocol import MessageType, frame
from chat.timers import Clock

logger = logging.getLogger(__name__)

Emit = Callable[[dict[str, Any]], Awaitable[None]]

# Clients drop a stream's partial text after ASSISTANT_FIRST_CHUNK_TIMEOUT plus this many
# seconds without a frame of it (`stream_idle_timeout`): a live stream's next piece is
# awaited no longer than that timeout, and its end (the stored message) follows at once, so
# only a stream whose worker died goes that long without a frame.
STREAM_IDLE_SLACK = 5.0

# The longest wait between two turns of a group, whatever its size: with the worker's
# ASSISTANT_MAX_CONCURRENCY (8) replies taking turns, each still gets a frame every 8 s,
# well within the clients' stream_idle_timeout.
MAX_TURN_INTERVAL = 1.0


class DeltaStream:
    def __init__(
        self,
        *,
        kind: Literal["reply", "analysis"],
        room_id: str | None,
        in_reply_to: str | None,
        emit: Emit,
        group: str,
        turns: DeltaTurns,
        sockets: int,
    ) -> None:
        self.stream_id = uuid.uuid4().hex
        self.kind = kind
        self.room_id = room_id
        self.in_reply_to = in_reply_to
        self.emit = emit
        self.group = group
        self.turns = turns
        self.sockets = sockets  # the group's sockets when the answer started: a frame's cost
        self.text = StreamText()
        self.index = 0
        self.fresh = False  # written to since its last frame
        self._lock = asyncio.Lock()  # one frame at a time, in order
        self._first: asyncio.Task | None = None
        self._joined = False
        # A delta that could not be sent stops the stream (the stored message still comes).
        self._broken = False

    def write(self, piece: str) -> None:
        """A piece of the answer as the model wrote it (chat.assistant.base.OnText)."""
        self.text.feed(piece)
        self.fresh = True
        if not self._joined:
            self._joined = True
            self.turns.join(self)
            # The first words go at once, out of turn.
            self._first = asyncio.create_task(self.send_new())

    async def send_new(self) -> bool:
        """Send what may be shown beyond what was sent; whether a frame went."""
        async with self._lock:
            self.fresh = False
            return await self._send(self.text.take())

    async def _send(self, delta: str) -> bool:
        if not delta or self._broken:
            return False
        payload = frame(
            MessageType.ASSISTANT_DELTA,
            stream_id=self.stream_id,
            room_id=self.room_id,
            kind=self.kind,
            in_reply_to=self.in_reply_to,
            index=self.index,
            delta=delta,
        )
        self.index += 1
        try:
            await self.emit(payload)
        except Exception:
            self._broken = True
            logger.warning("assistant stream %s stopped: a delta was not sent", self.stream_id)
            return False
        metrics.ASSISTANT_DELTAS.labels(self.kind).inc()
        return True

    async def finish(self, *, final: str | None) -> None:
        """The answer is complete (`final`, its stored text) or failed (None): no more turns;
        after the frame being sent, if any, send what completes `final`, or (failed) what
        had come before the failure: it does not depend on whether a turn fell between the
        model's last piece and its failure."""
        self.turns.leave(self)
        async with self._lock:
            await self._send(self.text.take() + ("" if final is None else self.text.rest(final)))

    def cancel(self) -> None:
        """Stop at once (the answer's task is being cancelled)."""
        self.turns.leave(self)
        if self._first is not None:
            self._first.cancel()


class DeltaTurns:
    """This worker's streams, by the group they stream to (one per event loop): in each
    group, every ASSISTANT_STREAM_INTERVAL (longer for a group of many sockets: `interval`),
    the stream that has waited longest among those with new text sends one frame."""

    def __init__(self, *, clock: Clock) -> None:
        self.clock = clock  # the turns' pace (the worker's clock; a manual one in tests)
        self.groups: dict[str, list[DeltaStream]] = {}
        self.tasks: set[asyncio.Task] = set()

    def join(self, stream: DeltaStream) -> None:
        streams = self.groups.get(stream.group)
        if streams is None:
            streams = self.groups[stream.group] = []
            task = asyncio.create_task(self._take_turns(streams))  # ends once all have left
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        streams.append(stream)

    def leave(self, stream: DeltaStream) -> None:
        streams = self.groups.get(stream.group)
        if streams is None or stream not in streams:
            return
        streams.remove(stream)
        if not streams:
            del self.groups[stream.group]

    @staticmethod
    def interval(streams: list[DeltaStream]) -> float:
        """Seconds between two turns of a group: ASSISTANT_STREAM_INTERVAL, or, if its frames
        go to more sockets than ASSISTANT_STREAM_DELIVERIES allows at that pace, long enough
        to keep the deliveries within it (at most MAX_TURN_INTERVAL). Read each turn: a
        changed setting applies."""
        sockets = max((stream.sockets for stream in streams), default=0)
        paced = sockets / settings.ASSISTANT_STREAM_DELIVERIES
        return max(settings.ASSISTANT_STREAM_INTERVAL, min(paced, MAX_TURN_INTERVAL))

    async def _next_turn(self, streams: list[DeltaStream]) -> None:
        """Wait for the group's next turn (`interval`)."""
        due = asyncio.get_running_loop().create_future()
        handle = self.clock.call_at(
            self.clock.monotonic() + self.interval(streams),
            lambda: due.done() or due.set_result(None),
        )
        try:
            await due
        finally:
            handle.cancel()

    async def _take_turns(self, streams: list[DeltaStream]) -> None:
        while streams:
            await self._next_turn(streams)
            for stream in [s for s in streams if s.fresh]:
                if await stream.send_new():
                    if stream in streams:  # to the back of the line
                        streams.remove(stream)
                        streams.append(stream)
                    break
