"""A provider in a process of its own: the worker's side (`ProviderProcess`, one per event
loop) and the process's (`main`, run as `python -m chat.assistant.process`).

google-genai turns every server-sent event of a streamed answer into a pydantic
`GenerateContentResponse`: ~450 µs of CPU per event, measured; 8 answers at 50 events/s
are a fifth of a core, and on the worker's event loop (and GIL) every socket of the worker
waited behind them (bench `stream`: the room's chat p99 2.5x with 8 replies streaming; 1.5x
with a provider that parses nothing). So a provider named in `base.APART` (Gemini) runs in
a child process of the worker, which imports its SDK, calls it and sends back the answer's
text as it comes (batched: `Pieces`); the worker reads a JSON line per batch.

The worker keeps all that decides and bounds: the circuit breaker (`guard`), `ask`'s
timeouts (a stream cut short is cancelled in the child too), the assistant slots, the
quotas, the delta turns. The child only calls the provider, one task per answer.

The wire: JSON lines over the child's stdin and stdout (the child's own prints and logs go
to the worker's stderr, formatted and redacted as the worker's by its LOGGING). Worker to
child: the provider's settings first (`{"settings": {...}}`, every setting named
ASSISTANT_*, GEMINI_* or GOOGLE_*, and LOGGING), then `{"ask": id, "request": {...}}` and
`{"cancel": id}`. Child to worker: `{"ready": true}` once its provider is set up (or
`{"failed": reason}`), then for each answer its text `{"id": id, "text": text}` (the first
piece at once, then what came meanwhile every ASSISTANT_STREAM_INTERVAL / 2: `Pieces`) and
`{"id": id, "reply": {...}}` or `{"id": id, "error": reason}`.

The child runs ASSISTANT_PROCESS_NICENESS below the worker's CPU priority: when cores are
scarce, the chat's sockets come first and the answers slow down instead. It is started by
the first `prepare` (chat.worker.WorkerLifecycle calls it at the worker's first request,
so no question waits for it; `ask` calls it again, outside the time limits) and exits when
its stdin closes: the worker closes it (`close`), or dies. If it
dies, the answers it had fail (the room gets the apology) and the next question starts
another.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import logging.config
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from django.conf import settings

from chat.assistant.base import (
    AssistantError,
    AssistantReply,
    AssistantRequest,
    OnText,
    provider_class,
)
from chat.assistant.breaker import Guard
from chat.logs import bind_log_context
from chat.timers import Clock, LoopClock, TimerHandle

# By name: in the child this module runs as __main__.
logger = logging.getLogger("chat.assistant.process")

SETTINGS_PREFIXES = ("ASSISTANT_", "GEMINI_", "GOOGLE_")
# And the worker's logging: the child's records (and the SDK's warnings) come out on the
# worker's stderr in the same format, redacted alike (chat/logs.py).
SETTINGS_ALSO = ("LOGGING",)
# Longest line either side reads: a request carries the room's context (at most
# ASSISTANT_CONTEXT_MESSAGES messages of 2,000 characters); a piece is at most what one
# chunk of the model held (the provider refuses a reply of over 64,000 characters).
LINE_LIMIT = 4 * 1024 * 1024
# Seconds for a child to start: import its SDK (~1.5 s measured) and build its client.
START_TIMEOUT = 60.0
# Where `chat` is importable from (the child runs `python -m chat.assistant.process`).
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def provider_settings() -> dict[str, Any]:
    """The settings a provider reads, as this worker has them."""
    return {
        name: getattr(settings, name)
        for name in dir(settings)
        if (name.startswith(SETTINGS_PREFIXES) or name in SETTINGS_ALSO) and name.isupper()
    }


def request_from_json(data: dict[str, Any]) -> AssistantRequest:
    return AssistantRequest(
        **(data | {"context": [(name, text) for name, text in data["context"]]})
    )


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), default=str).encode() + b"\n"


class ProviderProcess:
    """The worker's side: an AssistantProvider whose `stream` runs in the child."""

    def __init__(self, *, provider: str) -> None:
        self.name = provider  # a key of base.PROVIDERS, run in the child
        self.guard = Guard(name=provider)
        self._process: asyncio.subprocess.Process | None = None
        self._starting: asyncio.Task | None = None
        self._answers: dict[int, asyncio.Queue[dict[str, Any]]] = {}
        self._ids = itertools.count()
        self._reader: asyncio.Task | None = None

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return None if self._process is None else self._process.pid

    async def prepare(self) -> None:
        """Start the child if it is not running (concurrent callers wait for one start)."""
        if self._process is not None and self._reader is not None and not self._reader.done():
            return
        if self._starting is None or self._starting.done():
            self._starting = asyncio.create_task(self._start())
        starting = self._starting
        await asyncio.shield(starting)

    async def _start(self) -> None:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "chat.assistant.process",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=PROJECT_ROOT,
            limit=LINE_LIMIT,
        )
        try:
            process.stdin.write(encode({"settings": provider_settings()}))
            async with asyncio.timeout(START_TIMEOUT):
                line = await process.stdout.readline()
            message = json.loads(line) if line else {"failed": "it exited"}
            if not message.get("ready"):
                raise AssistantError(
                    f"{self.name} process failed to start: {message.get('failed')}"
                )
        except BaseException:
            kill(process)
            raise
        self._process = process
        self._reader = asyncio.create_task(self._read(process))
        logger.info("%s process %s started", self.name, process.pid)

    async def _read(self, process: asyncio.subprocess.Process) -> None:
        reason = f"the {self.name} process stopped"
        try:
            while line := await process.stdout.readline():
                message = json.loads(line)
                answer = self._answers.get(message["id"])
                if answer is not None:
                    answer.put_nowait(message)
        except (ValueError, KeyError, TypeError) as exc:
            reason = f"the {self.name} process sent a bad line ({type(exc).__name__})"
        finally:
            self._stopped(process, reason)

    def _stopped(self, process: asyncio.subprocess.Process, reason: str) -> None:
        """The child is gone or unusable: fail its answers; the next question starts one."""
        kill(process)
        if self._process is process:
            self._process = None
            logger.warning(
                "%s (pid %s); %d answers failed", reason, process.pid, len(self._answers)
            )
            for answer in self._answers.values():
                answer.put_nowait({"error": reason})

    def _send(self, process: asyncio.subprocess.Process, message: dict[str, Any]) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            process.stdin.write(encode(message))

    async def stream(self, request: AssistantRequest, *, on_text: OnText) -> AssistantReply:
        process = self._process
        if process is None:
            raise AssistantError(f"the {self.name} process is not running")
        ident = next(self._ids)
        answer: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._answers[ident] = answer
        over = False
        try:
            self._send(process, {"ask": ident, "request": dataclasses.asdict(request)})
            while True:
                message = await answer.get()
                if "text" in message:
                    on_text(message["text"])
                    continue
                over = True
                if "reply" in message:
                    return AssistantReply(**message["reply"])
                raise AssistantError(message["error"])
        finally:
            del self._answers[ident]
            if not over and self._process is process:
                self._send(process, {"cancel": ident})  # cut short: the child stops too

    def close(self) -> None:
        """Stop the child (the worker is stopping, or this loop is done)."""
        process, self._process = self._process, None
        if process is not None:
            kill(process)


