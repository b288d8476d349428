"""RESULTS.md from a run's record: `python -m bench.markdown [RUN_ID] [--out PATH]`.

`bench/run --results-md bench/RESULTS.md` writes it at the end of a run; this module also
renders any earlier run from bench/results/runs.jsonl (the last one by default). The run's
plot is copied next to the Markdown file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from bench.fairshare import RSS_LIMIT_MB, RTT_LIMIT_MS
from bench.report import (
    NOISY_CPU,
    cost_grid,
    cost_measurements,
    cost_title,
    find,
    hostile_grid,
    number,
    restart_grid,
    stream_chat_grid,
    stream_first_grid,
    stream_notes,
    stream_title,
    table,
)
from bench.restart import RESTART_LIMIT
from bench.stream import FIRST_DELTA_LIMIT_MS

RESULTS = Path(__file__).resolve().parent / "results"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    def cells(row: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "/") for cell in row) + " |"

    return [cells(header), "|" + "---|" * len(header), *(cells(row) for row in rows)]


def _targets(record: dict[str, Any]) -> list[str]:
    return _table(
        ["target", "value", "goal", "met", "detail"],
        [
            [
                target["target"],
                number(target["value"]),
                target["goal"],
                {True: "yes", False: "**no**", None: "-"}[target["met"]],
                target["detail"],
            ]
            for target in record["targets"]
        ],
    )


def _fair_share(record: dict[str, Any]) -> list[str]:
    """The hostile-client and cost figures (protocol §16), if this run measured them."""
    hostile = find(record["measurements"], "hostile", "clarity")
    cost = find(record["measurements"], "fair-share-cost", "clarity")
    if not hostile and not cost:
        return []
    lines = ["## Fair share (protocol §16): hostile clients and the protections' cost", ""]
    if hostile:
        busy = hostile["busy_room"]
        lines += [
            f"Each attack for {hostile['attack_seconds']:g} s on a fresh worker with Clarity's "
            f"default limits, while a busy room carries {busy['messages_per_s']:g} messages/s "
            f"of ~{busy['content_chars']:,} characters (~23 KB frames) and a bystander in "
            f"another room sends a heartbeat every "
            f"{hostile['bystander']['heartbeat_every_s'] * 1000:.0f} ms. Targets: the loop "
            f"never later than 50 ms (its own lag metric), bystander p99 < {RTT_LIMIT_MS:.0f} "
            f"ms, RSS growth <= {RSS_LIMIT_MB:.0f} MB (over 60 s: shorter attacks say less), "
            "non-reading sockets each closed within 5 s of passing the bound (server metric).",
            "",
            *_table(*hostile_grid(hostile)),
            "",
        ]
    if cost:
        lines += _cost(cost)
    return lines


def _sequence_cost(record: dict[str, Any]) -> list[str]:
    """The sequence numbers' CPU cost (protocol §15, issue 16), if this run measured it."""
    costs = [m for m in cost_measurements(record["measurements"]) if "commits" in m]
    if not costs:
        return []
    lines = ["## Sequence numbers (protocol §15, issue 16): their CPU cost", ""]
    for cost in costs:
        lines += _cost(cost)
    return lines


def _cost(cost: dict[str, Any]) -> list[str]:
    """One CPU-cost comparison (`bench.cost`): what ran, the median ratio, every run."""
    return [
        f"{cost_title(cost)}; interleaved runs, median {cost['measured']}/{cost['reference']} "
        f"ratio **{number(cost['ratio'])}** (target <= {cost['limit']}).",
        "",
        *_table(*cost_grid(cost)),
        "",
    ]


def _restart(record: dict[str, Any]) -> list[str]:
    """The worker-restart figures (issue 16), if this run measured them."""
    header, rows = restart_grid(record["measurements"])
    if not rows:
        return []
    return [
        "## Worker restart (issue 16)",
        "",
        "A worker stopped (SIGTERM: a deploy; SIGKILL: a crash) under its connected users and a "
        "fresh process started on its port as soon as it exited, while messages flow. Times "
        "from the signal: back = the user's last join; caught up = every room event up to its "
        f"reconnect ack's `last_seq` arrived (target: all within {RESTART_LIMIT:g} s). Every "
        "acknowledged message is checked in the view of every user of its room.",
        "",
        *_table(header, rows),
        "",
    ]


