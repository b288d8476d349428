"""The measurements: room fan-out (fixed-rate sweep and closed loop) and connection storm;
hostile clients are in `bench.fairshare`, the CPU-cost comparisons (the fair-share
protections', sequence numbers') in `bench.cost`, the worker restart in `bench.restart`,
streaming assistant replies in `bench.stream`.

Each measurement starts its own fresh servers (`bench.servers.deploy`), connects its users
through the generator fleet, measures, closes everything and returns a JSON-ready dict.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench import cost, fairshare, loadgen, restart, stream
from bench.fleet import Fleet, merge_counts
from bench.progress import Progress
from bench.servers import (
    Databases,
    Deployment,
    Layer,
    ServerKind,
    cpu_delta,
    deploy,
    services_cpu_seconds,
)
from bench.stats import StepResult, mark_counted, percentile, summarize
from bench.wire import User

MIN_OFFERED = 100.0  # deliveries/s: the sweep does not go lower
SAME_RATE = 0.04  # rates this close (relative) count as one: measured once
# Gauges whose non-zero value, or histograms whose observations over SLOW_SECONDS, mean the
# server is behind (if the server exports any).
OVERLOAD_NAME = re.compile(r"lag|queue|backlog|pending|waiting|overload|shed|drop")
SLOW_SECONDS = "0.1"
HISTOGRAM_PARTS = ("_bucket", "_count", "_sum")
# Counters whose change during a step is normal traffic, not a sign of trouble.
ROUTINE_METRICS = (
    "clarity_frames_in_total",
    "clarity_frames_out_total",
    "clarity_assistant_delta_frames_total",
)
# Gauges that keep the worst value since the worker started (their histogram tells the step).
HIGH_WATER_MARK = "_max_seconds"

# One step on a deployment: step(mode=..., offered=..., duration=...).
StepFn = Callable[..., StepResult]


@dataclass(frozen=True)
class Options:
    rooms: int = 20
    room_size: int = 10
    step_seconds: float = 10.0
    drain_seconds: float = 5.0
    closed_seconds: float = 8.0
    warmup_seconds: float = 2.0
    light_load: float = 1000.0  # deliveries/s of the light-load latency point
    growth: float = 1.2  # offered load multiplier between sweep steps
    max_steps: int = 14
    refine: int = 2  # bisection steps after the sweep
    confirm: bool = True  # try a failed rate twice (the machine is noisy)
    padding: int = 60  # characters after the probe header (a short chat message)
    connections: int = 5000  # connection storm size
    burst: int = 500  # sockets opened at once in the storm
    hold_seconds: float = 10.0
    baseline_layer: str = "project"  # or "stock": the baseline on channels' own layer class
    attack_seconds: float = 60.0  # hostile: each attack (the targets are over 60 s)
    attacks: tuple[str, ...] = ()  # hostile: these attacks only (default: all, control first)
    cost_runs: int = 3  # fair-share-cost, seq-cost, read-cost: interleaved pairs
    seq_cost_base: str = "95b091a"  # seq-cost: the code without sequence numbers (49f5564^)
    restart_users: int = 2000  # restart: users connected when the worker restarts
    restart_signal: str = "term"  # restart: "term" (a deploy) or "kill" (a crash)
    restart_rate: float = 200.0  # restart: messages/s sent by all senders together
    restart_before: float = 3.0  # restart: s of messages before the signal
    restart_after: float = 3.0  # restart: s of messages once everyone is back
    restart_deadline: float = 60.0  # restart: s after the signal; later counts as never back
    stream_asks: int = 20  # stream: questions asked one after the other (first delta)
    stream_seconds: float = 20.0  # stream: each chat window, without and with replies
    stream_pairs: int = 4  # stream: pairs of chat windows, without and with, alternated
    stream_first_chunk: float = 0.8  # stream: s from the stub's request to its first event
    stream_token_rate: float = 50.0  # stream: the stub's pieces (tokens) per second
    stream_tokens_per_event: int = 10  # stream: the stub's tokens in each server-sent event

    @classmethod
    def quick(cls) -> Options:
        return cls(
            step_seconds=2.5,
            drain_seconds=2.0,
            closed_seconds=2.5,
            warmup_seconds=1.0,
            growth=1.5,
            max_steps=5,
            refine=0,
            confirm=False,
            connections=1000,
            hold_seconds=2.0,
            attack_seconds=20.0,
            restart_users=500,
            restart_before=2.0,
            restart_after=2.0,
            stream_asks=5,
            stream_seconds=10.0,
            stream_pairs=1,
        )


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # "fanout", "storm", "hostile", "restart", "stream" or a key of
    # `bench.cost.COMPARISONS`
    layer: Layer
    workers: int
    description: str
    servers: tuple[ServerKind, ...] = (ServerKind.BASELINE, ServerKind.CLARITY)
    default: bool = True  # part of a run that names no scenario

    def head(self, kind: ServerKind) -> dict[str, Any]:
        """The fields every result of this scenario begins with."""
        return {
            "scenario": self.name,
            "server": kind.value,
            "layer": self.layer.value,
            "workers": self.workers,
        }


SCENARIOS = {
    scenario.name: scenario
    for scenario in (
        Scenario(
            "fanout-memory", "fanout", Layer.MEMORY, 1, "room fan-out, one worker, in-memory layer"
        ),
        Scenario("fanout-redis", "fanout", Layer.REDIS, 1, "room fan-out, one worker, Redis"),
        Scenario(
            "fanout-redis-2w",
            "fanout",
            Layer.REDIS,
            2,
            "room fan-out, two workers on one Redis, each room's users split across them",
        ),
        Scenario(
            "storm", "storm", Layer.MEMORY, 1, "connection storm: join latency, RSS per socket"
        ),
        Scenario(
            "hostile",
            "hostile",
            Layer.MEMORY,
            1,
            "hostile clients (protocol §16): each attack in turn, a bystander's heartbeats",
            servers=(ServerKind.CLARITY,),
            default=False,
        ),
        Scenario(
            "fair-share-cost",
            "fair-share-cost",
            Layer.MEMORY,
            1,
            "server CPU per 1,000 deliveries with the fair-share protections on and off",
            servers=(ServerKind.CLARITY,),
            default=False,
        ),
        Scenario(
            "seq-cost",
            "seq-cost",
            Layer.MEMORY,
            1,
            "server CPU per 1,000 deliveries with sequence numbers (this checkout) and without "
            "(the code before them)",
            servers=(ServerKind.CLARITY,),
            default=False,
        ),
        Scenario(
            "seq-cost-redis",
            "seq-cost",
            Layer.REDIS,
            1,
            "seq-cost on the Redis layer and PostgreSQL",
            servers=(ServerKind.CLARITY,),
            default=False,
        ),
        Scenario(
            "read-cost",
            "read-cost",
            Layer.MEMORY,
            1,
            "server CPU per 1,000 deliveries with read receipts flowing (each member sends `read` "
            "for what it sees, at most once a second) and without",
            servers=(ServerKind.CLARITY,),
            default=False,
        ),
        Scenario(
            "restart",
            "restart",
            Layer.REDIS,
            1,
            "a worker restarted under its users: back, caught up, nothing lost or doubled",
            servers=(ServerKind.CLARITY,),
            default=False,
        ),
        Scenario(
            "restart-2w",
            "restart",
            Layer.REDIS,
            2,
            "as restart, two workers (users split), the first restarted",
            servers=(ServerKind.CLARITY,),
            default=False,
        ),
        Scenario(
            "stream",
            "stream",
            Layer.MEMORY,
            1,
            "streaming assistant replies (Gemini stub): time to the first delta; the room's "
            "chat p99 while 8 replies stream, to the assistant off",
            servers=(ServerKind.CLARITY,),
            default=False,
        ),
    )
}


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds used so far by the servers, the generators, Redis and PostgreSQL (by
    process) and the whole machine."""

    wall: float
    server: float
    generator: float
    services: dict[int, float]
    machine: float

    @classmethod
    def take(cls, deployment: Deployment, fleet: Fleet) -> CpuSnapshot:
        machine = psutil.cpu_times()
        busy = machine.user + machine.nice + machine.system + machine.irq + machine.softirq
        return cls(
            wall=time.monotonic(),
            server=deployment.cpu_seconds(),
            generator=sum(fleet.cpu_seconds()),
            services=services_cpu_seconds(),
            machine=busy + machine.steal,
        )

    def percent_since(self, before: CpuSnapshot) -> dict[str, float]:
        """% of one core used by each since `before`."""
        scale = 100 / max(self.wall - before.wall, 1e-6)
        return {
            "server": (self.server - before.server) * scale,
            "generator": (self.generator - before.generator) * scale,
            "services": cpu_delta(before.services, self.services) * scale,
            "machine": (self.machine - before.machine) * scale,
        }


