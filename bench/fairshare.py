"""The hostile-client measurements (protocol §16, issue 13), Clarity only; the protections'
CPU cost (`fair-share-cost`) is in `bench.cost`.

`hostile`: for each attack of `bench.attacks.ATTACKS` in turn (a control without attack
first), a fresh worker (memory figures mean something only on a fresh one), a busy room (one
room of the generator's users sending at a fixed rate: one fixed-rate step of the fan-out
machinery, lasting the attack), a bystander timing heartbeats in a quiet room, and the
attack. The worker's own figures come from its `/metrics` read before and after: its
event-loop lag (`clarity_event_loop_lag_seconds`, and the longest so far), the slow-consumer
closes; its RSS from psutil, read every 0.25 s.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from bench import attacks
from bench.fleet import Fleet
from bench.servers import HOSTILE_ENV, Deployment, ServerKind
from bench.wire import User

if TYPE_CHECKING:
    from bench.scenarios import Bench, Scenario

# The issue's targets.
LAG_LIMIT = "0.05"  # s: the loop is never later (a bucket bound of the lag histogram)
RTT_LIMIT_MS = 50.0  # a bystander's heartbeat p99
RSS_LIMIT_MB = 50.0  # worker RSS growth over an attack (the issue: over 60 s)
CLOSE_LIMIT = "5.0"  # s from passing the outbound bound to the connection gone (a bucket bound)

LAG = "clarity_event_loop_lag_seconds"
LAG_MAX = "clarity_event_loop_lag_max_seconds"
# The slow-consumer protection's metrics: seconds from a socket's unsent data passing
# CHAT_MAX_OUTBOUND_BUFFER to the connection gone, and slow closes by outcome. Code without
# them is reported "n/a (metric absent)".
SLOW_CLOSE_SECONDS = "clarity_slow_consumer_close_seconds"
SLOW_CLOSES = "clarity_slow_consumer_closes_total"


# --- reading /metrics -----------------------------------------------------------------------


def labels_of(sample: str) -> dict[str, str]:
    inner = sample.partition("{")[2].rstrip("}")
    pairs = (item.split("=", 1) for item in inner.split(",") if "=" in item)
    return {key: value.strip('"') for key, value in pairs}


def histogram_delta(
    before: dict[str, float], after: dict[str, float], name: str
) -> tuple[float, dict[float, float]] | None:
    """(observations, cumulative observations by bucket bound) of a histogram between two
    reads of /metrics, summed over its labels; None if the server has no such histogram."""
    if not any(sample.partition("{")[0] == f"{name}_count" for sample in after):
        return None
    count, buckets = 0.0, {}
    for sample, value in after.items():
        metric = sample.partition("{")[0]
        change = value - before.get(sample, 0.0)
        if metric == f"{name}_count":
            count += change
        elif metric == f"{name}_bucket":
            bound = float(labels_of(sample)["le"])
            buckets[bound] = buckets.get(bound, 0.0) + change
    return count, buckets


def over(delta: tuple[float, dict[float, float]], limit: str) -> float | None:
    """Observations above `limit` (a bucket bound), or None without that bucket."""
    count, buckets = delta
    return None if float(limit) not in buckets else count - buckets[float(limit)]


def upper_bound(delta: tuple[float, dict[float, float]]) -> float | None:
    """The smallest bucket bound that holds every observation (None: no observation)."""
    count, buckets = delta
    if not count:
        return None
    return min(bound for bound, seen in buckets.items() if seen >= count)


def counter_delta(before: dict[str, float], after: dict[str, float], name: str) -> dict | None:
    """A counter's change by label value (its first label), None if the server lacks it."""
    changes: dict[str, float] = {}
    for sample, value in after.items():
        if sample.partition("{")[0] == name:
            label = next(iter(labels_of(sample).values()), "")
            changes[label] = changes.get(label, 0.0) + value - before.get(sample, 0.0)
    return changes if changes or name in after else None


