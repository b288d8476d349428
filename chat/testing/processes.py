"""Server processes on loopback, for tests and the bench.

A `Worker` is one daphne process on a free loopback port: Clarity as deployed, through its
launcher `clarity_project.serve` (daphne plus the project's frame limits and access log), or
any other ASGI application through plain daphne (`serve_command`). Its stdout and stderr go to
files (appended to, so a restarted worker keeps its predecessor's lines); `logs()` gives their
tails for failure messages, `log_records()` its JSON log lines, `metrics()` its Prometheus
samples. `workers_running` starts several, waits until each accepts TCP connections, and
always stops them: SIGTERM to all at once, then SIGKILL for whichever outlives the timeout.

`server_env` is the environment every server process starts from; `manage(...)` runs any
`manage.py` command with a worker's environment (`migrate`, `createsuperuser`, ...).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from chat.testing.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
PROJECT_ID = "clarity-test"

# The environment of every server process, before the caller's own. A name mapped to None is
# removed from the inherited environment.
BASE_ENV: dict[str, str | None] = {
    "DJANGO_SETTINGS_MODULE": "clarity_project.settings",
    "PYTHONUNBUFFERED": "1",
    "DEBUG": "1",  # emulator tokens require DEBUG (a system check)
    "SECRET_KEY": "testing-only-secret-key",
    "FIREBASE_AUTH_EMULATOR_HOST": "127.0.0.1:9099",
    "FIREBASE_PROJECT_ID": PROJECT_ID,
    "FIREBASE_CREDENTIALS": None,
    "FIREBASE_CHECK_REVOKED": None,
    "REDIS_URL": None,
    "REDIS_PREFIX": None,
    # v1 rooms: a room is made public on first join. Tests of membership set it to "0" and
    # make their rooms through the HTTP API or `manage.py createroom`.
    "CHAT_OPEN_ROOMS": "1",
}

# A Prometheus sample line of this project's metrics: name (with labels) and value.
METRIC_LINE = re.compile(r"^(clarity_[A-Za-z0-9_:]+(?:\{[^}]*\})?) ([0-9.eE+-]+)$")

Command = Callable[[int], list[str]]


class ServerError(RuntimeError):
    """A server process failed to start, or a command failed; the message has its output."""


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (held open together so none repeats)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((HOST, 0))
            ports.append(sock.getsockname()[1])
        return ports


def answers(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether something accepts TCP connections there."""
    try:
        with socket.create_connection((host, port), timeout):
            return True
    except OSError:
        return False


def child_pids(pid: int) -> set[int]:
    """The live (not zombie) processes whose parent is `pid`."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(stat[1]) == pid and stat[0] != "Z":
            found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie has ended, only not been reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def command_line(pid: int) -> str:
    """Process `pid`'s command line, its arguments joined by spaces ("" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def server_env(overrides: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """os.environ + BASE_ENV + overrides; a None value removes the variable."""
    env = dict(os.environ)
    for name, value in {**BASE_ENV, **(overrides or {})}.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def log_tail(path: Path, limit: int = 6000) -> str:
    """The end of a log file, for an error message ("" if it cannot be read)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text if len(text) <= limit else "...\n" + text[-limit:]


def serve_command(port: int, *, verbosity: int = 1, application: str | None = None) -> list[str]:
    """The daphne command line on this port: Clarity through its launcher, or `application`
    (a `module:attribute` path) through plain daphne, with the same endpoint options."""
    options = ["-e", f"tcp:port={port}:interface={HOST}:backlog=1024", "-v", str(verbosity)]
    if application is not None:
        return [sys.executable, "-m", "daphne", *options, application]
    return [sys.executable, "-m", "clarity_project.serve", *options]


@dataclass
class Worker:
    """One server process on a loopback port."""

    index: int
    port: int
    process: subprocess.Popen
    stdout_path: Path
    stderr_path: Path
    # The worker's full environment: for `manage(...)` in its database, or a restart.
    env: dict[str, str] = field(default_factory=dict, repr=False)
    _files: list[IO[bytes]] = field(default_factory=list, repr=False)

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
            f"returncode {self.process.poll()}) stdout ---\n{log_tail(self.stdout_path)}\n"
            f"--- worker {self.index} stderr ---\n{log_tail(self.stderr_path)}"
        )

    def log_lines(self) -> list[str]:
        """Everything the worker wrote so far, stdout then stderr."""
        lines: list[str] = []
        for path in (self.stdout_path, self.stderr_path):
            with contextlib.suppress(OSError):
                lines += path.read_text(errors="replace").splitlines()
        return lines

    def log_records(self) -> list[dict]:
        """The worker's JSON log records so far (LOG_FORMAT=json): complete lines only (it may
        be writing the last one right now)."""
        complete, _, _ = self.stderr_path.read_text().rpartition("\n")
        return [json.loads(line) for line in complete.splitlines()]

    def metrics(self) -> dict[str, float]:
        """This worker's `clarity_*` Prometheus samples (name with labels -> value), without
        the `_created` timestamps; {} if /metrics does not answer (not Clarity, or gone)."""
        try:
            with urllib.request.urlopen(f"{self.http_url}/metrics", timeout=5) as reply:
                text = reply.read().decode()
        except OSError:
            return {}
        samples = {}
        for line in text.splitlines():
            match = METRIC_LINE.match(line)
            if match and not match.group(1).partition("{")[0].endswith("_created"):
                samples[match.group(1)] = float(match.group(2))
        return samples

    def metric(self, name: str) -> float:
        """One metric's value, summed over its labels (0 if it has no sample yet)."""
        return sum(
            value for sample, value in self.metrics().items() if sample.partition("{")[0] == name
        )

    def wait_listening(self, timeout: float) -> None:
        """Until the port accepts TCP connections; ServerError if the worker dies or stalls."""

        def listening() -> bool:
            if not self.alive():
                raise ServerError(f"worker {self.index} exited during startup\n{self.logs()}")
            return answers(HOST, self.port, 0.5)

        try:
            wait_until(listening, timeout=timeout, what=f"worker {self.index} listening")
        except AssertionError:
            raise ServerError(
                f"worker {self.index} not listening on {self.port} after {timeout} s\n{self.logs()}"
            ) from None

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


