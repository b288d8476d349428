"""Redis for server processes: the machine's shared Redis, where each run keeps its keys under
a prefix of its own (`key_prefix`) and deletes them afterwards (`keys_delete`), and a private
redis-server (`PrivateRedis`) that a test may kill, stall and restart without disturbing
anyone else's."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
import urllib.parse
import uuid
from pathlib import Path

import redis

from chat.testing.processes import HOST, answers, free_ports
from chat.testing.waiting import wait_until

REDIS_URL = "redis://127.0.0.1:6379/0"
REDIS_SERVER = shutil.which("redis-server")


def redis_answers(url: str = REDIS_URL) -> bool:
    address = urllib.parse.urlsplit(url)
    return answers(address.hostname or HOST, address.port or 6379)


def key_prefix() -> str:
    """A REDIS_PREFIX no other run uses."""
    return f"testing-{uuid.uuid4().hex[:12]}"


def keys_delete(*, url: str, prefix: str) -> int:
    """Delete every key under `prefix`; returns how many."""
    deleted = 0
    with contextlib.closing(redis.Redis.from_url(url, socket_timeout=5)) as client:
        batch = []
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += client.delete(*batch)
                batch.clear()
        if batch:
            deleted += client.delete(*batch)
    return deleted


class PrivateRedis:
    """One redis-server on a free loopback port, without persistence: a restart empties it."""

    def __init__(self, directory: Path):
        assert REDIS_SERVER is not None, "redis-server is not installed"
        self.port = free_ports(1)[0]
        self.url = f"redis://{HOST}:{self.port}/0"
        self.log_path = directory / "redis.log"
        self.process: subprocess.Popen | None = None
        self.paused = False

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self) -> redis.Redis:
        return redis.Redis(host=HOST, port=self.port, socket_timeout=5, socket_connect_timeout=1)

    def start(self, timeout: float = 10.0) -> float:
        """Start it (same port every time) and wait until it answers PING; returns the
        monotonic time of the first answer."""
        assert not self.running()
        self.process = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                HOST,
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--logfile",
                str(self.log_path),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        with contextlib.closing(self.client()) as client:

            def answering() -> bool:
                if not self.running():
                    raise RuntimeError(f"redis-server exited: {self.log_path.read_text()[-2000:]}")
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                    return client.ping()
                return False

            wait_until(answering, timeout=timeout, what=f"redis-server on {self.port}", step=0.005)
        return time.monotonic()

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.running():
            self.resume()
            self.process.send_signal(sig)
            self.process.wait(10)

    def pause(self) -> None:
        """SIGSTOP: connections stay open, nothing is answered (a stalled server)."""
        self.process.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.paused:
            self.process.send_signal(signal.SIGCONT)
            self.paused = False