def loop_lag(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """The worker's event-loop lag during the attack: ticks later than LAG_LIMIT, and the
    longest lag: exact if it beat the worker's earlier record, else an upper bound (that
    record, or the histogram's bucket)."""
    delta = histogram_delta(before, after, LAG)
    if delta is None:
        return {"ticks": None, "over_limit": None, "max_ms": None, "max_exact": False}
    peak_before, peak_after = before.get(LAG_MAX), after.get(LAG_MAX)
    exact = peak_after is not None and peak_after > (peak_before or 0.0)
    bounds = [b for b in (upper_bound(delta), peak_before) if b is not None]
    longest = peak_after if exact else min(bounds, default=None)
    return {
        "ticks": delta[0],
        "over_limit": over(delta, LAG_LIMIT),
        "max_ms": None if longest is None or math.isinf(longest) else longest * 1000,
        "max_exact": exact,
    }


def slow_closes(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """The slow-consumer protection's own account (None where the metric is absent)."""
    delta = histogram_delta(before, after, SLOW_CLOSE_SECONDS)
    bound = None if delta is None else upper_bound(delta)
    return {
        "closed": None if delta is None else delta[0],
        "over_limit": None if delta is None else over(delta, CLOSE_LIMIT),
        "max_s": None if bound is None or math.isinf(bound) else bound,
        "by_outcome": counter_delta(before, after, SLOW_CLOSES),
    }


class RssWatch:
    """The server's RSS, sampled: at the start, the last sample before the attack's end, the
    highest."""

    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        self.samples = [(time.monotonic(), deployment.rss())]

    def sample(self) -> None:
        self.samples.append((time.monotonic(), self.deployment.rss()))

    def figures(self, end: float) -> dict[str, float]:
        before_end = [rss for moment, rss in self.samples if moment <= end] or [0]
        mb = 2**20
        return {
            "rss_start_mb": round(self.samples[0][1] / mb, 1),
            "rss_end_mb": round(before_end[-1] / mb, 1),
            "rss_peak_mb": round(max(rss for _, rss in self.samples) / mb, 1),
        }


# --- hostile --------------------------------------------------------------------------------


def hostile(bench: Bench, scenario: Scenario) -> dict[str, Any]:
    options = bench.options
    with Fleet(2, target=attacks.main) as clients:
        phases = [
            attack_phase(bench, scenario, clients, attack)
            for attack in attacks.ATTACKS.values()
            if attack.name in (options.attacks or attacks.ATTACKS)
        ]
    return {
        **scenario.head(ServerKind.CLARITY),
        "attack_seconds": options.attack_seconds,
        "busy_room": {
            "senders": attacks.BUSY_SENDERS,
            "messages_per_s": attacks.BUSY_SENDERS * attacks.BUSY_RATE,
            "content_chars": len(attacks.BUSY_PADDING) + 40,
        },
        "bystander": {
            "users": attacks.BYSTANDERS,
            "heartbeat_every_s": attacks.BYSTANDER_INTERVAL / attacks.BYSTANDERS,
        },
        "server_env": HOSTILE_ENV,
        "attacks": phases,
    }


def attack_phase(bench: Bench, scenario: Scenario, clients: Fleet, attack: attacks.Attack) -> dict:
    options, kind = bench.options, ServerKind.CLARITY
    label = f"{scenario.name}/{attack.name}"
    size = attacks.BUSY_SENDERS
    offered = size * attacks.BUSY_RATE * size  # deliveries/s: messages/s x room size
    duration = options.attack_seconds
    with bench.deploy(scenario, kind, env=HOSTILE_ENV, label=f"-{attack.name}") as deployment:
        url = deployment.urls[0]
        users = [User(i, f"busy-{i}", attacks.BUSY_ROOM, url) for i in range(size)]
        bench.connect(deployment, kind, users, label, padding=attacks.BUSY_PADDING)
        bench.step(
            deployment,
            f"{label} warm-up",
            mode="rate",
            offered=offered,
            duration=options.warmup_seconds,
            users=size,
            room_size=size,
        )
        bench.progress.update(f"{label}: setting up the bystander and the attack")
        setup = {"op": "setup", "url": url}
        clients.call([setup | {"role": "bystander"}, setup | {"role": attack.name}])
        metrics_before = deployment.metrics()
        log_lines_before = len(deployment.log_problems())
        rss = RssWatch(deployment)
        start_at = time.monotonic() + 0.3
        clients.broadcast({"op": "start", "start_at": start_at, "duration": duration})
        busy = bench.step(
            deployment,
            label,
            mode="rate",
            offered=offered,
            duration=duration,
            users=size,
            room_size=size,
            tick=rss.sample,
        )
        metrics_after = deployment.metrics()
        bystander, attacker = clients.broadcast({"op": "collect"}, timeout=120)
        clients.broadcast({"op": "close"})
        bench.fleet.close_all()
        deployment.check_alive()
        problems = deployment.log_problems()
    result = {
        "attack": attack.name,
        "issue": attack.issue,
        "rate": attack.rate,
        "what": attack.what,
        "seconds": duration,
        "bystander": bystander,
        "attacker": attacker,
        "lag": loop_lag(metrics_before, metrics_after),
        **rss.figures(start_at + duration),
        "slow_closes": slow_closes(metrics_before, metrics_after),
        "busy_room": {
            "p50_ms": busy.p50_ms,
            "p99_ms": busy.p99_ms,
            "lost": busy.lost,
            "closes": busy.closes,
            "errors": busy.errors,
        },
        "server_signals": bench.signals(
            metrics_before, metrics_after, len(problems) - log_lines_before
        ),
        "log_problems": problems[-10:],
    }
    result["verdicts"] = attack_verdicts(result)
    bench.progress.note(f"  {label}: {describe(result)}")
    return result


def attack_verdicts(result: dict[str, Any]) -> dict[str, bool | None]:
    """Each target that applies to this attack: met (True), missed (False), not measured (None)."""
    bystander, attacker, lag = result["bystander"], result["attacker"], result["lag"]
    verdicts: dict[str, bool | None] = {
        "lag": None if lag["over_limit"] is None else lag["over_limit"] == 0,
        "bystander": (
            bystander["p99_ms"] < RTT_LIMIT_MS
            and bystander["unanswered"] == 0
            and not bystander["closes"]
        ),
        "rss": result["rss_end_mb"] - result["rss_start_mb"] <= RSS_LIMIT_MB,
    }
    if result["attack"] == "non-reading":
        slow = result["slow_closes"]
        all_closed = attacker["open_at_end"] == 0 and attacker["sockets"] == attacks.NON_READERS
        timed = None
        if slow["over_limit"] is not None:
            timed = slow["closed"] >= attacks.NON_READERS and slow["over_limit"] == 0
        verdicts["closed"] = False if not all_closed else timed
    if result["attack"] == "slow-handshake":
        verdicts["closed"] = attacker["open_at_end"] == 0
    return verdicts


def overall(verdicts: dict[str, bool | None]) -> bool | None:
    """Missed if any target is missed; else unknown if any is unmeasured; else met."""
    if False in verdicts.values():
        return False
    return None if None in verdicts.values() else True


def describe(result: dict[str, Any]) -> str:
    bystander, lag = result["bystander"], result["lag"]
    lag_max = (
        "n/a" if lag["max_ms"] is None else f"{'' if lag['max_exact'] else '<='}{lag['max_ms']:.0f}"
    )
    verdict = {True: "pass", False: "FAIL", None: "not all measured"}[overall(result["verdicts"])]
    return (
        f"{result['rate']}: bystander p50 {bystander['p50_ms']:.1f} p99 {bystander['p99_ms']:.1f} "
        f"max {bystander['max_ms']:.0f} ms; loop lag max {lag_max} ms ({lag['over_limit']} ticks "
        f"> {float(LAG_LIMIT) * 1000:.0f} ms); RSS {result['rss_start_mb']:.0f} -> "
        f"{result['rss_end_mb']:.0f} MB; attacker {attacker_outcome(result['attacker'])} "
        f"[{verdict}]"
    )


def attacker_outcome(attacker: dict[str, Any]) -> str:
    """What the server did to the attacker: closes, refusals, error codes, what stayed open."""
    parts = [f"sent {attacker['sent']}"]
    parts += [f"close {code} x{n}" for code, n in sorted(attacker["closes"].items())]
    parts += [f"{code} x{n}" for code, n in sorted(attacker["errors"].items())]
    parts += [f"refused {why} x{n}" for why, n in sorted(attacker["refusals"].items())]
    for key in ("open_at_end", "joined", "analyses_completed", "sockets_opened"):
        if key in attacker:
            parts.append(f"{key.replace('_', ' ')} {attacker[key]}")
    return ", ".join(parts)
