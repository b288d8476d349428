"""The servers under test: fresh daphne processes on free loopback ports.

A `Deployment` is one measurement's servers: `workers` daphne processes of one server kind
(Clarity or the tutorial baseline), on one channel layer (in-memory or Redis), started fresh
and stopped afterwards. Clarity gets a fresh database copied from a migrated template (SQLite
for the in-memory layer, PostgreSQL with Redis), and Redis deployments a unique key prefix
whose keys are deleted afterwards.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
PROJECT_ID = "clarity-bench"
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("BENCH_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432")

# Per-user rate limit the benchmark sets: far above any offered per-user rate, so the load is
# never limited, while the limiter still runs (one cache increment per frame).
RATE_LIMIT = 100_000
RATE_WINDOW = 60


class ServerKind(StrEnum):
    BASELINE = "baseline"
    CLARITY = "clarity"

    def command(self, port: int) -> list[str]:
        """The daphne command line: Clarity as it is deployed (its launcher,
        `clarity_project.serve`: daphne plus the project's frame limits), the baseline with
        plain daphne; the same endpoint and verbosity for both."""
        options = ["-e", f"tcp:port={port}:interface={HOST}:backlog=1024", "-v", "0"]
        if self is ServerKind.BASELINE:
            return [sys.executable, "-m", "daphne", *options, "bench.baseline.asgi:application"]
        return [sys.executable, "-m", "clarity_project.serve", *options]


class Layer(StrEnum):
    MEMORY = "memory"
    REDIS = "redis"


class ServerError(RuntimeError):
    """A server failed to start; the message carries its output."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _tail(path: Path, limit: int = 3000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-limit:]


def base_env(overrides: Mapping[str, str | None]) -> dict[str, str]:
    """The server environment every kind shares; a None value removes the variable."""
    env = dict(os.environ)
    settings: dict[str, str | None] = {
        "DJANGO_SETTINGS_MODULE": "clarity_project.settings",
        "PYTHONUNBUFFERED": "1",
        "DEBUG": "1",  # emulator tokens require DEBUG (a system check)
        "SECRET_KEY": "bench-only-secret-key",
        "FIREBASE_AUTH_EMULATOR_HOST": "127.0.0.1:9099",
        "FIREBASE_PROJECT_ID": PROJECT_ID,
        "FIREBASE_CHECK_REVOKED": "0",
        "FIREBASE_CREDENTIALS": None,
        "ASSISTANT_MODE": "off",  # else the assistant answers every message
        "LOG_LEVEL": "WARNING",
        "CHAT_MESSAGE_RATE_LIMIT": str(RATE_LIMIT),
        "CHAT_RATE_LIMIT_WINDOW": str(RATE_WINDOW),
        "CHAT_MAX_CONNECTIONS_PER_USER": "3",
        "CHAT_ALLOW_NO_ORIGIN": "1",  # the generator sends no Origin, as native apps
        "CHAT_OPEN_ROOMS": "1",  # the generator's rooms are made public on first join (v1)
        "CHAT_SHUTDOWN_GRACE": "5",
        "REDIS_URL": None,
        "REDIS_PREFIX": None,
        **overrides,
    }
    for name, value in settings.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


# --- databases ----------------------------------------------------------------------------


class Databases:
    """Fresh databases for Clarity servers, each a copy of one migrated template."""

    def __init__(self, layer: Layer, work_dir: Path, use_postgres: bool) -> None:
        self.work_dir = work_dir
        self.postgres = use_postgres and layer is Layer.REDIS
        self.tag = uuid.uuid4().hex[:8]
        self.created: list[str] = []
        self.template = self._name("tpl")
        self._migrate(self._url(self.template))

    def _name(self, suffix: str) -> str:
        return f"bench_{self.tag}_{suffix}"

    def _url(self, name: str) -> str:
        if self.postgres:
            return f"{POSTGRES_URL}/{name}"
        return f"sqlite:///{self.work_dir / (name + '.sqlite3')}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(f"{POSTGRES_URL}/postgres", autocommit=True) as connection:
            connection.execute(sql)

    def _migrate(self, url: str) -> None:
        if self.postgres:
            self._admin(f'CREATE DATABASE "{self.template}"')
            self.created.append(self.template)
        log = self.work_dir / f"{self.template}.migrate.log"
        with log.open("wb") as out:
            result = subprocess.run(
                [sys.executable, "manage.py", "migrate", "--noinput"],
                cwd=ROOT,
                env=base_env({"DATABASE_URL": url}),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=300,
                check=False,
            )
        if result.returncode != 0:
            raise ServerError(f"migrate failed\n{_tail(log)}")

    def fresh(self) -> str:
        """The URL of a new copy of the template."""
        name = self._name(str(len(self.created)))
        if self.postgres:
            self._admin(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
            self.created.append(name)
        else:
            source = sqlite3.connect(self.work_dir / f"{self.template}.sqlite3")
            target = sqlite3.connect(self.work_dir / f"{name}.sqlite3")
            with contextlib.closing(source), contextlib.closing(target):
                source.backup(target)
        return self._url(name)

    def drop_all(self) -> None:
        if self.postgres:
            for name in reversed(self.created):
                self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        else:
            for path in self.work_dir.glob(f"bench_{self.tag}_*.sqlite3*"):
                path.unlink(missing_ok=True)
        self.created.clear()


def redis_delete_prefix(prefix: str) -> int:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    deleted = 0
    with contextlib.closing(client):
        batch = []
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += client.delete(*batch)
                batch.clear()
        if batch:
            deleted += client.delete(*batch)
    return deleted


# --- processes ----------------------------------------------------------------------------


@dataclass
class Server:
    """One daphne process."""

    port: int
    process: subprocess.Popen
    log_path: Path
    _log: object = field(repr=False, default=None)

    @property
    def url(self) -> str:
        return f"ws://{HOST}:{self.port}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def rss(self) -> int:
        """Resident set size in bytes (the process and any children)."""
        process = psutil.Process(self.process.pid)
        return process.memory_info().rss + sum(
            child.memory_info().rss for child in process.children(recursive=True)
        )

    def cpu_seconds(self) -> float:
        times = psutil.Process(self.process.pid).cpu_times()
        return times.user + times.system

    def wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise ServerError(f"server exited during startup\n{_tail(self.log_path)}")
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), 0.5):
                return
            if time.monotonic() > deadline:
                raise ServerError(f"server not listening after {timeout} s\n{_tail(self.log_path)}")
            time.sleep(0.05)

    def stop(self, timeout: float = 15.0) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        if self._log is not None:
            self._log.close()

    def metrics(self) -> dict[str, float]:
        """Clarity's Prometheus counters and gauges (`clarity_*`), or {} if unavailable."""
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.port}/metrics", timeout=5) as reply:
                text = reply.read().decode()
        except OSError:
            return {}
        values = {}
        for line in text.splitlines():
            match = re.match(r"^(clarity_[A-Za-z0-9_:]+(?:\{[^}]*\})?) ([0-9.eE+-]+)$", line)
            if match and not match.group(1).partition("{")[0].endswith("_created"):
                values[match.group(1)] = float(match.group(2))
        return values

    def log_problems(self) -> list[str]:
        """Lines of the server's output that report a warning, an error or a traceback."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        pattern = re.compile(r"WARNING|ERROR|CRITICAL|Traceback|Exception")
        return [line for line in text.splitlines() if pattern.search(line)]


def start_server(kind: ServerKind, env: Mapping[str, str], log_path: Path) -> Server:
    port = free_port()
    log = log_path.open("wb")
    process = subprocess.Popen(
        kind.command(port),
        cwd=ROOT,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return Server(port, process, log_path, log)


@dataclass
class Deployment:
    kind: ServerKind
    layer: Layer
    servers: list[Server]
    env: dict[str, str]

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]

    def rss(self) -> int:
        return sum(server.rss() for server in self.servers)

    def cpu_seconds(self) -> float:
        return sum(server.cpu_seconds() for server in self.servers)

    def metrics(self) -> dict[str, float]:
        if self.kind is not ServerKind.CLARITY:
            return {}
        total: dict[str, float] = {}
        for server in self.servers:
            for name, value in server.metrics().items():
                total[name] = total.get(name, 0.0) + value
        return total

    def log_problems(self) -> list[str]:
        return [line for server in self.servers for line in server.log_problems()]

    def check_alive(self) -> None:
        for server in self.servers:
            if not server.alive():
                raise ServerError(f"server on port {server.port} died\n{_tail(server.log_path)}")


@contextlib.contextmanager
def deploy(
    kind: ServerKind,
    layer: Layer,
    *,
    workers: int,
    databases: Databases,
    log_dir: Path,
    label: str,
    baseline_layer: str = "project",
) -> Iterator[Deployment]:
    """Fresh servers for one measurement; always stopped (and their Redis keys deleted).
    `baseline_layer`: `project` (the layer class Clarity uses) or `stock` (channels' own)."""
    overrides: dict[str, str | None] = {"DATABASE_URL": databases.fresh()}
    if kind is ServerKind.BASELINE:
        overrides["BENCH_BASELINE_LAYER"] = baseline_layer
    prefix = ""
    if layer is Layer.REDIS:
        prefix = f"bench-{uuid.uuid4().hex[:10]}"
        overrides.update(REDIS_URL=REDIS_URL, REDIS_PREFIX=prefix)
    env = base_env(overrides)
    servers: list[Server] = []
    try:
        for index in range(workers):
            log_path = log_dir / f"{label}.worker{index}.log"
            servers.append(start_server(kind, env, log_path))
        for server in servers:
            server.wait_listening(60)
        yield Deployment(kind, layer, servers, env)
    finally:
        for server in servers:
            with contextlib.suppress(ProcessLookupError):
                server.process.send_signal(signal.SIGTERM)
        for server in servers:
            server.stop()
        if prefix:
            redis_delete_prefix(prefix)


SERVICES = ("redis-server", "postgres")


def services_cpu_seconds() -> dict[int, float]:
    """CPU time so far of each Redis and PostgreSQL process (shared services), by pid."""
    seconds = {}
    for process in psutil.process_iter(["name", "cpu_times"]):
        times = process.info["cpu_times"]
        if process.info["name"] in SERVICES and times is not None:
            seconds[process.pid] = times.user + times.system
    return seconds


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds used between two snapshots by the processes alive at the second (a process
    started meanwhile counts from zero; one that exited meanwhile is not counted)."""
    return sum(value - before.get(pid, 0.0) for pid, value in after.items())
