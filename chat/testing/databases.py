"""Fresh databases for server processes, read directly by tests, and their removal.

A `Database` is a SQLite file or a PostgreSQL database on a local server (trust auth),
either empty (to be migrated) or a copy of a migrated template: SQLite through the backup
API, PostgreSQL with `CREATE DATABASE ... TEMPLATE`. `fresh_database` makes one and always
removes it afterwards. `rows` and `execute` run one statement in a fresh connection
(placeholders `%s` on both backends); the `session*` helpers read the chat sessions table.
"""

from __future__ import annotations

import contextlib
import sqlite3
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chat.testing.processes import answers

# The PostgreSQL server (no database name): every database here is made and dropped on it.
POSTGRES_URL = "postgres://postgres@127.0.0.1:5432"
BACKENDS = ("sqlite", "postgres")
SESSION_COLUMNS = (
    "user_id",
    "room_id",
    "worker_id",
    "channel_name",
    "disconnected_at",
    "close_code",
    "close_reason",
)


@dataclass(frozen=True)
class Database:
    backend: str  # one of BACKENDS
    name: str
    url: str  # DATABASE_URL for the servers
    server: str  # the PostgreSQL server's URL; "" for SQLite
    path: Path | None = None  # the SQLite file

    def rows(self, sql: str, *params: Any) -> list[tuple]:
        """Run one read query in a fresh connection."""
        if self.path is not None:
            with contextlib.closing(sqlite3.connect(self.path, timeout=10)) as conn:
                return conn.execute(sql.replace("%s", "?"), params).fetchall()
        import psycopg

        with psycopg.connect(self.url, connect_timeout=5) as conn:
            return conn.execute(sql, params).fetchall()

    def execute(self, sql: str, *params: Any) -> int:
        """Run one write statement in a fresh connection; returns the rows it changed."""
        if self.path is not None:
            with contextlib.closing(sqlite3.connect(self.path, timeout=10)) as conn:
                changed = conn.execute(sql.replace("%s", "?"), params).rowcount
                conn.commit()
                return changed
        import psycopg

        with psycopg.connect(self.url, connect_timeout=5) as conn:
            return conn.execute(sql, params).rowcount

    def session_key(self, session_id: str) -> str:
        """How a session id is stored: hex on SQLite, native uuid on PostgreSQL."""
        return uuid.UUID(session_id).hex if self.path is not None else session_id

    def session(self, session_id: str) -> dict:
        """One chat session's row."""
        rows = self.rows(
            f"SELECT {', '.join(SESSION_COLUMNS)} FROM chat_chatsession WHERE session_id = %s",
            self.session_key(session_id),
        )
        assert len(rows) == 1, f"session {session_id}: {rows}"
        return dict(zip(SESSION_COLUMNS, rows[0], strict=True))

    def open_sessions(self, user_id: str | None = None) -> list[tuple]:
        """(session_id, user_id, room_id) of every open session (of this user)."""
        sql = "SELECT session_id, user_id, room_id FROM chat_chatsession "
        sql += "WHERE disconnected_at IS NULL"
        if user_id is None:
            return self.rows(sql)
        return self.rows(sql + " AND user_id = %s", user_id)


def postgres_answers(server: str = POSTGRES_URL) -> bool:
    address = urllib.parse.urlsplit(server)
    return answers(address.hostname or "127.0.0.1", address.port or 5432)


def _postgres_admin(server: str, sql: str) -> None:
    import psycopg

    with psycopg.connect(f"{server}/postgres", autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql)


def database_create(
    *,
    backend: str,
    name: str,
    directory: Path,
    server: str = POSTGRES_URL,
    template: Database | None = None,
) -> Database:
    """A new database: empty, or a copy of `template` (of the same backend). SQLite files go
    to `directory`."""
    assert backend in BACKENDS, backend
    assert template is None or template.backend == backend, (backend, template)
    if backend == "postgres":
        copy = f' TEMPLATE "{template.name}"' if template is not None else ""
        _postgres_admin(server, f'CREATE DATABASE "{name}"{copy}')
        return Database(backend, name, f"{server}/{name}", server)
    path = directory / f"{name}.sqlite3"
    if template is not None:
        source, target = sqlite3.connect(template.path), sqlite3.connect(path)
        with contextlib.closing(source), contextlib.closing(target):
            source.backup(target)
    return Database(backend, name, f"sqlite:///{path}", "", path)


def database_drop(*, database: Database) -> None:
    """Remove the database (its SQLite file and journals; the PostgreSQL database even while
    connections are open)."""
    if database.path is None:
        _postgres_admin(database.server, f'DROP DATABASE IF EXISTS "{database.name}" WITH (FORCE)')
        return
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{database.path}{suffix}").unlink(missing_ok=True)


@contextlib.contextmanager
def fresh_database(
    *,
    backend: str,
    directory: Path,
    label: str = "clarity",
    server: str = POSTGRES_URL,
    template: Database | None = None,
) -> Iterator[Database]:
    """A database of its own (named `<label>_<random>`), removed afterwards."""
    database = database_create(
        backend=backend,
        name=f"{label}_{uuid.uuid4().hex[:12]}",
        directory=directory,
        server=server,
        template=template,
    )
    try:
        yield database
    finally:
        database_drop(database=database)
