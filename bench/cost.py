"""What a feature costs in server CPU: two variants of the Clarity server compared on the same
load (Clarity only).

Each run is a fresh worker of one variant in its scenario's deployment, the fan-out setup
(`rooms` x `room_size` users), a warm-up at a quarter of COST_LOAD, then one fixed-rate step
at COST_LOAD deliveries/s; its figure is the worker's CPU-seconds (with its children) per
1,000 deliveries. The variants alternate in `cost_runs` pairs (measured/reference, then
reference/measured, ...), so a slow drift of the shared machine falls on both; the result is
the median of the pairs' measured/reference ratios, against the scenario's limit.

A variant differs by its environment or by its code:

- `fair-share-cost` (issue 13): the fair-share protections on (the defaults) and off
  (`bench.servers.FAIR_SHARE_OFF`);
- `seq-cost`, `seq-cost-redis` (issue 16): this checkout, with sequence numbers, and the code
  before them (`--seq-cost-base`, 95b091a: the parent of 49f5564), checked out into a
  temporary worktree (`bench.revisions`), its database migrated by its own code;
- `read-cost` (issue 14): the same server, its users sending `read` for what they see (at
  most once a second each, as the browser client) or not at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import revisions
from bench.fleet import merge_counts
from bench.servers import FAIR_SHARE_OFF, ServerKind
from bench.stats import pair_ratios

if TYPE_CHECKING:
    from bench.scenarios import Bench, Scenario

COST_LOAD = 2000.0  # deliveries/s offered in the cost runs (well under one worker's capacity)
FAIR_SHARE_LIMIT = 1.05  # issue 13: CPU per delivery, protections on / off
SEQ_LIMIT = 1.05  # issue 16: CPU per delivery, with / without sequence numbers
# issue 14 asks for the ratio, not a bound: this one is the project's (receipts must stay a
# small share of a delivery's cost).
READ_LIMIT = 1.15  # CPU per delivery, with / without read receipts flowing


@dataclass(frozen=True)
class Variant:
    name: str  # as the runs are labelled: "on", "off", "with", "without"
    what: str  # for the table
    env: dict[str, str | None] | None = None  # added to the bench's server environment
    tree: Path | None = None  # the project's code from there (None: this checkout)
    reads: bool = False  # the users send `read` frames (protocol §12)


def compare(
    bench: Bench,
    scenario: Scenario,
    *,
    varies: str,
    measured: Variant,
    reference: Variant,
    limit: float,
    target: str,
) -> dict[str, Any]:
    """Interleaved runs of the two variants; the median of the pairs' measured/reference
    ratios of CPU-seconds per 1,000 deliveries. `varies` names what differs ("protections")."""
    runs = []
    for index in range(bench.options.cost_runs):
        for variant in (measured, reference) if index % 2 == 0 else (reference, measured):
            runs.append(cost_run(bench, scenario, variant, index))
    ratios, ratio = pair_ratios(
        runs,
        key="variant",
        value="cpu_s_per_1000",
        measured=measured.name,
        reference=reference.name,
        pairs=bench.options.cost_runs,
    )
    bench.progress.note(
        f"  {scenario.name}: CPU per 1,000 deliveries {measured.name}/{reference.name} "
        f"{', '.join(f'{r:.3f}' for r in ratios)}; median {ratio}"
    )
    return {
        **scenario.head(ServerKind.CLARITY),
        "database": bench.database(scenario.layer).template.backend,
        "offered": COST_LOAD,
        "step_seconds": bench.options.step_seconds,
        "varies": varies,
        "measured": measured.name,
        "reference": reference.name,
        "variants": {
            variant.name: {"what": variant.what, "env": variant.env or {}}
            for variant in (measured, reference)
        },
        "target": target,
        "limit": limit,
        "runs": runs,
        "ratios": ratios,
        "ratio": ratio,
    }


def cost_run(bench: Bench, scenario: Scenario, variant: Variant, index: int) -> dict[str, Any]:
    """One run: a fresh worker of `variant`, a warm-up, one step at COST_LOAD."""
    options, kind = bench.options, ServerKind.CLARITY
    count = options.rooms * options.room_size
    label = f"{scenario.name}/{variant.name} {index + 1}"
    with bench.deploy(
        scenario, kind, env=variant.env, label=f"-{variant.name}{index}", tree=variant.tree
    ) as deployment:
        bench.connect(deployment, kind, bench.users(deployment, count, "user-"), label)
        step = {"mode": "rate", "users": count, "reads": variant.reads}
        bench.step(
            deployment, label, offered=COST_LOAD / 4, duration=options.warmup_seconds, **step
        )
        result = bench.step(
            deployment, label, offered=COST_LOAD, duration=options.step_seconds, **step
        )
        closes = merge_counts([reply["closes"] for reply in bench.fleet.close_all()])
    return {
        "run": index,
        "variant": variant.name,
        "delivered": result.received,
        "server_cpu_seconds": round(result.server_cpu_seconds, 3),
        "cpu_s_per_1000": result.server_cpu_seconds / max(result.received, 1) * 1000,
        "sustained": result.sustained,
        "other_cpu": result.other_cpu,
        "closes": closes,
    }


def fair_share_cost(bench: Bench, scenario: Scenario) -> dict[str, Any]:
    off = ", ".join(f"{name}={value}" for name, value in FAIR_SHARE_OFF.items())
    return compare(
        bench,
        scenario,
        varies="protections",
        measured=Variant("on", "the defaults"),
        reference=Variant("off", off, env=FAIR_SHARE_OFF),
        limit=FAIR_SHARE_LIMIT,
        target="7. server CPU per 1,000 deliveries, protections on / off (median of runs)",
    )


def seq_cost(bench: Bench, scenario: Scenario) -> dict[str, Any]:
    here = revisions.current()
    with revisions.checkout(bench.options.seq_cost_base, bench.work_dir) as base:
        result = compare(
            bench,
            scenario,
            varies="sequence numbers",
            measured=Variant("with", here.describe()),
            reference=Variant("without", base.describe(), tree=base.tree),
            limit=SEQ_LIMIT,
            target="issue 16: server CPU per 1,000 deliveries, with / without sequence "
            f"numbers ({scenario.name}, median of runs)",
        )
    return result | {"commits": {"with": here.to_json(), "without": base.to_json()}}


def read_cost(bench: Bench, scenario: Scenario) -> dict[str, Any]:
    return compare(
        bench,
        scenario,
        varies="read receipts",
        measured=Variant(
            "with", "each member sends read for what it sees, at most 1/s", reads=True
        ),
        reference=Variant("without", "no read frames"),
        limit=READ_LIMIT,
        target="issue 14: server CPU per 1,000 deliveries, with / without read receipts "
        "flowing (median of runs)",
    )


COMPARISONS: dict[str, Callable[[Bench, Scenario], dict[str, Any]]] = {
    "fair-share-cost": fair_share_cost,
    "seq-cost": seq_cost,
    "read-cost": read_cost,
}
