"""The coordinator's handle on the generator processes (`bench.loadgen`).

Users are dealt round-robin to the processes; a command goes to every process at once and the
replies are gathered. The shared counters (sent, received, open, errors per process) let the
coordinator show progress and decide when a step has drained without asking anyone.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Sequence
from typing import Any

import psutil

from bench import loadgen
from bench.servers import ServerKind
from bench.wire import User


class GeneratorError(RuntimeError):
    """A generator process failed or stopped answering."""


class Fleet:
    def __init__(self, processes: int, target: Callable[..., None] = loadgen.main) -> None:
        """`processes` processes running `target(pipe, index, processes, counters)`: by
        default generator processes (`bench.loadgen`)."""
        context = multiprocessing.get_context("spawn")
        self.size = processes
        self.counters = context.RawArray("q", processes * loadgen.SLOTS)
        self.pipes = []
        self.processes = []
        for index in range(processes):
            parent, child = context.Pipe()
            process = context.Process(
                target=target,
                args=(child, index, processes, self.counters),
                name=f"bench-{target.__module__.rpartition('.')[2]}-{index}",
                daemon=True,
            )
            process.start()
            self.pipes.append(parent)
            self.processes.append(process)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    # --- commands ---------------------------------------------------------------------------

    def call(self, commands: Sequence[dict], timeout: float = 600.0) -> list[dict]:
        """Send commands[i] to process i, return their replies (GeneratorError on failure)."""
        for pipe, command in zip(self.pipes, commands, strict=True):
            pipe.send(command)
        return [self._reply(index, timeout) for index in range(self.size)]

    def broadcast(self, command: dict, timeout: float = 600.0) -> list[dict]:
        return self.call([command] * self.size, timeout)

    def _reply(self, index: int, timeout: float) -> dict:
        pipe, process = self.pipes[index], self.processes[index]
        deadline = time.monotonic() + timeout
        while not pipe.poll(0.2):
            if not process.is_alive():
                raise GeneratorError(f"generator process {index} died ({process.exitcode})")
            if time.monotonic() > deadline:
                raise GeneratorError(f"generator process {index} did not answer in {timeout} s")
        reply = pipe.recv()
        if "failure" in reply:
            raise GeneratorError(f"generator process {index} failed:\n{reply['failure']}")
        return reply

    def connect(
        self,
        kind: ServerKind,
        users: Sequence[User],
        *,
        padding: str,
        recover: bool = False,
        timeout: float = 60.0,
    ) -> list[dict]:
        """Open all these users' sockets at once, dealt round-robin to the processes; their
        messages end with `padding`; `recover`: they reconnect and catch up as protocol
        clients do (`bench.recovery`)."""
        shares = [
            {
                "op": "connect",
                "kind": kind.value,
                "users": [
                    (user.index, user.uid, user.room, user.url)
                    for user in users[index :: self.size]
                ],
                "padding": padding,
                "recover": recover,
                "timeout": timeout,
            }
            for index in range(self.size)
        ]
        return self.call(shares, timeout + 30)

    def close_all(self) -> list[dict]:
        return self.broadcast({"op": "close"})

    def shutdown(self) -> None:
        for pipe, process in zip(self.pipes, self.processes, strict=True):
            if process.is_alive():
                try:
                    pipe.send({"op": "exit"})
                except OSError:
                    continue
        for process in self.processes:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join(5)

    # --- shared counters --------------------------------------------------------------------

    def total(self, slot: int) -> int:
        return sum(self.counters[i * loadgen.SLOTS + slot] for i in range(self.size))

    def cpu_seconds(self) -> list[float]:
        """CPU time (user + system) used so far by each generator process."""
        seconds = []
        for process in self.processes:
            try:
                times = psutil.Process(process.pid).cpu_times()
            except psutil.Error:
                seconds.append(0.0)
                continue
            seconds.append(times.user + times.system)
        return seconds


def merge_counts(parts: Sequence[dict[str, Any]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for part in parts:
        for key, value in part.items():
            total[key] = total.get(key, 0) + value
    return total
