"""A cluster: server processes sharing one fresh database and, with Redis, one fresh key
prefix (their channel layer and shared state), started and cleaned up together.

`cluster_start` makes the database (migrated there, or copied from a migrated template),
starts the workers, waits until each listens, yields the `Cluster`, and always stops the
workers, deletes the prefix's Redis keys and drops the database. Tests start clusters of
Clarity workers; the bench deploys Clarity or its baseline server the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import redis

from chat.testing.databases import POSTGRES_URL, Database, fresh_database
from chat.testing.processes import (
    Command,
    Worker,
    free_ports,
    migrate,
    serve_command,
    server_env,
    workers_running,
)
from chat.testing.redis_server import key_prefix, keys_delete


@dataclass
class Cluster:
    """Running workers and what they share; `a` and `b` are the first two."""

    workers: list[Worker]
    database: Database
    env: dict[str, str]  # every worker's environment
    redis_url: str | None = None
    prefix: str | None = None  # REDIS_PREFIX, with Redis

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

    def redis_client(self) -> redis.Redis:
        assert self.redis_url is not None, "a cluster without Redis"
        return redis.Redis.from_url(self.redis_url, socket_timeout=5)

    def redis_keys(self, pattern: str = "*") -> list[str]:
        """This cluster's Redis keys (`pattern` after the prefix), sorted."""
        with contextlib.closing(self.redis_client()) as client:
            found = client.scan_iter(match=f"{self.prefix}{pattern}", count=1000)
            return sorted(key.decode() for key in found)

    def redis_ttl(self, key: str) -> int:
        """Seconds until `key` expires (redis TTL: -1 never, -2 absent)."""
        with contextlib.closing(self.redis_client()) as client:
            return client.ttl(key)

    def subscriptions(self) -> list[str]:
        """The pub/sub channels of this cluster's channel layer with a subscriber."""
        with contextlib.closing(self.redis_client()) as client:
            return sorted(channel.decode() for channel in client.pubsub_channels(f"{self.prefix}*"))


@contextlib.contextmanager
def cluster_start(
    *,
    directory: Path,
    env: Mapping[str, str | None],
    count: int = 2,
    backend: str = "sqlite",
    template: Database | None = None,
    postgres: str = POSTGRES_URL,
    redis_url: str | None = None,
    label: str = "",
    ports: list[int] | None = None,
    command: Command = serve_command,
    startup_timeout: float = 20.0,
    stop_timeout: float = 10.0,
) -> Iterator[Cluster]:
    """`count` workers (or one per port of `ports`) on a fresh database of `backend` (a copy
    of `template` if given, else migrated here) and, with `redis_url`, a fresh key prefix.
    `env` is added to the base server environment. Logs go to `directory`, each file name
    starting with `label`."""
    with fresh_database(
        backend=backend, directory=directory, server=postgres, template=template
    ) as database:
        overrides = {**env, "DATABASE_URL": database.url}
        prefix = key_prefix() if redis_url else None
        if redis_url is not None:
            overrides.update(REDIS_URL=redis_url, REDIS_PREFIX=prefix)
        full_env = server_env(overrides)
        if template is None:
            migrate(env=full_env, log_path=directory / f"{label}migrate.log")
        try:
            with workers_running(
                ports=ports or free_ports(count),
                env=full_env,
                log_dir=directory,
                label=label,
                command=command,
                startup_timeout=startup_timeout,
                stop_timeout=stop_timeout,
            ) as workers:
                yield Cluster(workers, database, full_env, redis_url, prefix)
        finally:
            if redis_url is not None:
                keys_delete(url=redis_url, prefix=prefix)
