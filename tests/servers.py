"""The test suite's real workers (daphne processes of this project, chat/testing/): the
environment they run with, `run_workers` for the tests of one worker, and `start_cluster` for
the tests of several workers sharing a database and Redis.

Workers log everything, at DEBUG for our own loggers, as JSON lines, into files under the
test's temporary directory; the suite's log scan reads them at the end (tests/logscan.py),
looking for the payloads the test clients sent, which it is told of here.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from chat.testing import processes
from chat.testing.client import SENT_OBSERVERS
from chat.testing.cluster import Cluster, cluster_start
from chat.testing.databases import POSTGRES_URL, postgres_answers
from chat.testing.processes import Worker
from tests.logscan import remember_sent

SENT_OBSERVERS.append(remember_sent)

TEST_ENV: dict[str, str | None] = {"LOG_LEVEL": "DEBUG", "LOG_FORMAT": "json"}

WORKER_TTL = 2
REAP_INTERVAL = 1
# Seconds a user a stopping worker closed has to come back unannounced.
REJOIN_GRACE = 2
# Several workers: a dead one is noticed in seconds; no assistant replies (the tests count
# frames exactly); warnings only (hundreds of sockets come and go).
CLUSTER_ENV: dict[str, str | None] = {
    **TEST_ENV,
    "CHAT_WORKER_TTL": str(WORKER_TTL),
    "CHAT_REAP_INTERVAL": str(REAP_INTERVAL),
    "CHAT_SHUTDOWN_REJOIN_GRACE": str(REJOIN_GRACE),
    "LOG_LEVEL": "WARNING",
    "ASSISTANT_MODE": "off",
}


def server_env(overrides: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """The environment of the suite's workers, with these overrides (None removes)."""
    return processes.server_env({**TEST_ENV, **(overrides or {})})


@contextlib.contextmanager
def run_workers(
    tmp_path: Path,
    *,
    count: int = 1,
    env: Mapping[str, str | None] | None = None,
    ports: list[int] | None = None,
    redis_url: str | None = None,
) -> Iterator[list[Worker]]:
    """`count` workers (or one per port of `ports`, when the environment must name them) on
    a fresh SQLite database in `tmp_path`, without Redis unless given `redis_url` (then
    under a fresh prefix); always stopped. The list is yielded so that a test may replace a
    worker it restarted: whatever it holds is stopped."""
    with cluster_start(
        directory=Path(tmp_path),
        env={**TEST_ENV, **(env or {})},
        count=count,
        ports=ports,
        redis_url=redis_url,
    ) as cluster:
        yield cluster.workers


@contextlib.contextmanager
def start_cluster(
    directory: Path,
    *,
    backend: str,
    redis_url: str,
    count: int = 2,
    env: Mapping[str, str | None] | None = None,
) -> Iterator[Cluster]:
    """`count` workers with CLUSTER_ENV (and `env`) on a fresh database of `backend` (the test
    is skipped if PostgreSQL does not answer) and Redis at `redis_url`, under a fresh prefix.
    Their logs are printed at the end (pytest shows them for a failed test)."""
    if backend == "postgres" and not postgres_answers():
        pytest.skip(f"PostgreSQL does not answer at {POSTGRES_URL}")
    started = time.monotonic()
    with cluster_start(
        directory=directory,
        env={**CLUSTER_ENV, **(env or {})},
        count=count,
        backend=backend,
        redis_url=redis_url,
    ) as cluster:
        print(f"[{backend}] {count} workers ready in {time.monotonic() - started:.2f} s")
        try:
            yield cluster
        finally:
            print(cluster.logs())
