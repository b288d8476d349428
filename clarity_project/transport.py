"""daphne's HTTP and WebSocket factories as this project's workers run them (clarity_project/
serve.py puts them in place of daphne's own). What they add, below the ASGI application:

- **Request heads have a deadline** (`HeadDeadlineChannel`): a request's headers must all
  arrive within CHAT_HANDSHAKE_TIMEOUT of its first byte, or the connection is aborted.
  Twisted's own idle timeout restarts on every byte, so a client trickling one header line
  every few seconds held a connection (and its memory) open for as long as it liked.
- **Close reasons reach the client** (`WorkerWebSocketProtocol.handle_reply`): daphne 4.2
  drops the `reason` of the application's `websocket.close` (django/daphne#374).
- **Unsent output is bounded** (protocol §16): past CHAT_MAX_OUTBOUND_BUFFER the socket gets
  `SLOW_CONSUMER` and close 4009, aborted if that has not gone through within
  CHAT_SLOW_CLOSE_TIMEOUT; see `WorkerWebSocketProtocol`.
- **Protocol violations are closed with their code** (1009, 1007, 1002) instead of
  autobahn's default of dropping the TCP connection (the client would see 1006).
- **No Twisted access log**, which daphne shows from verbosity 2 and which writes the whole
  URI, query string included: serve.py's `access_log` is the only one.
- **Frames are written together, at the end of the event loop's turn**
  (`WorkerWebSocketProtocol.sendData`): Twisted buffers every write and registers the socket
  for writability, so each frame to an idle connection cost two `epoll_ctl` calls and a trip
  through the reactor before its `send` (a third of the event loop's time in a reconnect
  storm, where a join sends ~20 frames); and one `send` per frame was still a sixth of it.
  An open socket's frames are held for the rest of the turn (up to `HELD_BYTES_MAX`) and
  written as one `send` (a join's `system` + `user_joined`, a batch of deliveries); when
  nothing is waiting in Twisted's buffer they are sent directly; whatever the kernel does
  not take goes to Twisted's buffer as before, so order, backpressure and the outbound
  bound are unchanged. This reads Twisted's `FileDescriptor` internals (`dataBuffer`, `offset`,
  `_tempDataLen`, `_writeDisconnected`; `writeSomeData` is its documented per-class hook)
  and autobahn's `send_queue`: no public API says "nothing is buffered", and daphne gives no
  hook below the protocol.
- **No pretty-printing for a debug log that is off** (`quiet_autobahn_pformat`): autobahn
  formats its whole configuration with `pprint.pformat` for a `log.debug` call on every new
  WebSocket, whether debug logging is on or not (~0.2 ms a connection, an eighth of the
  event loop's time in a reconnect storm). autobahn's module-level `pformat` is replaced by
  one that formats only while autobahn logs at debug level (txaio's global level).

Settings are read once, when daphne builds the factories.
"""

from __future__ import annotations

import asyncio
import pprint
import time
from typing import Any

import txaio
from daphne.http_protocol import HTTPFactory
from daphne.ws_protocol import WebSocketFactory, WebSocketProtocol
from twisted.internet.interfaces import IPushProducer
from twisted.web.http import HTTPChannel, _GenericHTTPChannelProtocol
from zope.interface import implementer

from chat import metrics
from chat.protocol import Close, encode, error_frame

# Held frames are written as soon as they pass this many bytes, whatever the turn.
HELD_BYTES_MAX = 64 * 1024


def quiet_autobahn_pformat() -> None:
    """Make autobahn's `pformat` format only when its debug logging is on (every use in
    `autobahn.websocket.protocol` feeds a debug log or a timings dump)."""
    import autobahn.websocket.protocol as autobahn_protocol

    if getattr(autobahn_protocol.pformat, "quiet", False):
        return

    def pformat(obj: Any, *args: Any, **kwargs: Any) -> str:
        if txaio.get_global_log_level() in ("debug", "trace"):
            return pprint.pformat(obj, *args, **kwargs)
        return "(not formatted: autobahn's debug logging is off)"

    pformat.quiet = True  # type: ignore[attr-defined]
    autobahn_protocol.pformat = pformat


