"""What health analyses cost the other users of a worker (issue 13, protocol §16): a quick
measurement against one real worker, not a test. `.venv/bin/python -m bench.analysis_share`

1. Event-loop CPU per analysis: one user sends week-long analyses (10,080 minute points) one
   after the other; the worker's main thread (daphne's event loop: frame reading, decoding,
   everything the consumer does on the loop) is read from /proc before and after, and divided
   by the number of analyses. Analysis work in threads or child processes is not counted.
2. A bystander's heartbeat round trip, alone, then while four users each send a few analyses
   back to back (each waits for its previous one to complete).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from chat.testing.client import ChatSocket, heartbeat_probe
from chat.testing.cluster import cluster_start

START = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def week_frame() -> str:
    points = []
    for minute in range(7 * 1440):
        moment = START + timedelta(minutes=minute)
        asleep = moment.hour >= 23 or moment.hour < 7
        points.append({"timestamp": moment.isoformat(), "value": 0.0 if asleep else 250.0})
    return json.dumps({"type": "health_insight", "content": {"data_points": points}})


def main_thread_cpu(pid: int) -> float:
    """CPU seconds of the process's main thread (the event loop), user + system."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def analyse(socket: ChatSocket, text: str) -> None:
    await socket.send_raw(text, observed="")
    while True:
        frame = await socket.recv(timeout=60)
        if frame["type"] == "error":
            raise RuntimeError(frame)
        if frame["type"] == "analysis_update" and frame["status"] in {"completed", "failed"}:
            assert frame["status"] == "completed", frame
            return


async def heartbeats(socket: ChatSocket, stop: asyncio.Event, rtts: list[float]) -> None:
    while not stop.is_set():
        probe = heartbeat_probe()
        sent = time.perf_counter()
        await socket.send(probe)
        ack = await socket.expect("heartbeat_ack", timeout=30)
        assert ack["client_timestamp"] == probe["client_timestamp"]
        rtts.append((time.perf_counter() - sent) * 1000)
        await asyncio.sleep(0.02)


def summary(rtts: list[float]) -> str:
    p99 = statistics.quantiles(rtts, n=100, method="inclusive")[98]
    return (
        f"n={len(rtts)} p50={statistics.median(rtts):.1f} ms p99={p99:.1f} ms "
        f"max={max(rtts):.1f} ms"
    )


async def measure(url: str, pid: int, *, sequential: int, users: int, each: int) -> None:
    text = week_frame()
    print(f"frame: {len(text):,} bytes, 10,080 points")
    solo = await ChatSocket.join(url, "bench-solo", "solo")
    await analyse(solo, text)  # warm-up (a lazily started pool, imports)
    before = main_thread_cpu(pid)
    for _ in range(sequential):
        await analyse(solo, text)
    per = (main_thread_cpu(pid) - before) / sequential * 1000
    print(f"event-loop CPU per analysis ({sequential} in a row): {per:.0f} ms")
    await solo.close()

    bystander = await ChatSocket.join(url, "bench-bystander", "bystander")
    idle: list[float] = []
    stop = asyncio.Event()
    task = asyncio.create_task(heartbeats(bystander, stop, idle))
    await asyncio.sleep(2)
    stop.set()
    await task
    print(f"bystander heartbeat, idle worker: {summary(idle)}")

    senders = [await ChatSocket.join(url, "bench-analysts", f"user{i}") for i in range(users)]

    async def send_some(socket: ChatSocket) -> None:
        for _ in range(each):
            await analyse(socket, text)

    loaded: list[float] = []
    stop = asyncio.Event()
    task = asyncio.create_task(heartbeats(bystander, stop, loaded))
    started = time.perf_counter()
    await asyncio.gather(*(send_some(socket) for socket in senders))
    elapsed = time.perf_counter() - started
    stop.set()
    await task
    print(
        f"bystander heartbeat, {users} users x {each} analyses ({elapsed:.1f} s): {summary(loaded)}"
    )
    for socket in [*senders, bystander]:
        await socket.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequential", type=int, default=10)
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--each", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        env = {
            "LOG_LEVEL": "WARNING",
            "CHAT_MESSAGE_RATE_LIMIT": "1000",
            "CHAT_ANALYSIS_RATE_LIMIT": "1000",
        }
        with cluster_start(directory=Path(directory), env=env, count=1) as cluster:
            worker = cluster.workers[0]
            asyncio.run(
                measure(
                    worker.url,
                    worker.pid,
                    sequential=args.sequential,
                    users=args.users,
                    each=args.each,
                )
            )


if __name__ == "__main__":
    main()