def kill(process: asyncio.subprocess.Process) -> None:
    """Kill the child and close its pipes (on the loop if it still runs; a test's may not)."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
    # asyncio.subprocess.Process has no public close: its transport's, else a warning when
    # it is collected, and file descriptors held until then.
    with contextlib.suppress(RuntimeError):
        process._transport.close()


# --- the child --------------------------------------------------------------------------------


class Pieces:
    """One answer's text on its way to the worker: the first piece at once (the first
    words), then what came meanwhile every `interval` (the worker's delta turns send a room
    a frame per ASSISTANT_STREAM_INTERVAL anyway): fewer lines for the worker to read than
    the model's pieces (50 a second each, measured at the bench's stub)."""

    def __init__(self, *, send: Callable[[str], None], interval: float, clock: Clock) -> None:
        self.send = send
        self.interval = interval
        self.clock = clock  # the child's loop; a manual one in tests
        self.pending: list[str] = []
        self.sent_any = False
        self.timer: TimerHandle | None = None

    def add(self, piece: str) -> None:
        if not self.sent_any:
            self.sent_any = True
            self.send(piece)
            return
        self.pending.append(piece)
        if self.timer is None:
            self.timer = self.clock.call_at(self.clock.monotonic() + self.interval, self.flush)

    def flush(self) -> None:
        self.cancel()
        if self.pending:
            text, self.pending = "".join(self.pending), []
            self.send(text)

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


async def serve(reader: asyncio.StreamReader, out: asyncio.StreamWriter) -> None:
    from django.conf import settings as django_settings

    def send(message: dict[str, Any]) -> None:
        out.write(encode(message))

    first = json.loads(await reader.readline())
    django_settings.configure(**first["settings"])
    logging.config.dictConfig(django_settings.LOGGING)
    logging.captureWarnings(True)
    bind_log_context(process="assistant")
    if django_settings.ASSISTANT_PROCESS_NICENESS > 0:
        os.nice(django_settings.ASSISTANT_PROCESS_NICENESS)
    try:
        provider = provider_class(django_settings.ASSISTANT_PROVIDER)()
        await provider.prepare()
    except Exception as exc:
        send({"failed": f"{type(exc).__name__}: {exc}"})
        await out.drain()
        return
    send({"ready": True})
    logger.info("%s process ready", provider.name)
    answers: dict[int, asyncio.Task] = {}
    clock = LoopClock()

    async def answer(ident: int, request: AssistantRequest) -> None:
        pieces = Pieces(
            send=lambda text: send({"id": ident, "text": text}),
            interval=django_settings.ASSISTANT_STREAM_INTERVAL / 2,
            clock=clock,
        )
        try:
            reply = await provider.stream(request, on_text=pieces.add)
        except AssistantError as exc:
            pieces.flush()
            send({"id": ident, "error": str(exc)})
        except Exception as exc:  # its type only, as `ask` reports it: no text of the SDK's
            pieces.flush()
            send({"id": ident, "error": f"{provider.name} call failed: {type(exc).__name__}"})
        else:
            pieces.flush()
            send({"id": ident, "reply": dataclasses.asdict(reply)})
        finally:
            pieces.cancel()
            answers.pop(ident, None)

    while line := await reader.readline():
        message = json.loads(line)
        if "ask" in message:
            ident = message["ask"]
            answers[ident] = asyncio.create_task(
                answer(ident, request_from_json(message["request"]))
            )
        elif (task := answers.get(message.get("cancel"))) is not None:
            task.cancel()
    for task in answers.values():  # the worker is gone
        task.cancel()


async def child_main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=LINE_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    wire = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # prints go to stderr, not the wire
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, wire)
    out = asyncio.StreamWriter(transport, protocol, None, loop)
    await serve(reader, out)


def main() -> None:
    # The worker's signals are the worker's: it closes this process's stdin when it goes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    asyncio.run(child_main())


if __name__ == "__main__":
    main()
