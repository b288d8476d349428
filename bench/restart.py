"""The `restart` scenario (issue 16): a worker restarted under its connected users, Clarity only.

One worker (two with `restart-2w`, the first restarted) on Redis and PostgreSQL, as
`fanout-redis` deploys it; `restart_users` users in rooms of `room_size`, connected and
joined as recovering clients (`bench.recovery`: they reconnect with backoff, catch up by seq
and send again what was not echoed). SENDERS_PER_ROOM users of each room send at a fixed
total rate for the whole scenario, each message with its own client id. After
`restart_before` seconds the worker gets SIGTERM (a deploy) or SIGKILL (a crash), and a
fresh process of it is started on the same port as soon as it has exited. The scenario waits
until every user is open again and caught up (or `restart_deadline` has passed since the
signal), lets the messages flow for `restart_after` seconds more, stops them, and lets every
user settle.

From the signal: each closed user's back time (its last join) and caught-up time (every room
event up to its reconnect ack's `last_seq` arrived); after the run, every acknowledged message
(its sender got its echo) checked in the view of every user of its room that is back:
missing ones, messages stored twice (one client id under two stored ids), seqs not held
contiguously. Refusals an honest reconnecting client should never get (4029 / RATE_LIMITED,
4008 / TOO_MANY_CONNECTIONS, a refused catch-up read) are counted as failures.
"""

from __future__ import annotations

import signal
import time
from typing import TYPE_CHECKING, Any

from bench import loadgen
from bench.fleet import merge_counts
from bench.servers import (
    Restart,
    ServerKind,
    cpu_delta,
    services_cpu_seconds,
    worker_cpu_seconds,
)
from bench.stats import percentile

if TYPE_CHECKING:
    from bench.scenarios import Bench, Scenario

RESTART_LIMIT = 10.0  # s from the signal until every user is back and caught up (issue 16)
SENDERS_PER_ROOM = 2
# At most, after the messages stop, for echoes and catch-ups to finish: a worker that fell
# behind may still be delivering its backlog.
SETTLE_SECONDS = 30.0
BACK_AFTER_LISTENING = 0.5  # s: users closed by the exit have seen their close by then
SIGNALS = {"term": signal.SIGTERM, "kill": signal.SIGKILL}
# What an honest reconnecting client should never be refused with (protocol §10, §16).
REFUSALS = ("RATE_LIMIT_EXCEEDED", "TOO_MANY_CONNECTIONS", "close 4029", "close 4008")
REFUSED_CLOSES = ("4029", "4008")


def restart(bench: Bench, scenario: Scenario) -> dict[str, Any]:
    options, kind, fleet = bench.options, ServerKind.CLARITY, bench.fleet
    label = scenario.name
    sig = SIGNALS[options.restart_signal]
    with bench.deploy(scenario, kind, label=f"-{options.restart_signal}") as deployment:
        users = bench.users(deployment, options.restart_users, "restart-")
        joined = bench.connect(deployment, kind, users, label, recover=True)
        senders = [u.index for u in users if u.index % options.room_size < SENDERS_PER_ROOM]
        start_at = bench.start(
            "recover",
            options.restart_rate / len(senders),
            options.restart_before + options.restart_deadline + options.restart_after + 60,
            senders,
        )
        wait(bench, label, "before the restart", start_at + options.restart_before)
        bench.progress.update(f"{label}: {sig.name} to worker 0, then a fresh one on its port")
        generator_cpu, services_cpu = fleet.cpu_seconds(), services_cpu_seconds()
        restarted = deployment.restart(0, sig)
        shutdown = restarted.exited_at - restarted.signalled_at
        bench.progress.note(
            f"  {label}: {sig.name}: exited after {shutdown:.2f} s (code {restarted.exit_code}),"
            f" listening again {restarted.listening_at - restarted.exited_at:.2f} s later"
        )
        everyone_back = wait_back(bench, label, len(users), restarted, options.restart_deadline)
        cpu = recovery_cpu(
            restarted,
            generator=[a - b for a, b in zip(fleet.cpu_seconds(), generator_cpu, strict=True)],
            services=cpu_delta(services_cpu, services_cpu_seconds()),
            worker=worker_cpu_seconds(deployment.servers[0]),
        )
        wait(bench, label, "after", time.monotonic() + options.restart_after)
        bench.progress.update(f"{label}: settling")
        settling = time.monotonic()
        replies = fleet.broadcast({"op": "collect", "drain": SETTLE_SECONDS})
        settled_s = time.monotonic() - settling
        fleet.close_all()
        deployment.check_alive()
        problems = deployment.log_problems()
    reports = [report for reply in replies for report in reply["recovery"]]
    result = {
        **scenario.head(kind),
        "users": len(users),
        "room_size": options.room_size,
        "senders": len(senders),
        "messages_per_s": options.restart_rate,
        "deadline_s": options.restart_deadline,
        "connect": joined,
        "restart": {
            "signal": restarted.signal,
            "exit_code": restarted.exit_code,
            "shutdown_s": round(restarted.exited_at - restarted.signalled_at, 3),
            "downtime_s": round(restarted.listening_at - restarted.exited_at, 3),
        },
        "everyone_back_s": None
        if everyone_back is None
        else round(everyone_back - restarted.signalled_at, 3),
        "cpu_until_back": cpu,
        "settled_s": round(settled_s, 2),
        "sent": sum(reply["sent"] for reply in replies),
        "send_failures": sum(reply["send_failures"] for reply in replies),
        "errors": merge_counts([reply["errors"] for reply in replies]),
        **recovery_figures(reports, restarted, options.restart_deadline),
        "log_problems": problems[-20:],
        "log_problem_count": len(problems),
    }
    bench.progress.note(f"  {label}: {describe(result)}")
    return result


