"""End-to-end harness: real daphne workers as subprocesses, and a real WebSocket client.

`run_workers(tmp_path, count=N, env={...})` migrates one database, starts N daphne workers on
free loopback ports (all sharing that database and, when `REDIS_URL` is given, Redis), waits
until each accepts TCP connections, yields them, and always stops them (SIGTERM, then
SIGKILL). Workers start as in production, through `clarity_project.serve` (daphne with this
project's frame limit and access log), and log everything, at DEBUG for our own loggers, as
JSON lines. Each worker's stdout/stderr go to files under `tmp_path` (appended to, so a
restarted worker keeps its predecessor's lines); `Worker.logs()` reads them back for failure
messages, and the suite's log scan (tests/logscan.py) reads them at the end.

`Worker.env` is the exact environment the workers run with; `manage(...)` runs any
`manage.py` command with it (e.g. `createsuperuser` in the workers' database).

`ChatSocket` is a thin v1-protocol client over `websockets` (asyncio API) with bounded
timeouts on every wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from chat.devtokens import emulator_token
from tests.logscan import remember_sent

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
PROJECT_ID = "clarity-test"

# Environment of every server process (before the caller's overrides). Names mapped to None
# are removed from the inherited environment.
BASE_ENV: dict[str, str | None] = {
    "DEBUG": "1",
    "FIREBASE_AUTH_EMULATOR_HOST": "127.0.0.1:9099",
    "FIREBASE_PROJECT_ID": PROJECT_ID,
    "SECRET_KEY": "e2e-only-secret-key",
    "DJANGO_SETTINGS_MODULE": "clarity_project.settings",
    "PYTHONUNBUFFERED": "1",
    "LOG_LEVEL": "DEBUG",
    "LOG_FORMAT": "json",
    "REDIS_URL": None,
    "FIREBASE_CREDENTIALS": None,
    "FIREBASE_CHECK_REVOKED": None,
    # v1 rooms (a room is made public on first join): these clusters test distribution,
    # not membership. Tests of membership across workers set it to "0" and make their rooms
    # through the HTTP API (tests/test_distributed.py).
    "CHAT_OPEN_ROOMS": "1",
}


class ServerError(RuntimeError):
    """A server process failed to start or to migrate; the message includes its output."""


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (held open together so none repeats)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((HOST, 0))
            ports.append(sock.getsockname()[1])
        return ports


def server_env(overrides: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """os.environ + BASE_ENV + overrides; a None value removes the variable."""
    env = dict(os.environ)
    for name, value in {**BASE_ENV, **(overrides or {})}.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def _tail(path: Path, limit: int = 6000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text if len(text) <= limit else "...\n" + text[-limit:]


@dataclass
class Worker:
    index: int
    port: int
    process: subprocess.Popen
    stdout_path: Path
    stderr_path: Path
    _files: list = field(default_factory=list, repr=False)
    # The worker's full environment (the one `migrate` ran with): for `manage(...)`.
    env: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def url(self) -> str:
        return f"ws://{HOST}:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def logs(self) -> str:
        return (
            f"--- worker {self.index} (pid {self.pid}, port {self.port}, "
            f"returncode {self.process.poll()}) stdout ---\n{_tail(self.stdout_path)}\n"
            f"--- worker {self.index} stderr ---\n{_tail(self.stderr_path)}"
        )

    def log_records(self) -> list[dict]:
        """The worker's JSON log records so far: complete lines only (it may be writing the
        last one right now)."""
        complete, _, _ = self.stderr_path.read_text().rpartition("\n")
        return [json.loads(line) for line in complete.splitlines()]

    def wait_listening(self, timeout: float) -> None:
        """Until the port accepts TCP connections; ServerError if the worker dies or stalls."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise ServerError(f"worker {self.index} exited during startup\n{self.logs()}")
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), 0.5):
                return
            if time.monotonic() >= deadline:
                raise ServerError(
                    f"worker {self.index} not listening on {self.port} after {timeout} s\n"
                    f"{self.logs()}"
                )
            time.sleep(0.05)

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)

    def reap(self, timeout: float = 10.0) -> int:
        """Wait for the worker to exit; SIGKILL it if it outlives `timeout`. Closes its logs."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        for file in self._files:
            file.close()
        self._files.clear()
        return self.process.returncode

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Signal the worker (SIGTERM: graceful shutdown) and reap it (SIGKILL if stuck)."""
        self.send_signal(sig)
        return self.reap(timeout)

    def kill(self) -> int:
        """SIGKILL (a crashed worker: no cleanup runs) and reap."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        return self.process.wait(10)


class WorkerPair:
    """Mixin of a test cluster of (at least) two workers: `a`, `b`, and all their logs."""

    workers: list[Worker]

    @property
    def a(self) -> Worker:
        return self.workers[0]

    @property
    def b(self) -> Worker:
        return self.workers[1]

    def logs(self) -> str:
        return "\n".join(worker.logs() for worker in self.workers)

    def assert_alive(self, workers: list[Worker] | None = None) -> None:
        """Every worker (or those given) still running; else the failure shows all logs."""
        for worker in self.workers if workers is None else workers:
            assert worker.alive(), f"worker {worker.index} exited\n{self.logs()}"


def manage(
    args: list[str],
    env: Mapping[str, str],
    log_path: Path,
    timeout: float = 120.0,
) -> str:
    """Run `manage.py <args>` with this environment; its output goes to `log_path` and is
    returned. ServerError (with the output) if it fails or outlives `timeout`."""
    name = args[0] if args else "manage.py"
    with log_path.open("wb") as out:
        try:
            result = subprocess.run(
                [sys.executable, "manage.py", *args],
                cwd=ROOT,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ServerError(f"{name} timed out after {timeout} s\n{_tail(log_path)}") from None
    if result.returncode != 0:
        raise ServerError(f"{name} failed ({result.returncode})\n{_tail(log_path)}")
    return log_path.read_text(errors="replace")


def migrate(env: Mapping[str, str], log_dir: Path, timeout: float = 120.0) -> None:
    manage(["migrate", "--noinput"], env, log_dir / "migrate.log", timeout)


def start_worker(index: int, port: int, env: Mapping[str, str], log_dir: Path) -> Worker:
    stdout_path = log_dir / f"worker{index}.out.log"
    stderr_path = log_dir / f"worker{index}.err.log"
    stdout, stderr = stdout_path.open("ab"), stderr_path.open("ab")
    try:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "clarity_project.serve",
                "-e",
                f"tcp:port={port}:interface={HOST}:backlog=1024",
                "-v",
                "1",
            ],
            cwd=ROOT,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
        )
    except BaseException:
        stdout.close()
        stderr.close()
        raise
    return Worker(index, port, process, stdout_path, stderr_path, [stdout, stderr], dict(env))


@contextlib.contextmanager
def run_workers(
    tmp_path: Path,
    *,
    count: int = 1,
    env: Mapping[str, str | None] | None = None,
    ports: list[int] | None = None,
    startup_timeout: float = 20.0,
    stop_timeout: float = 10.0,
) -> Iterator[list[Worker]]:
    """Migrate once, start `count` daphne workers sharing the configuration, yield them.

    Default database: a fresh SQLite file in `tmp_path`. Pass `REDIS_URL` (and a unique
    `REDIS_PREFIX`) in `env` for workers that share a channel layer and cache. Pass `ports`
    (from `free_ports`) when the environment must name them, e.g. in CHAT_ALLOWED_ORIGINS.
    """
    log_dir = Path(tmp_path)
    log_dir.mkdir(parents=True, exist_ok=True)
    overrides = dict(env or {})
    overrides.setdefault("DATABASE_URL", f"sqlite:///{log_dir / 'e2e.sqlite3'}")
    full_env = server_env(overrides)
    migrate(full_env, log_dir)
    workers: list[Worker] = []
    try:
        for index, port in enumerate(ports or free_ports(count)):
            workers.append(start_worker(index, port, full_env, log_dir))
        deadline = time.monotonic() + startup_timeout
        for worker in workers:
            worker.wait_listening(max(deadline - time.monotonic(), 0.5))
        yield workers
    finally:
        stop_all(workers, timeout=stop_timeout)


def stop_all(workers: list[Worker], timeout: float = 10.0) -> None:
    """SIGTERM every worker at once, wait for all (bounded), SIGKILL the stragglers."""
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for worker in workers:
        worker.reap(max(deadline - time.monotonic(), 0.1))


# --- client -----------------------------------------------------------------------------------


def token_for(uid: str, name: str | None = None, **kwargs: Any) -> str:
    """An emulator ID token the servers (FIREBASE_PROJECT_ID=clarity-test) accept."""
    name = name if name is not None else uid.title()
    return emulator_token(uid=uid, name=name, project_id=PROJECT_ID, **kwargs)


class ChatSocket:
    """One real WebSocket speaking the v1 protocol; every wait is bounded."""

    def __init__(self, connection: ClientConnection):
        self.connection = connection
        self.ack: dict | None = None
        self.presence: dict | None = None
        self.history: dict | None = None

    @classmethod
    async def open(
        cls,
        base_url: str,
        path: str,
        *,
        token: str | None = None,
        timeout: float = 5.0,
        **kwargs: Any,
    ) -> ChatSocket:
        url = base_url + path + (f"?token={token}" if token is not None else "")
        connection = await connect(url, open_timeout=timeout, close_timeout=2, proxy=None, **kwargs)
        return cls(connection)

    @classmethod
    async def join(
        cls, base_url: str, room: str, uid: str, name: str | None = None, *, path: str = ""
    ) -> ChatSocket:
        """Open with a valid token and read the join frames: ack, presence, history."""
        client = await cls.open(base_url, path or f"/api/v1/ws/{room}", token=token_for(uid, name))
        try:
            client.ack = await client.expect("connection_ack")
            client.presence = await client.expect("presence")
            client.history = await client.expect("history")
        except BaseException:
            await client.close()
            raise
        return client

    async def recv(self, timeout: float = 3.0) -> dict:
        message = await asyncio.wait_for(self.connection.recv(), timeout)
        assert isinstance(message, str), f"binary frame from the server: {message!r}"
        return json.loads(message)

    async def expect(self, type_: str, timeout: float = 3.0) -> dict:
        """The very next frame, which must be of this type."""
        frame = await self.recv(timeout)
        assert frame["type"] == type_, f"expected {type_}, got {frame}"
        return frame

    async def recv_type(self, type_: str, timeout: float = 3.0) -> dict:
        """The next frame of this type; frames of other types before it are skipped."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            frame = await self.recv(max(deadline - loop.time(), 0.01))
            if frame["type"] == type_:
                return frame

    async def expect_error(self, code: str, timeout: float = 3.0) -> dict:
        frame = await self.expect("error", timeout)
        assert frame["error_code"] == code, frame
        return frame

    async def expect_close(self, code: int, timeout: float = 3.0) -> ConnectionClosed:
        """The server closes next (no further frame) with this code."""
        try:
            frame = await self.recv(timeout)
        except ConnectionClosed as closed:
            assert closed.rcvd is not None, f"no close frame received: {closed!r}"
            assert closed.rcvd.code == code, f"close code {closed.rcvd.code}, expected {code}"
            return closed
        raise AssertionError(f"expected close {code}, got frame {frame}")

    async def expect_silence(self, timeout: float = 0.3) -> None:
        try:
            frame = await self.recv(timeout)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected frame {frame}")

    async def send(self, payload: Any) -> None:
        remember_sent(payload)
        await asyncio.wait_for(self.connection.send(json.dumps(payload)), 3)

    async def send_raw(self, data: str | bytes) -> None:
        remember_sent(data)
        await asyncio.wait_for(self.connection.send(data), 3)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.connection.close(), 5)
