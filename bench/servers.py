"""The servers under test: fresh daphne processes on free loopback ports, started as the test
suite starts its own (chat/testing/cluster.py).

A `Deployment` is one measurement's servers: `workers` daphne processes of one server kind
(Clarity or the tutorial baseline), on one channel layer (in-memory or Redis), started fresh
and stopped afterwards. Each deployment gets a fresh database copied from its layer's
migrated template (`Databases`: SQLite for the in-memory layer, PostgreSQL with Redis) and
dropped afterwards, and Redis deployments a unique key prefix whose keys are deleted
afterwards.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import psutil

from bench.revisions import code_env
from chat.testing.cluster import Cluster, cluster_start
from chat.testing.databases import POSTGRES_URL as LOCAL_POSTGRES_URL
from chat.testing.databases import database_create, database_drop
from chat.testing.processes import (
    ServerError,
    Worker,
    migrate,
    serve_command,
    server_env,
    worker_start,
)
from chat.testing.redis_server import REDIS_URL as LOCAL_REDIS_URL

REDIS_URL = os.environ.get("BENCH_REDIS_URL", LOCAL_REDIS_URL)
POSTGRES_URL = os.environ.get("BENCH_POSTGRES_URL", LOCAL_POSTGRES_URL)

# Per-user rate limit the benchmark sets: far above any offered per-user rate, so the load is
# never limited, while the limiter still runs (one shared-state increment per frame).
RATE_LIMIT = 100_000
RATE_WINDOW = 60

# What every server of the bench runs with, on top of chat.testing's server environment.
BENCH_ENV: dict[str, str | None] = {
    "ASSISTANT_MODE": "off",  # else the assistant answers every message
    "LOG_LEVEL": "WARNING",
    "CHAT_MESSAGE_RATE_LIMIT": str(RATE_LIMIT),
    "CHAT_READ_RATE_LIMIT": str(RATE_LIMIT),
    "CHAT_RATE_LIMIT_WINDOW": str(RATE_WINDOW),
    "CHAT_MAX_CONNECTIONS_PER_USER": "3",
    "CHAT_ALLOW_NO_ORIGIN": "1",  # the generator sends no Origin, as native apps
    "CHAT_SHUTDOWN_GRACE": "5",
    # The generator's thousands of users share one loopback address; in production they come
    # from many (protocol §16 limits connection attempts per address with a high default).
    "CHAT_CONNECT_RATE_LIMIT_PER_ADDRESS": "0",
}
# The `hostile` scenario runs Clarity's own message rate limit (its default), not the bench's.
HOSTILE_ENV: dict[str, str | None] = {
    "CHAT_MESSAGE_RATE_LIMIT": None,
    "CHAT_RATE_LIMIT_WINDOW": None,
}
# The fair-share protections (protocol §16) switched off, for `fair-share-cost`: the one place
# to adjust as they change (0 means off; a setting the server does not know is ignored).
FAIR_SHARE_OFF: dict[str, str | None] = {
    "CHAT_MAX_OUTBOUND_BUFFER": "0",
    "CHAT_INBOUND_BYTES_PER_MINUTE": "0",
    "CHAT_CONNECT_RATE_LIMIT": "0",
    "CHAT_CONNECT_RATE_LIMIT_PER_ADDRESS": "0",
    "CHAT_ANALYSIS_RATE_LIMIT": "1000000",
}
PROBLEM = re.compile(r"WARNING|ERROR|CRITICAL|Traceback|Exception")
STARTUP_TIMEOUT = 60.0  # s for a server to listen
STOP_TIMEOUT = 15.0  # s for a server to exit after SIGTERM (its shutdown grace is 5) before SIGKILL


class ServerKind(StrEnum):
    BASELINE = "baseline"
    CLARITY = "clarity"

    def command(self, port: int) -> list[str]:
        """The daphne command line: Clarity as it is deployed (its launcher), the baseline
        with plain daphne; the same endpoint and verbosity for both."""
        if self is ServerKind.BASELINE:
            return serve_command(port, verbosity=0, application="bench.baseline.asgi:application")
        return serve_command(port, verbosity=0)


class Layer(StrEnum):
    MEMORY = "memory"
    REDIS = "redis"


class Databases:
    """A layer's template database, migrated by the code that will run on it (this checkout's,
    or `tree`'s: another commit's migrations); each deployment runs on a fresh copy of it."""

    def __init__(
        self, layer: Layer, work_dir: Path, use_postgres: bool, tree: Path | None = None
    ) -> None:
        self.tree = tree
        backend = "postgres" if use_postgres and layer is Layer.REDIS else "sqlite"
        self.template = database_create(
            backend=backend,
            name=f"bench_{uuid.uuid4().hex[:8]}_tpl",
            directory=work_dir,
            server=POSTGRES_URL,
        )
        try:
            migrate(
                env=server_env({**BENCH_ENV, **code_env(tree), "DATABASE_URL": self.template.url}),
                log_path=work_dir / f"{self.template.name}.migrate.log",
            )
        except BaseException:
            self.drop()
            raise

    def drop(self) -> None:
        database_drop(database=self.template)


def worker_rss(worker: Worker) -> int:
    """Resident set size in bytes (the process and any children)."""
    process = psutil.Process(worker.pid)
    return process.memory_info().rss + sum(
        child.memory_info().rss for child in process.children(recursive=True)
    )


def worker_cpu_seconds(worker: Worker) -> float:
    """CPU time used so far by the process and its live children (e.g. analysis processes)."""
    process = psutil.Process(worker.pid)
    seconds = 0.0
    for each in (process, *process.children(recursive=True)):
        with contextlib.suppress(psutil.Error):
            times = each.cpu_times()
            seconds += times.user + times.system
    return seconds


@dataclass(frozen=True)
class Restart:
    """One server's restart: when (monotonic) it was signalled, had exited, and its successor
    listened on the same port."""

    signal: str
    exit_code: int
    signalled_at: float
    exited_at: float
    listening_at: float


@dataclass
class Deployment:
    kind: ServerKind
    layer: Layer
    cluster: Cluster

    @property
    def servers(self) -> list[Worker]:
        return self.cluster.workers

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]

    def rss(self) -> int:
        return sum(worker_rss(server) for server in self.servers)

    def cpu_seconds(self) -> float:
        return sum(worker_cpu_seconds(server) for server in self.servers)

    def metrics(self) -> dict[str, float]:
        """Clarity's Prometheus counters and gauges (`clarity_*`), summed over the servers."""
        if self.kind is not ServerKind.CLARITY:
            return {}
        total: dict[str, float] = {}
        for server in self.servers:
            for name, value in server.metrics().items():
                total[name] = total.get(name, 0.0) + value
        return total

    def log_problems(self) -> list[str]:
        """Lines of the servers' output that report a warning, an error or a traceback."""
        return [
            line for server in self.servers for line in server.log_lines() if PROBLEM.search(line)
        ]

    def restart(self, index: int, sig: signal.Signals) -> Restart:
        """Stop server `index` with `sig` and start a fresh process of the same command on its
        port as soon as it has exited (the port is free only then), as a deploy's service
        manager does; its output continues the old process's log files."""
        old = self.servers[index]
        signalled_at = time.monotonic()
        old.send_signal(sig)
        exit_code = old.reap(STOP_TIMEOUT)
        exited_at = time.monotonic()
        new = worker_start(
            index=old.index,
            port=old.port,
            env=old.env,
            log_dir=old.stdout_path.parent,
            label=old.stdout_path.name.removesuffix(f"worker{old.index}.out.log"),
            command=self.kind.command,
        )
        self.cluster.workers[index] = new  # stopped with the deployment
        new.wait_listening(STARTUP_TIMEOUT)
        return Restart(sig.name, exit_code, signalled_at, exited_at, time.monotonic())

    def check_alive(self) -> None:
        for server in self.servers:
            if not server.alive():
                raise ServerError(f"server on port {server.port} died\n{server.logs()}")


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
    env: dict[str, str | None] | None = None,
) -> Iterator[Deployment]:
    """Fresh servers for one measurement; always stopped (their database dropped, their Redis
    keys deleted). `baseline_layer`: `project` (the layer class Clarity uses) or `stock`
    (channels' own). `env` is added to BENCH_ENV (a None value removes a variable). The
    servers run the code that migrated `databases` (this checkout's, or its `tree`'s)."""
    env = {**BENCH_ENV, **(env or {}), **code_env(databases.tree)}
    if kind is ServerKind.BASELINE:
        env["BENCH_BASELINE_LAYER"] = baseline_layer
    with cluster_start(
        directory=log_dir,
        env=env,
        count=workers,
        backend=databases.template.backend,
        template=databases.template,
        postgres=POSTGRES_URL,
        redis_url=REDIS_URL if layer is Layer.REDIS else None,
        label=f"{label}.",
        command=kind.command,
        startup_timeout=STARTUP_TIMEOUT,
        stop_timeout=STOP_TIMEOUT,
    ) as cluster:
        yield Deployment(kind, layer, cluster)


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