class HeadDeadlineChannel(HTTPChannel):
    """Twisted's HTTP/1.1 channel with an absolute deadline for each request head: from its
    first byte, all its headers must arrive within `head_timeout` seconds, or the connection
    is aborted. (A connection that sends nothing is Twisted's idle timeout's.) Once a head is
    complete the deadline is off: the body, the response and a WebSocket that takes the
    connection over have their own limits."""

    def __init__(self, head_timeout: float):
        super().__init__()
        self.head_timeout = head_timeout
        self.awaiting_head = True
        self.head_deadline: Any = None

    def dataReceived(self, data: bytes) -> None:
        if self.awaiting_head and self.head_deadline is None:
            self.head_deadline = self.callLater(self.head_timeout, self.head_too_slow)
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self.awaiting_head = False
        self.cancel_deadline()
        super().allHeadersReceived()

    def requestDone(self, request: Any) -> None:
        # Before Twisted reads the next request's buffered bytes, if any (it may well do so
        # within this call); a connection that is not kept alive reads no further head.
        self.awaiting_head = self.persistent
        super().requestDone(request)

    def connectionLost(self, reason: Any) -> None:
        self.cancel_deadline()
        super().connectionLost(reason)

    def cancel_deadline(self) -> None:
        if self.head_deadline is not None:
            if self.head_deadline.active():
                self.head_deadline.cancel()
            self.head_deadline = None

    def head_too_slow(self) -> None:
        self.head_deadline = None
        metrics.HEAD_TIMEOUTS.inc()
        # Abort, not close: nothing of ours is waiting to be sent, and a polite close would
        # wait on the same client.
        self.transport.abortConnection()


class WorkerHTTPFactory(HTTPFactory):
    """daphne's HTTP factory, its connections on `HeadDeadlineChannel`, without Twisted's
    access log."""

    def __init__(self, *args: Any, **kwargs: Any):
        from django.conf import settings

        super().__init__(*args, **kwargs)
        self.head_timeout = settings.CHAT_HANDSHAKE_TIMEOUT

    def protocol(self) -> _GenericHTTPChannelProtocol:
        """What `buildProtocol` makes per connection: Twisted's own choice between HTTP/1.1
        and HTTP/2 (ALPN) around our channel instead of the stock one. (Twisted's factory
        makes it with `_genericHTTPChannelProtocolFactory`, which names `HTTPChannel`; the
        wrapper class is private, its constructor takes the channel.)"""
        return _GenericHTTPChannelProtocol(HeadDeadlineChannel(self.head_timeout))

    def log(self, request: Any) -> None:
        pass


