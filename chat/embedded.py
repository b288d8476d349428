"""The embedded default (no REDIS_URL) is served by one worker process at a time.

Without Redis a worker keeps its channel layer, its liveness key and its rate-limit counters
in its own memory (settings.py): a second worker on the same database could never deliver
the first one's messages, and each would take the other for dead, since it cannot see the
other's liveness key, and end its sessions (chat/worker.py). So a serving worker
(clarity_project/serve.py), before it listens, takes an exclusive `flock` on a file next to
the SQLite database and holds it until it exits; a second worker finds it taken and refuses
to start. The operating system releases the lock however the process ends, SIGKILL
included: a crash leaves nothing stale behind, and the next worker starts and ends the
sessions the dead one left open. Only serving workers take it: `manage.py` commands and the
test suite's in-process application open no sockets.

With REDIS_URL workers share all of that through Redis and are as many as you like; with
PostgreSQL and no REDIS_URL nothing here stops a second worker (there is no file to lock).
"""

from __future__ import annotations

import fcntl
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

SQLITE_ENGINE = "django.db.backends.sqlite3"


class WorkerAlreadyServing(Exception):
    """Another worker serves the embedded default on this SQLite database."""


def embedded_database(*, database: Mapping[str, Any], redis_url: str) -> Path | None:
    """The SQLite file of `database` (a DATABASES entry) when it is served without Redis,
    else None (REDIS_URL set, another database engine, or an in-memory database). Resolved,
    so that every path to the same file (relative, through a symlink) names the same lock."""
    if redis_url or database["ENGINE"] != SQLITE_ENGINE:
        return None
    name = str(database["NAME"])
    return None if name == ":memory:" else Path(name).resolve()


def embedded_lock_acquire(*, database: Mapping[str, Any], redis_url: str) -> IO[bytes] | None:
    """Take the lock of `database` served without Redis (None when there is none to take).
    The caller keeps the returned file open for as long as it serves: closing it, or the
    process ending, releases the lock. WorkerAlreadyServing if someone else holds it."""
    sqlite_file = embedded_database(database=database, redis_url=redis_url)
    if sqlite_file is None:
        return None
    # Not `<database>.lock`: SQLite's unix-dotfile locking uses that name. Never deleted:
    # removing a lock file someone may be about to lock would let two processes each lock a
    # different file of the same name.
    lock_path = sqlite_file.with_name(f"{sqlite_file.name}-worker.lock")
    lock = lock_path.open("ab")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise WorkerAlreadyServing(
            f"refusing to start: another worker already serves the SQLite database {sqlite_file} "
            f"(it holds the lock {lock_path}). Without REDIS_URL each worker keeps its channel "
            "layer and liveness in its own memory, so two workers on one database cannot "
            "reach each other's sockets and would end each other's sessions as dead. Run one "
            "worker on this database, or set REDIS_URL to run several."
        ) from None
    return lock
