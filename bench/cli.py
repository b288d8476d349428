"""`python -m bench`: run the scenarios against Clarity and the tutorial baseline, side by side.

See bench/README.md. Writes one JSON line per invocation to bench/results/runs.jsonl, prints a
table (also saved as bench/results/<run id>.txt) and plots latency percentiles versus offered
load (bench/results/<run id>.png).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import resource
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import markdown, report, restart
from bench.attacks import ATTACKS
from bench.fleet import Fleet
from bench.machine import machine_info
from bench.progress import Progress
from bench.scenarios import SCENARIOS, Bench, Options
from bench.servers import RATE_LIMIT, RATE_WINDOW, ServerKind

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short steps (a ~2 minute smoke run)")
    parser.add_argument(
        "--scenario",
        action="append",
        choices=sorted(SCENARIOS),
        help="run only this scenario (repeatable; default: all but hostile, the *-cost ones, "
        "the restarts and stream)",
    )
    parser.add_argument(
        "--server",
        action="append",
        choices=[kind.value for kind in ServerKind],
        help="run only this server (repeatable; default: baseline and clarity)",
    )
    parser.add_argument("--processes", type=int, default=2, help="generator processes")
    parser.add_argument("--rooms", type=int, help="rooms in the fan-out scenarios")
    parser.add_argument("--room-size", type=int, help="users per room")
    parser.add_argument("--step-seconds", type=float, help="duration of each fixed-rate step")
    parser.add_argument("--connections", type=int, help="sockets in the connection storm")
    parser.add_argument(
        "--attack-seconds", type=float, help="duration of each attack (hostile; 60, quick 20)"
    )
    parser.add_argument(
        "--attack",
        action="append",
        choices=sorted(ATTACKS),
        help="hostile: run only this attack (repeatable; default: all, the control first)",
    )
    parser.add_argument(
        "--cost-runs",
        type=int,
        help="pairs of runs, on/off or with/without (fair-share-cost, seq-cost, read-cost; "
        "default 3)",
    )
    parser.add_argument(
        "--seq-cost-base",
        metavar="COMMIT",
        help="seq-cost: the code without sequence numbers to compare with (default 95b091a, "
        "the parent of 49f5564), run from a temporary git worktree",
    )
    parser.add_argument(
        "--restart-users", type=int, help="users connected at the restart (2,000, quick 500)"
    )
    parser.add_argument(
        "--restart-signal",
        choices=sorted(restart.SIGNALS),
        help="restart: how the worker is stopped: term (a deploy, default) or kill (a crash)",
    )
    parser.add_argument(
        "--restart-rate", type=float, help="restart: messages/s of all senders (default 200)"
    )
    parser.add_argument(
        "--stream-asks",
        type=int,
        help="stream: questions asked one after the other for the first delta (20, quick 5)",
    )
    parser.add_argument(
        "--stream-seconds",
        type=float,
        help="stream: each chat window, without and with replies (20, quick 10)",
    )
    parser.add_argument(
        "--stream-pairs",
        type=int,
        help="stream: pairs of chat windows without and with replies (4, quick 1)",
    )
    parser.add_argument(
        "--stream-first-chunk",
        type=float,
        help="stream: seconds from a request to the Gemini stub's first event (0.8)",
    )
    parser.add_argument(
        "--stream-token-rate",
        type=float,
        help="stream: the Gemini stub's tokens (4-character pieces) per second (50)",
    )
    parser.add_argument(
        "--stream-tokens-per-event",
        type=int,
        help="stream: the Gemini stub's tokens in each server-sent event (10; 1 is the "
        "SDK's worst case)",
    )
    parser.add_argument(
        "--baseline-layer",
        choices=["project", "stock"],
        help="the baseline's layer class: the project's own, as Clarity (default), or the "
        "stock channels / channels-redis class with the same configuration",
    )
    parser.add_argument(
        "--sqlite",
        action="store_true",
        help="Redis scenarios on a shared SQLite file instead of PostgreSQL",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' logs")
    parser.add_argument(
        "--results-md",
        type=Path,
        help="also write this run as Markdown here (e.g. bench/RESULTS.md; plot copied beside)",
    )
    return parser.parse_args(argv)


def options_from(args: argparse.Namespace) -> Options:
    options = Options.quick() if args.quick else Options()
    overrides = {
        "rooms": args.rooms,
        "room_size": args.room_size,
        "step_seconds": args.step_seconds,
        "connections": args.connections,
        "attack_seconds": args.attack_seconds,
        "cost_runs": args.cost_runs,
        "seq_cost_base": args.seq_cost_base,
        "restart_users": args.restart_users,
        "restart_signal": args.restart_signal,
        "restart_rate": args.restart_rate,
        "stream_asks": args.stream_asks,
        "stream_seconds": args.stream_seconds,
        "stream_pairs": args.stream_pairs,
        "stream_first_chunk": args.stream_first_chunk,
        "stream_token_rate": args.stream_token_rate,
        "stream_tokens_per_event": args.stream_tokens_per_event,
        "attacks": tuple(args.attack) if args.attack else None,
        "baseline_layer": args.baseline_layer,
    }
    return dataclasses.replace(
        options, **{name: value for name, value in overrides.items() if value is not None}
    )


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def interrupt_on_signals() -> None:
    """SIGTERM and SIGINT stop the run cleanly (servers, databases, Redis keys), as Ctrl-C
    does, also when started in the background, where SIGINT is ignored by default."""

    def interrupt(number: int, frame: object) -> None:
        raise KeyboardInterrupt

    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, interrupt)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    interrupt_on_signals()
    options = options_from(args)
    scenarios = [
        SCENARIOS[name]
        for name in args.scenario or [name for name, s in SCENARIOS.items() if s.default]
    ]
    kinds = [ServerKind(name) for name in (args.server or ["baseline", "clarity"])]
    fd_limit = raise_fd_limit()
    run_id = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix=f"bench-{run_id}-"))
    progress = Progress()
    progress.note(
        f"bench run {run_id}: {', '.join(s.name for s in scenarios)} on "
        f"{', '.join(k.value for k in kinds)}; {args.processes} generator processes; "
        f"Clarity's rate limit set to {RATE_LIMIT:,} frames/{RATE_WINDOW} s per user "
        "(never reached; the limiter still runs), assistant off (stream: Gemini at a stub); "
        "logs in "
        f"{work_dir}"
    )
    record: dict[str, Any] = {
        "run_id": run_id,
        "argv": sys.argv[1:] if argv is None else argv,
        "quick": args.quick,
        "options": dataclasses.asdict(options),
        "generator_processes": args.processes,
        "fd_limit": fd_limit,
        "server_config": {
            "CHAT_MESSAGE_RATE_LIMIT": RATE_LIMIT,
            "CHAT_RATE_LIMIT_WINDOW": RATE_WINDOW,
            "CHAT_MAX_CONNECTIONS_PER_USER": 3,
            "ASSISTANT_MODE": "off",
            "LOG_LEVEL": "WARNING",
            "daphne": "-e tcp:port=P:interface=127.0.0.1:backlog=1024 -v 0",
            "database": "sqlite" if args.sqlite else "sqlite (memory), postgresql (redis)",
            "channel_layer": "memory / redis pub/sub",
            "baseline_layer": options.baseline_layer,
        },
        "machine": machine_info(),
        "measurements": [],
    }
    failed = False
    with Fleet(args.processes) as fleet:
        bench = Bench(fleet, options, work_dir, progress, postgres=not args.sqlite)
        try:
            for scenario in scenarios:
                for kind in (kind for kind in kinds if kind in scenario.servers):
                    try:
                        record["measurements"].append(bench.run(scenario, kind))
                    except Exception as exc:
                        failed = True
                        progress.note(f"  {scenario.name}/{kind.value} FAILED: {exc}")
                        record["measurements"].append(
                            {"scenario": scenario.name, "server": kind.value, "failure": str(exc)}
                        )
        except KeyboardInterrupt:
            progress.note("interrupted: writing what was measured")
            failed = True
        finally:
            bench.close()
    record["targets"] = report.targets(record["measurements"])
    record["cpu"] = report.cpu_usage(record["measurements"])
    table = report.table(record)
    with (RESULTS / "runs.jsonl").open("a") as out:
        out.write(json.dumps(record) + "\n")
    (RESULTS / f"{run_id}.txt").write_text(table)
    plot = report.plot(record, RESULTS / f"{run_id}.png")
    print(table)
    if args.results_md:
        print(f"markdown: {markdown.write(record, args.results_md)}")
    print(f"results: {RESULTS / 'runs.jsonl'} (run {run_id}), {RESULTS / f'{run_id}.txt'}", end="")
    print(f", {plot}" if plot else "")
    if args.keep_logs or failed:
        print(f"server logs: {work_dir}")
    else:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