def worker_start(
    *,
    index: int,
    port: int,
    env: Mapping[str, str],
    log_dir: Path,
    label: str = "",
    command: Command = serve_command,
) -> Worker:
    """Start `command(port)` (default: Clarity's launcher) with this environment; its output
    goes to `<log_dir>/<label>worker<index>.{out,err}.log`. Does not wait for it."""
    stdout_path = log_dir / f"{label}worker{index}.out.log"
    stderr_path = log_dir / f"{label}worker{index}.err.log"
    stdout, stderr = stdout_path.open("ab"), stderr_path.open("ab")
    try:
        process = subprocess.Popen(
            command(port),
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
    return Worker(index, port, process, stdout_path, stderr_path, dict(env), [stdout, stderr])


def workers_stop(workers: list[Worker], *, timeout: float = 10.0) -> None:
    """SIGTERM every worker at once, wait for all (bounded), SIGKILL the stragglers."""
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for worker in workers:
        worker.reap(max(deadline - time.monotonic(), 0.1))


@contextlib.contextmanager
def workers_running(
    *,
    ports: list[int],
    env: Mapping[str, str],
    log_dir: Path,
    label: str = "",
    command: Command = serve_command,
    startup_timeout: float = 20.0,
    stop_timeout: float = 10.0,
) -> Iterator[list[Worker]]:
    """One worker per port, all listening, yielded as a list; at the end every worker the list
    then holds is stopped (a test may replace one it restarted)."""
    workers: list[Worker] = []
    try:
        for index, port in enumerate(ports):
            workers.append(
                worker_start(
                    index=index, port=port, env=env, log_dir=log_dir, label=label, command=command
                )
            )
        deadline = time.monotonic() + startup_timeout
        for worker in workers:
            worker.wait_listening(max(deadline - time.monotonic(), 0.5))
        yield workers
    finally:
        workers_stop(workers, timeout=stop_timeout)


def manage(
    args: list[str], *, env: Mapping[str, str], log_path: Path, timeout: float = 120.0
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
            raise ServerError(f"{name} timed out after {timeout} s\n{log_tail(log_path)}") from None
    if result.returncode != 0:
        raise ServerError(f"{name} failed ({result.returncode})\n{log_tail(log_path)}")
    return log_path.read_text(errors="replace")


def migrate(*, env: Mapping[str, str], log_path: Path, timeout: float = 300.0) -> None:
    """`manage.py migrate` in the database of this environment (DATABASE_URL)."""
    manage(["migrate", "--noinput"], env=env, log_path=log_path, timeout=timeout)
