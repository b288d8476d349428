"""Figures of one step, and the rule that says whether a step was sustained."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

P99_LIMIT_MS = 250.0


def pair_ratios(
    runs: Sequence[dict], *, key: str, value: str, measured: str, reference: str, pairs: int
) -> tuple[list[float], float | None]:
    """Runs measured in interleaved pairs (`run` its pair's index, `key` which of the two):
    each pair's `value` of `measured` over `reference` (pairs whose reference is 0 or
    missing left out), and their median (None if none)."""
    by_pair = [
        {run[key]: run[value] for run in runs if run["run"] == index} for index in range(pairs)
    ]
    ratios = [pair[measured] / pair[reference] for pair in by_pair if pair.get(reference)]
    return ratios, statistics.median(ratios) if ratios else None


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (0 when empty)."""
    if not ordered:
        return 0.0
    rank = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))
    return float(ordered[rank])


@dataclass
class StepResult:
    mode: str  # "rate" (fixed offered load) or "closed" (closed loop)
    offered: float | None  # deliveries/s offered (None for the closed loop)
    duration: float
    room_size: int
    sent: int
    expected: int
    received: int
    lost: int
    duplicates: int
    late: int  # probes of an earlier step that arrived during this one
    delivered_per_s: float
    sent_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    send_lag_max_ms: float  # how far the generator fell behind its schedule
    send_failures: int
    timeouts: int  # closed loop: a user's own message did not come back in time
    errors: dict[str, int] = field(default_factory=dict)
    closes: dict[str, int] = field(default_factory=dict)
    generator_cpu: list[float] = field(default_factory=list)  # % of one core, per process
    server_cpu: float = 0.0  # % of one core, all server processes
    server_cpu_seconds: float = 0.0  # CPU time of all server processes (step and drain)
    services_cpu: float = 0.0  # % of one core, Redis and PostgreSQL processes
    other_cpu: float = 0.0  # % of one core used by the rest of the machine (noise)
    repeat: bool = False  # a second try of a rate that was not sustained the first time
    counted: bool = True  # the try that stands for its rate (the sustained one, else the first)
    server_signals: dict[str, float] = field(default_factory=dict)  # metric deltas, log lines
    drain_s: float = 0.0
    # Every probe's latency, ascending (for pooling steps; left out of the JSON).
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def sustained(self) -> bool:
        """0 loss, p99 under the limit, no errors or closes, and the offered load was sent."""
        kept_up = self.offered is None or self.sent_per_s * self.room_size >= 0.97 * self.offered
        return (
            self.lost == 0
            and self.p99_ms < P99_LIMIT_MS
            and not self.errors
            and not self.closes
            and self.send_failures == 0
            and kept_up
        )

    def to_json(self) -> dict[str, Any]:
        record = asdict(self) | {"sustained": self.sustained}
        del record["latencies_ms"]
        return record


def summarize(
    *,
    mode: str,
    offered: float | None,
    duration: float,
    room_size: int,
    replies: Sequence[dict],
) -> StepResult:
    """One StepResult from the `collect` replies of every generator process."""
    latencies = sorted(value / 1000 for reply in replies for value in reply["latencies_us"])
    sent = sum(reply["sent"] for reply in replies)
    received = sum(reply["received"] for reply in replies)
    expected = sent * room_size
    errors: dict[str, int] = {}
    closes: dict[str, int] = {}
    for reply in replies:
        for key, value in reply["errors"].items():
            errors[key] = errors.get(key, 0) + value
        for key, value in reply["closes"].items():
            closes[key] = closes.get(key, 0) + value
    return StepResult(
        mode=mode,
        offered=offered,
        duration=duration,
        room_size=room_size,
        sent=sent,
        expected=expected,
        received=received,
        lost=max(0, expected - received),
        duplicates=sum(reply["duplicates"] for reply in replies),
        late=sum(reply["stale"] for reply in replies),
        delivered_per_s=received / duration,
        sent_per_s=sent / duration,
        p50_ms=percentile(latencies, 0.50),
        p90_ms=percentile(latencies, 0.90),
        p99_ms=percentile(latencies, 0.99),
        max_ms=latencies[-1] if latencies else 0.0,
        send_lag_max_ms=max(reply["lag_max_ms"] for reply in replies),
        send_failures=sum(reply["send_failures"] for reply in replies),
        timeouts=sum(reply["timeouts"] for reply in replies),
        errors=errors,
        closes=closes,
        generator_cpu=[100 * reply["cpu_seconds"] / reply["wall_seconds"] for reply in replies],
        latencies_ms=latencies,
    )


def mark_counted(results: Sequence[StepResult]) -> None:
    """For each offered rate tried twice, let the sustained try (else the first) count."""
    by_rate: dict[float | None, list[StepResult]] = {}
    for result in results:
        by_rate.setdefault(result.offered, []).append(result)
    for tries in by_rate.values():
        chosen = next((result for result in tries if result.sustained), tries[0])
        for result in tries:
            result.counted = result is chosen
