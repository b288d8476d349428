"""The `assistant_delta` frames of one answer being written (protocol §14).

The model's pieces are fed in as they arrive (`write`, never waiting); a sender task sends
what may be shown (chat/assistant/streamed_text.py StreamText: sanitised and capped) as one
frame, then waits ASSISTANT_STREAM_INTERVAL before the next, so a fast model costs the room
at most one frame per interval per answer, and a slow channel layer never slows the reading
of the model. `finish` sends what completes the stored text as the last delta; on failure the
deltas just stop. The stored message that follows carries `metadata.stream_id`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from chat import metrics
from chat.assistant.streamed_text import StreamText
from chat.protocol import MessageType, frame

logger = logging.getLogger(__name__)

Emit = Callable[[dict[str, Any]], Awaitable[None]]

# Clients drop a stream's partial text after ASSISTANT_FIRST_CHUNK_TIMEOUT plus this many
# seconds without a frame of it (`stream_idle_timeout`): a live stream's next piece is
# awaited no longer than that timeout, and its end (the stored message) follows at once, so
# only a stream whose worker died goes that long without a frame.
STREAM_IDLE_SLACK = 5.0


class DeltaStream:
    def __init__(
        self,
        *,
        kind: Literal["reply", "analysis"],
        room_id: str | None,
        in_reply_to: str | None,
        emit: Emit,
        interval: float,
    ) -> None:
        self.stream_id = uuid.uuid4().hex
        self.kind = kind
        self.room_id = room_id
        self.in_reply_to = in_reply_to
        self.emit = emit
        self.interval = interval
        self.text = StreamText()
        self.index = 0
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        self._sender: asyncio.Task | None = None
        # A delta that could not be sent stops the stream (the stored message still comes).
        self._broken = False

    def write(self, piece: str) -> None:
        """A piece of the answer as the model wrote it (chat.assistant.base.OnText)."""
        self.text.feed(piece)
        if self._sender is None and not self._closing.is_set():
            self._sender = asyncio.create_task(self._send_loop())
        self._wake.set()

    async def _send_loop(self) -> None:
        while not self._closing.is_set():
            await self._wake.wait()  # set by `write`, and by `finish`
            self._wake.clear()
            await self._send(self.text.take())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.interval)

    async def _send(self, delta: str) -> None:
        if not delta or self._broken:
            return
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
            return
        metrics.ASSISTANT_DELTAS.labels(self.kind).inc()

    async def finish(self, *, final: str | None) -> None:
        """The answer is complete (`final`, its stored text) or failed (None): stop the
        sender after the frame it is sending, then send what completes `final`."""
        self._closing.set()
        self._wake.set()  # a sender waiting for the next piece stops too
        if self._sender is not None:
            await self._sender
        if final is not None:
            await self._send(self.text.take() + self.text.rest(final))

    def cancel(self) -> None:
        """Stop at once (the answer's task is being cancelled)."""
        self._closing.set()
        if self._sender is not None:
            self._sender.cancel()