@implementer(IPushProducer)
class WorkerWebSocketProtocol(WebSocketProtocol):
    """daphne's WebSocket protocol with close reasons and a bound on unsent output.

    The bound is measured where the bytes wait: the protocol is the producer registered on its
    Twisted transport (in place of the HTTP channel that handed the connection over, which
    has nothing left to do with it). Twisted calls `pauseProducing` when its write buffer
    passes `bufferSize` (64 KiB: the kernel's send buffer is full too) and `resumeProducing`
    only once that buffer has drained completely. While paused, every frame the application
    sends is counted; the bytes counted since the pause are bytes the client has not taken
    yet, give or take what it took without draining the buffer. Past the bound the socket is
    closed for slowness (`close_slow`) and every later frame of the application is discarded,
    never buffered. Until then a frame costs one boolean test.
    """

    # frames of this event-loop turn, not written yet (`sendData`), and their size
    held: list[bytes] | None = None
    held_bytes = 0
    write_paused = False
    sent_while_paused = 0
    # monotonic time at which the bound was passed; None while it has not been
    slow_since: float | None = None
    slow_abort: Any = None  # the grace's end (a Twisted delayed call)

    def connectionMade(self) -> None:
        super().connectionMade()
        if self.factory.max_outbound_buffer:
            self.transport.unregisterProducer()
            self.transport.registerProducer(self, True)

    # --- IPushProducer: Twisted's write buffer speaking -----------------------------------

    def pauseProducing(self) -> None:
        self.write_paused = True

    def resumeProducing(self) -> None:
        if self.slow_since is None:
            self.write_paused = False
            self.sent_while_paused = 0

    def stopProducing(self) -> None:
        """The connection is gone; `onClose` follows."""

    # --- the application's replies ---------------------------------------------------------

    def handle_reply(self, message: dict) -> None:
        if message["type"] == "websocket.close" and self.state != self.STATE_CONNECTING:
            code = message.get("code") or 1000
            self.sendClose(code=code, reason=message.get("reason") or None)
            return
        super().handle_reply(message)

    def serverSend(self, content: str | bytes, binary: bool = False) -> None:
        if self.write_paused and not self.within_bound(len(content)):
            return
        super().serverSend(content, binary)

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        """autobahn's, with the frames of an open socket held until the end of the event
        loop's turn and written together (`flush_frames`); the handshake's answers, and
        anything autobahn sends synchronously or in chops, go out as daphne and Twisted order
        them, behind what is held."""
        if self.state == self.STATE_OPEN and not sync and not chopsize and not self.send_queue:
            if self.held is None:
                self.held = [data]
                self.held_bytes = len(data)
                asyncio.get_running_loop().call_soon(self.flush_frames)
                return
            self.held.append(data)
            self.held_bytes += len(data)
            if self.held_bytes >= HELD_BYTES_MAX:
                self.flush_frames()
            return
        self.flush_frames()
        super().sendData(data, sync, chopsize)

    def flush_frames(self) -> None:
        """Write what this turn held, at once if nothing is waiting in Twisted's buffer."""
        held, self.held = self.held, None
        if not held:
            return
        data = held[0] if len(held) == 1 else b"".join(held)
        data = self.write_now(data)
        if data:
            super().sendData(data)

    def _closeConnection(self, abort: bool = False) -> None:
        """A clean close writes what is held first (Twisted flushes its own buffer)."""
        if not abort:
            self.flush_frames()
        super()._closeConnection(abort)

    def write_now(self, data: bytes) -> bytes:
        """Send what the kernel takes now if Twisted's buffer is empty (else nothing: order);
        what is left, for Twisted's buffer."""
        transport = self.transport
        if (
            not transport.connected
            or transport.disconnecting
            or getattr(transport, "_writeDisconnected", True)
            or getattr(transport, "TLS", True)
            or transport._tempDataLen
            or len(transport.dataBuffer) != transport.offset
        ):
            return data
        written = transport.writeSomeData(data)
        if isinstance(written, int) and written > 0:
            return data[written:]
        return data  # nothing taken, or the connection is lost: Twisted's buffer finds out

    def within_bound(self, size: int) -> bool:
        if self.slow_since is not None:
            return False
        self.sent_while_paused += size
        if self.sent_while_paused <= self.factory.max_outbound_buffer:
            return True
        if self.state != self.STATE_OPEN:
            return True  # closing already: autobahn refuses the frame (`Disconnected`)
        self.close_slow()
        return False

    def close_slow(self) -> None:
        """Tell the client (behind everything it has not read) and close 4009; abort the
        connection, dropping its buffer, if it is still there after the grace."""
        self.slow_since = time.monotonic()
        close = Close.SLOW_CONSUMER.value
        metrics.ERRORS.labels(close.error).inc()
        metrics.CLOSES.labels(close.code).inc()
        # autobahn's own close-handshake timeout would abort too, but it rounds its delays to
        # whole seconds; this socket's grace is its own timer's.
        self.closeHandshakeTimeout = 0
        self.sendMessage(encode(error_frame(close.error)).encode())
        self.sendClose(code=close.code, reason=close.reason)
        # (txaio is autobahn's handle on the running reactor, which daphne chose.)
        self.slow_abort = txaio.call_later(
            self.factory.slow_close_timeout, self.transport.abortConnection
        )

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.slow_since is not None:
            if self.slow_abort.active():
                self.slow_abort.cancel()
            metrics.SLOW_CLOSES.labels("clean" if wasClean else "aborted").inc()
            metrics.SLOW_CLOSE_SECONDS.observe(time.monotonic() - self.slow_since)
            # The application learns why (its session records it), whatever the client did.
            code = Close.SLOW_CONSUMER.value.code
        super().onClose(wasClean, code, reason)


class WorkerWebSocketFactory(WebSocketFactory):
    """daphne's WebSocket factory: `WorkerWebSocketProtocol`, the outbound bound from settings
    (0: none), and protocol violations closed with their code."""

    protocol = WorkerWebSocketProtocol

    def __init__(self, *args: Any, **kwargs: Any):
        from django.conf import settings

        super().__init__(*args, **kwargs)
        quiet_autobahn_pformat()
        self.setProtocolOptions(failByDrop=False)
        self.max_outbound_buffer = max(settings.CHAT_MAX_OUTBOUND_BUFFER, 0)
        self.slow_close_timeout = settings.CHAT_SLOW_CLOSE_TIMEOUT