def wait(bench: Bench, label: str, what: str, until: float) -> None:
    while (now := time.monotonic()) < until:
        show(bench, label, f"{what} ({until - now:3.1f} s left)")
        time.sleep(0.1)


def wait_back(
    bench: Bench, label: str, users: int, restarted: Restart, deadline: float
) -> float | None:
    """Until every user is open and none is away (closed, not yet back and caught up), or
    `deadline` seconds after the signal: when (monotonic), or None."""
    fleet, settled_from = bench.fleet, restarted.listening_at + BACK_AFTER_LISTENING
    while (now := time.monotonic()) < restarted.signalled_at + deadline:
        show(bench, label, f"{now - restarted.signalled_at:4.1f} s after the signal")
        away, open_ = fleet.total(loadgen.AWAY), fleet.total(loadgen.OPEN)
        if now >= settled_from and away == 0 and open_ == users:
            return now
        time.sleep(0.05)
    return None


def show(bench: Bench, label: str, what: str) -> None:
    fleet = bench.fleet
    bench.progress.update(
        f"{label} {what} | open {fleet.total(loadgen.OPEN):,} away {fleet.total(loadgen.AWAY):,}"
        f" sent {fleet.total(loadgen.SENT):,} received {fleet.total(loadgen.RECEIVED):,} "
        f"errors {fleet.total(loadgen.ERRORS):,}"
    )


def recovery_cpu(
    restarted: Restart, *, generator: list[float], services: float, worker: float
) -> dict[str, Any]:
    """% of one core from the signal until now: each generator process, Redis + PostgreSQL;
    the new worker's since it was started (at the old one's exit)."""
    now = time.monotonic()
    since_signal, since_start = now - restarted.signalled_at, now - restarted.exited_at
    return {
        "generator": [round(100 * seconds / since_signal) for seconds in generator],
        "services": round(100 * services / since_signal),
        "new_worker": round(100 * worker / since_start),
    }


def spread(values: list[float]) -> dict[str, float | None]:
    ordered = sorted(values)
    if not ordered:
        return {"p50": None, "p99": None, "max": None}
    return {
        "p50": round(percentile(ordered, 0.5), 3),
        "p99": round(percentile(ordered, 0.99), 3),
        "max": round(ordered[-1], 3),
    }


def refused(report: dict[str, Any]) -> bool:
    """Whether a reconnect or catch-up of this user was refused by a budget."""
    return (
        any(reason.endswith(REFUSALS) for reason in report["refusals"])
        or any(code in report["closes"] for code in REFUSED_CLOSES)
        or report["catch_up_refused"] > 0
    )