class Bench:
    """What all measurements of one invocation share: generators, databases, logs."""

    def __init__(
        self, fleet: Fleet, options: Options, work_dir: Path, progress: Progress, postgres: bool
    ) -> None:
        self.fleet = fleet
        self.options = options
        self.work_dir = work_dir
        self.progress = progress
        self.postgres = postgres
        self.databases: dict[tuple[Layer, Path | None], Databases] = {}
        self.step_number = 0

    def database(self, layer: Layer, tree: Path | None = None) -> Databases:
        """The layer's template, migrated by this checkout's code or by `tree`'s."""
        if (layer, tree) not in self.databases:
            self.databases[layer, tree] = Databases(layer, self.work_dir, self.postgres, tree)
        return self.databases[layer, tree]

    def close(self) -> None:
        for databases in self.databases.values():
            databases.drop()

    def deploy(
        self,
        scenario: Scenario,
        kind: ServerKind,
        *,
        env: dict[str, str | None] | None = None,
        label: str = "",
        tree: Path | None = None,
    ) -> contextlib.AbstractContextManager[Deployment]:
        """Fresh servers for `scenario`; `env` is added to the bench's server environment;
        `tree`: the project's code from there (`bench.revisions`), not this checkout's."""
        return deploy(
            kind,
            scenario.layer,
            workers=scenario.workers,
            databases=self.database(scenario.layer, tree),
            log_dir=self.work_dir,
            label=f"{scenario.name}-{kind.value}{label}",
            baseline_layer=self.options.baseline_layer,
            env=env,
        )

    def run(self, scenario: Scenario, kind: ServerKind) -> dict[str, Any]:
        self.progress.note(f"{scenario.name} / {kind.value}: {scenario.description}")
        if scenario.kind == "storm":
            return self.storm(scenario, kind)
        if scenario.kind == "hostile":
            return fairshare.hostile(self, scenario)
        if scenario.kind in cost.COMPARISONS:
            return cost.COMPARISONS[scenario.kind](self, scenario)
        if scenario.kind == "restart":
            return restart.restart(self, scenario)
        if scenario.kind == "stream":
            return stream.stream(self, scenario)
        return self.fanout(scenario, kind)

    # --- users ------------------------------------------------------------------------------

    def users(self, deployment: Deployment, count: int, prefix: str) -> list[User]:
        """`count` users in rooms of `room_size`; each room's users alternate between the
        deployment's workers."""
        size = self.options.room_size
        urls = deployment.urls
        return [
            User(
                index, f"{prefix}{index}", f"room-{index // size}", urls[(index % size) % len(urls)]
            )
            for index in range(count)
        ]

    # --- one step ---------------------------------------------------------------------------

    def step(
        self,
        deployment: Deployment,
        label: str,
        *,
        mode: str,
        offered: float | None,
        duration: float,
        users: int,
        room_size: int | None = None,
        tick: Callable[[], None] | None = None,
        reads: bool = False,
    ) -> StepResult:
        """One step; the users' rooms have `room_size` members (default: `options.room_size`);
        `tick` (if given) is called about every 0.25 s while the users send; `reads`: the
        users report what they read (`read` frames, at most one a second each)."""
        fleet, size = self.fleet, room_size or self.options.room_size
        metrics_before = deployment.metrics()
        log_lines_before = len(deployment.log_problems())
        cpu_before = CpuSnapshot.take(deployment, self.fleet)
        start_at = self.start(mode, (offered or 0.0) / size / users, duration, reads=reads)
        end = start_at + duration
        what = f"{offered:,.0f} deliveries/s offered" if offered else "closed loop"
        while (now := time.monotonic()) < end:
            self._show(label, what, f"{max(0.0, now - start_at):4.1f}/{duration:.0f} s")
            if tick is not None:
                tick()
            time.sleep(0.25)
        drain_end = end + self.options.drain_seconds
        time.sleep(0.1)
        while (now := time.monotonic()) < drain_end:
            if fleet.total(loadgen.RECEIVED) >= fleet.total(loadgen.SENT) * size:
                break
            self._show(label, what, f"draining {now - end:3.1f} s")
            time.sleep(0.05)
        drain = time.monotonic() - end
        replies = fleet.broadcast({"op": "collect"})
        cpu_after = CpuSnapshot.take(deployment, self.fleet)
        cpu = cpu_after.percent_since(cpu_before)
        deployment.check_alive()
        result = summarize(
            mode=mode, offered=offered, duration=duration, room_size=size, replies=replies
        )
        result.server_cpu = cpu["server"]
        result.server_cpu_seconds = cpu_after.server - cpu_before.server
        result.services_cpu = cpu["services"]
        result.other_cpu = max(
            0.0, cpu["machine"] - cpu["server"] - cpu["generator"] - cpu["services"]
        )
        result.drain_s = round(drain, 2)
        result.server_signals = self.signals(
            metrics_before, deployment.metrics(), len(deployment.log_problems()) - log_lines_before
        )
        self.progress.note(f"  {label} {what}: {describe(result)}")
        return result

    def start(
        self,
        mode: str,
        rate_per_user: float,
        duration: float,
        senders: list[int] | None = None,
        *,
        reads: bool = False,
    ) -> float:
        """Start the next step in every generator process: `mode` `rate` (each sender sends
        `rate_per_user` messages/s; default senders: every user), `closed` (loop) or
        `recover` (as `rate`, while recovering users reconnect and catch up); when it starts."""
        self.step_number += 1
        start_at = time.monotonic() + 0.3
        self.fleet.broadcast(
            {
                "op": "start",
                "step": self.step_number,
                "mode": mode,
                "rate_per_user": rate_per_user,
                "senders": senders,
                "start_at": start_at,
                "duration": duration,
                "timeout": 30.0,
                "reads": reads,
            }
        )
        return start_at

    def _show(self, label: str, what: str, clock: str) -> None:
        fleet = self.fleet
        self.progress.update(
            f"{label} {what} {clock} | sent {fleet.total(loadgen.SENT):,} "
            f"received {fleet.total(loadgen.RECEIVED):,} open {fleet.total(loadgen.OPEN):,} "
            f"errors {fleet.total(loadgen.ERRORS):,}"
        )

    @staticmethod
    def signals(before: dict[str, float], after: dict[str, float], log_lines: int) -> dict:
        """What the server itself reported during the step: changes of non-routine counters,
        observations over SLOW_SECONDS in overload-like histograms (loop lag...), non-zero
        overload-like gauges (backlog, waiting...), warning/error log lines."""

        def change(name: str) -> float:
            return after.get(name, 0.0) - before.get(name, 0.0)

        signals = {}
        for name, value in after.items():
            metric, _, labels = name.partition("{")
            overload_like = OVERLOAD_NAME.search(metric) is not None
            if metric.endswith(HIGH_WATER_MARK):
                continue
            if metric.endswith("_total") and not metric.startswith(ROUTINE_METRICS):
                if change(name):
                    signals[name] = change(name)
            elif metric.endswith("_count") and overload_like:
                inner = labels.rstrip("}")
                bucket = f"{metric[: -len('_count')]}_bucket{{{inner}{',' if inner else ''}"
                bucket += f'le="{SLOW_SECONDS}"}}'
                if bucket in after and change(name) - change(bucket) > 0:
                    signals[f"{name} > {SLOW_SECONDS} s"] = change(name) - change(bucket)
            elif not metric.endswith(HISTOGRAM_PARTS) and overload_like and value > 0:
                signals[name] = value
        if log_lines:
            signals["log_problem_lines"] = log_lines
        return signals

    # --- fan-out ----------------------------------------------------------------------------

    def fanout(self, scenario: Scenario, kind: ServerKind) -> dict[str, Any]:
        options = self.options
        count = options.rooms * options.room_size
        label = f"{scenario.name}/{kind.value}"
        with self.deploy(scenario, kind) as deployment:
            joined = self.connect(deployment, kind, self.users(deployment, count, "user-"), label)
            step = self._stepper(deployment, label, count)
            step(mode="rate", offered=options.light_load / 4, duration=options.warmup_seconds)
            closed = step(mode="closed", offered=None, duration=options.closed_seconds)
            steps = self.sweep(step, closed.delivered_per_s)
            closing = merge_counts([reply["closes"] for reply in self.fleet.close_all()])
            problems = deployment.log_problems()
        sustained = [result for result in steps if result.sustained]
        light = min(
            (result for result in steps if result.counted),
            key=lambda result: abs(math.log((result.offered or 1) / options.light_load)),
        )
        return {
            **scenario.head(kind),
            "rooms": options.rooms,
            "room_size": options.room_size,
            "connect": joined,
            "closed_loop": closed.to_json(),
            "steps": [result.to_json() for result in steps],
            "capacity": max((result.delivered_per_s for result in sustained), default=0.0),
            "light_load": {
                "offered": light.offered,
                "p50_ms": light.p50_ms,
                "p99_ms": light.p99_ms,
            },
            "loss_below_capacity": sum(result.lost for result in steps if result.sustained),
            "unexpected_closes": closing,
            "log_problems": problems[-20:],
            "log_problem_count": len(problems),
        }

    def _stepper(self, deployment: Deployment, label: str, users: int) -> StepFn:
        def step(*, mode: str, offered: float | None, duration: float) -> StepResult:
            return self.step(
                deployment, label, mode=mode, offered=offered, duration=duration, users=users
            )

        return step

    def sweep(self, step: StepFn, closed_loop_rate: float) -> list[StepResult]:
        """The light-load point; then rising fixed rates from about half the closed-loop rate
        until one is not sustained (or falling ones, halving, until one is); then bisection
        between the last good and the first bad rate (`refine` steps)."""
        options = self.options
        results: list[StepResult] = []

        def at(offered: float) -> StepResult:
            """The result at this rate (measured once, or reused from a close rate); a rate
            not sustained is tried once more (`confirm`), and the better try counts."""
            tried = [r for r in results if abs((r.offered or 0) / offered - 1) < SAME_RATE]
            if tried:
                return next((r for r in tried if r.sustained), tried[0])
            result = step(mode="rate", offered=offered, duration=options.step_seconds)
            results.append(result)
            if options.confirm and not result.sustained:
                again = step(mode="rate", offered=offered, duration=options.step_seconds)
                again.repeat = True
                results.append(again)
                if again.sustained:
                    return again
            return result

        light = at(options.light_load)
        offered = round_load(max(options.light_load / 4, closed_loop_rate / 2))
        if not light.sustained:  # the capacity is below the light load: start under it
            offered = min(offered, round_load(options.light_load / 2))
        good, bad = (offered, None) if at(offered).sustained else (None, offered)
        while len(results) < options.max_steps:
            if bad is None:
                offered = round_load(offered * options.growth)
                if not at(offered).sustained:
                    bad = offered
                else:
                    good = offered
            elif good is None and offered > MIN_OFFERED:
                offered = round_load(offered / 2)
                if at(offered).sustained:
                    good = offered
                else:
                    bad = offered
            else:
                break
        for _ in range(options.refine):
            if good is None or bad is None or bad / good < 1.08:
                break
            middle = round_load(math.sqrt(good * bad))
            if at(middle).sustained:
                good = middle
            else:
                bad = middle
        mark_counted(results)
        return sorted(results, key=lambda result: result.offered or 0)

    # --- connections ------------------------------------------------------------------------

    def connect(
        self,
        deployment: Deployment,
        kind: ServerKind,
        users: list[User],
        label: str,
        *,
        padding: str | None = None,
        recover: bool = False,
    ) -> dict[str, Any]:
        """Open these users' sockets in bursts; join latency, failures. Their messages end with
        `padding` (default: `options.padding` characters); `recover`: they reconnect and catch
        up as protocol clients do."""
        if padding is None:
            padding = "x" * self.options.padding
        burst = self.options.burst
        latencies: list[float] = []
        failed = 0
        started = time.monotonic()
        for first in range(0, len(users), burst):
            self.progress.update(
                f"{label} connecting {first:,}/{len(users):,} "
                f"errors {self.fleet.total(loadgen.ERRORS):,}"
            )
            replies = self.fleet.connect(
                kind, users[first : first + burst], padding=padding, recover=recover
            )
            for reply in replies:
                latencies.extend(reply["latencies_ms"])
                failed += reply["failed"]
        elapsed = time.monotonic() - started
        latencies.sort()
        deployment.check_alive()
        status = self.fleet.broadcast({"op": "status"})
        return {
            "attempted": len(users),
            "joined": len(latencies),
            "failed": failed,
            "seconds": round(elapsed, 2),
            "p50_ms": percentile(latencies, 0.5),
            "p99_ms": percentile(latencies, 0.99),
            "max_ms": latencies[-1] if latencies else 0.0,
            "errors": merge_counts([reply["errors"] for reply in status]),
        }

    def storm(self, scenario: Scenario, kind: ServerKind) -> dict[str, Any]:
        options = self.options
        label = f"{scenario.name}/{kind.value}"
        with self.deploy(scenario, kind) as deployment:
            # Warm the server (lazy imports, first-request setup) before the RSS baseline.
            self.connect(deployment, kind, self.users(deployment, 20, "warm-"), label)
            self.fleet.close_all()
            time.sleep(1.0)
            rss_before = deployment.rss()
            users = self.users(deployment, options.connections, "storm-")
            cpu_before = deployment.cpu_seconds()
            joined = self.connect(deployment, kind, users, label)
            join_cpu = deployment.cpu_seconds() - cpu_before
            deadline = time.monotonic() + options.hold_seconds
            while (now := time.monotonic()) < deadline:
                self.progress.update(
                    f"{label} holding {self.fleet.total(loadgen.OPEN):,} sockets "
                    f"({deadline - now:3.0f} s left)"
                )
                time.sleep(0.25)
            rss_after = deployment.rss()
            status = self.fleet.broadcast({"op": "status"})
            held = sum(reply["open"] for reply in status)
            closes = merge_counts([reply["closes"] for reply in status])
            errors = merge_counts([reply["errors"] for reply in status])
            self.fleet.close_all()
            deployment.check_alive()
            problems = deployment.log_problems()
        per_connection = (rss_after - rss_before) / max(1, joined["joined"]) / 1024
        result = {
            **scenario.head(kind),
            "connect": joined,
            "held": held,
            "closes": closes,
            "errors": errors,
            "rss_before_mb": round(rss_before / 2**20, 1),
            "rss_after_mb": round(rss_after / 2**20, 1),
            "kb_per_connection": round(per_connection, 1),
            # server CPU while the sockets joined, per join: steadier than joins/s on a
            # shared machine
            "cpu_ms_per_join": round(1000 * join_cpu / max(1, joined["joined"]), 3),
            "log_problems": problems[-20:],
            "log_problem_count": len(problems),
        }
        self.progress.note(
            f"  {label}: {held:,}/{options.connections:,} held, join p50 {joined['p50_ms']:.0f} ms "
            f"p99 {joined['p99_ms']:.0f} ms, {per_connection:.1f} KB/socket, "
            f"{1000 * join_cpu / max(1, joined['joined']):.2f} CPU ms/join, "
            f"failed {joined['failed']}, closes {closes or 0}"
        )
        return result


def round_load(value: float) -> float:
    """Round an offered load to 2 significant figures (readable step labels)."""
    if value <= 0:
        return 0.0
    digits = 1 - math.floor(math.log10(value))
    return float(round(value, digits))


def describe(result: StepResult) -> str:
    verdict = "ok" if result.sustained else "NOT sustained"
    extras = ""
    if result.errors:
        extras += f" errors {result.errors}"
    if result.closes:
        extras += f" closes {result.closes}"
    if result.server_signals:
        extras += f" server {result.server_signals}"
    return (
        f"delivered {result.delivered_per_s:,.0f}/s lost {result.lost:,} "
        f"p50 {result.p50_ms:.1f} p99 {result.p99_ms:.1f} max {result.max_ms:.0f} ms "
        f"srv cpu {result.server_cpu:.0f}% gen cpu "
        f"{'+'.join(f'{cpu:.0f}' for cpu in result.generator_cpu)}% "
        f"redis+pg {result.services_cpu:.0f}% other {result.other_cpu:.0f}% [{verdict}]{extras}"
    )