def _stream(record: dict[str, Any]) -> list[str]:
    """The streaming assistant replies' figures (issue 15), if this run measured them."""
    m = find(record["measurements"], "stream", "clarity")
    if not m:
        return []
    first, chat = m["first_delta"], m["chat"]
    lines = [
        "## Streaming assistant replies (issue 15)",
        "",
        f"{stream_title(m)}.",
        "",
        f"Time to the first delta: one user alone in a room asks {first['asks']} questions one "
        "after the other (after one warm-up question); times from sending the question. "
        f"Target: the first delta at most {FIRST_DELTA_LIMIT_MS:.0f} ms after the stub's "
        f"first-chunk delay (median).",
        "",
    ]
    if not first["streamed"]:
        lines += [
            "**No `assistant_delta` frame came**: the server under test does not stream "
            f"(provider calls: {first['provider_methods']}).",
            "",
        ]
    lines += [
        *_table(*stream_first_grid(m)),
        "",
        f"The room's chat while replies stream: {chat['users']} users send "
        f"{chat['messages_per_s']:g} messages/s in all ({chat['offered']:,.0f} deliveries/s) "
        f"for {chat['seconds']:g} s, with {chat['askers']} askers in {chat['askers_room']}: "
        "silent with the assistant off; with it on, each asks again as soon as its answer is "
        "stored. Only the chat messages' latency is measured. Fresh worker per run, pairs "
        f"interleaved; median p99 on/off ratio **{number(chat['ratio'])}** (target <= "
        f"{chat['limit']}).",
        "",
        *_table(*stream_chat_grid(m)),
        "",
        *(f"- {note.strip()}" for note in stream_notes(m)),
        "",
    ]
    return lines


def render(record: dict[str, Any], plot_name: str | None) -> str:
    machine = record["machine"]
    packages = ", ".join(f"{name} {version}" for name, version in machine["packages"].items())
    command = " ".join(["bench/run", *record.get("argv", ["--quick"] if record["quick"] else [])])
    measured = sorted({f"{m['scenario']}" for m in record["measurements"]})
    servers = sorted({f"{m['server']}" for m in record["measurements"]})
    lines = [
        "# Benchmark results",
        "",
        f"Run `{record['run_id']}` of `{command}` ({', '.join(measured)} on "
        f"{' and '.join(servers)}, in one invocation), on this project's kind of machine. "
        "Regenerate: "
        "`bench/run --results-md bench/RESULTS.md`. How the figures are measured: "
        "[README.md](README.md).",
        "",
        "## Machine",
        "",
        f"- {machine['cpus']} CPUs ({machine['cpu_model']}), {machine['memory_gb']} GB, "
        f"Linux {machine['kernel']}",
        f"- Python {machine['python']}; {packages}; Redis server {machine['redis_server']}",
        f"- commit {machine['commit']} (plus any uncommitted work in the tree)",
        f"- {record['generator_processes']} generator processes; file-descriptor limit "
        f"{record['fd_limit']}",
        "",
        "## Targets (Clarity as a ratio to the tutorial consumer, same server, layer, run)",
        "",
        *_targets(record),
        "",
        *_fair_share(record),
        *_sequence_cost(record),
        *_restart(record),
        *_stream(record),
    ]
    other = record.get("cpu", {}).get("other_mean", 0.0)
    if other > NOISY_CPU:
        lines += [
            f"**Disturbed run**: other work on the machine used {other:.0f}% of a core on "
            "average during the steps (see `other cpu%`), so p99 figures and capacities are "
            "noisy here; compare ratios with care and rerun on an idle machine.",
            "",
        ]
    if plot_name:
        lines += [
            "## Latency versus offered load",
            "",
            f"![p50 and p99 latency versus offered deliveries/s]({plot_name})",
            "",
        ]
    lines += [
        "## Figures",
        "",
        "```",
        table(record).rstrip(),
        "```",
        "",
        "## Reading them",
        "",
        "- *Deliveries* are messages x room size (every member, the sender included, receives "
        "each message). *Capacity* is the highest delivered/s of a fixed-rate step with 0 loss, "
        "p99 < 250 ms, no errors or closes. The closed loop (each user waits for its own "
        "message before sending the next; 200 in flight) shows maximum throughput, not a "
        "sustainable rate: its latency is queueing.",
        "- Generator CPU stays far below a core per process, so the generator is not the "
        "bottleneck; but it shares the machine's cores with the servers (and, with Redis, "
        "with Redis and PostgreSQL), so absolute figures are lower than on a dedicated "
        "server. Ratios compare like with like.",
        "- `other cpu%` is CPU used by anything else on the machine during the step. The "
        "machine is shared; when it is high, latency percentiles (p99 most) are disturbed and "
        "capacities move by tens of per cent between runs. A rate that fails is tried twice "
        "and the better try counts.",
        "- Overload signals are what Clarity itself reports during a step: changes of its "
        "non-routine `clarity_*_total` counters, non-zero lag/queue/drop gauges, and "
        "warning/error log lines.",
        "",
    ]
    return "\n".join(lines)


def write(record: dict[str, Any], out: Path) -> Path:
    plot = RESULTS / f"{record['run_id']}.png"
    plot_name = None
    if plot.exists():
        plot_name = out.with_suffix(".png").name
        shutil.copyfile(plot, out.with_suffix(".png"))
    out.write_text(render(record, plot_name))
    return out


def load(run_id: str | None) -> dict[str, Any]:
    records = [json.loads(line) for line in (RESULTS / "runs.jsonl").read_text().splitlines()]
    if run_id is None:
        return records[-1]
    for record in records:
        if record["run_id"] == run_id:
            return record
    raise SystemExit(f"no run {run_id} in {RESULTS / 'runs.jsonl'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.markdown", description=__doc__.split("\n")[0])
    parser.add_argument("run_id", nargs="?", help="default: the last run")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "RESULTS.md")
    args = parser.parse_args(argv)
    print(write(load(args.run_id), args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