def recovery_figures(
    reports: list[dict[str, Any]], restarted: Restart, deadline: float
) -> dict[str, Any]:
    """Back and caught-up times from the signal, and what every user that is back lacks."""
    since = restarted.signalled_at
    closed = [r for r in reports if r["closes"]]
    back = [r["joined_at"] - since for r in closed if r["joined_at"] is not None]
    caught = [r["caught_up_at"] - since for r in closed if r["caught_up_at"] is not None]
    acknowledged: dict[str, dict[str, int]] = {}
    for report in reports:
        for stored, seq in report["acknowledged"]:
            acknowledged.setdefault(report["room"], {})[stored] = seq
    missing, tail = {}, 0
    for report in (r for r in reports if r["joined_at"] is not None):
        have = set(report["ids"])
        due = acknowledged.get(report["room"], {})
        lacking = [seq for s, seq in due.items() if seq > report["baseline"] and s not in have]
        if lacking:
            missing[report["user"]] = len(lacking)
            tail += sum(1 for seq in lacking if seq > report["highest"])
    return {
        "closed_users": len(closed),
        "never_back": sum(
            1 for r in closed if r["joined_at"] is None or r["joined_at"] - since > deadline
        ),
        "not_caught_up": len(closed) - len(caught),
        "back_s": spread(back),
        "caught_up_s": spread(caught),
        "refused_users": sum(1 for r in reports if refused(r)),
        "refusals": merge_counts([r["refusals"] for r in reports]),
        "closes": merge_counts([r["closes"] for r in reports]),
        "attempts": sum(r["attempts"] for r in reports),
        "attempts_max": max((r["attempts"] for r in reports), default=0),
        "catch_ups": sum(r["catch_ups"] for r in reports),
        "catch_up_refused": sum(r["catch_up_refused"] for r in reports),
        "gap_fetches": sum(r["gap_fetches"] for r in reports),
        "acknowledged": sum(len(ids) for ids in acknowledged.values()),
        "unacknowledged": sum(r["unacknowledged"] for r in reports),
        "missing": sum(missing.values()),
        "missing_after_last_received": tail,  # nothing later arrived either: not a gap
        "users_missing": len(missing),
        "duplicates": sum(r["duplicates"] for r in reports),
        "seq_clashes": sum(r["seq_clashes"] for r in reports),
        "gaps": sum(1 for r in reports if r["held"] < r["highest"]),
        "redelivered": sum(r["redelivered"] for r in reports),
    }


def met(result: dict[str, Any]) -> bool:
    """The issue's target: every closed user back and caught up within RESTART_LIMIT of the
    signal, none refused, every acknowledged message in every view once, no gap."""
    caught_max = result["caught_up_s"]["max"]
    return (
        result["not_caught_up"] == 0
        and caught_max is not None
        and caught_max <= RESTART_LIMIT
        and result["refused_users"] == 0
        and result["missing"] == result["duplicates"] == result["seq_clashes"] == 0
        and result["gaps"] == 0
    )


def seconds(figures: dict[str, float | None]) -> str:
    return "/".join("-" if figures[key] is None else f"{figures[key]:.2f}" for key in figures)


def describe(result: dict[str, Any]) -> str:
    restarted, cpu = result["restart"], result["cpu_until_back"]
    return (
        f"{result['closed_users']:,}/{result['users']:,} closed; back p50/p99/max "
        f"{seconds(result['back_s'])} s, caught up {seconds(result['caught_up_s'])} s; never "
        f"back {result['never_back']}, not caught up {result['not_caught_up']}, refused "
        f"{result['refused_users']}; acknowledged {result['acknowledged']:,}, missing "
        f"{result['missing']}, duplicates {result['duplicates']}, gaps {result['gaps']}; "
        f"downtime {restarted['downtime_s']:.2f} s (shutdown {restarted['shutdown_s']:.2f} s); "
        f"closes {result['closes']}, refusals {result['refusals']}; settled in "
        f"{result['settled_s']:.1f} s, {result['unacknowledged']} unacknowledged; cpu% until "
        f"back: generators {'+'.join(str(c) for c in cpu['generator'])}, new worker "
        f"{cpu['new_worker']}, redis+pg {cpu['services']} "
        f"[{'pass' if met(result) else 'FAIL'}]"
    )
