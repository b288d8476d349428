"""The run's verdicts (the issue's targets, as ratios to the baseline), table and plot."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.fairshare import (
    LAG_LIMIT,
    RSS_LIMIT_MB,
    RTT_LIMIT_MS,
    attacker_outcome,
    overall,
)
from bench.restart import RESTART_LIMIT, seconds
from bench.restart import met as restart_met
from bench.stats import P99_LIMIT_MS
from bench.stream import FIRST_DELTA_LIMIT_MS

Measurement = dict[str, Any]
NOISY_CPU = 20.0  # % of one core used by other work, on average, that makes a run unreliable


def find(measurements: list[Measurement], scenario: str, server: str) -> Measurement | None:
    for measurement in measurements:
        if (
            measurement.get("scenario") == scenario
            and measurement.get("server") == server
            and "failure" not in measurement
        ):
            return measurement
    return None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _target(
    name: str, value: float | None, goal: str, met: Callable[[float], bool], detail: str
) -> dict[str, Any]:
    return {
        "target": name,
        "value": None if value is None else round(value, 3),
        "goal": goal,
        "met": None if value is None else bool(met(value)),
        "detail": detail,
    }


def targets(measurements: list[Measurement]) -> list[dict[str, Any]]:
    """Each target of the issue that this run measured, as Clarity / baseline (or 2w / 1w)."""
    results = []

    def pair(scenario: str) -> tuple[Measurement | None, Measurement | None]:
        return find(measurements, scenario, "clarity"), find(measurements, scenario, "baseline")

    for layer in ("memory", "redis"):
        clarity, baseline = pair(f"fanout-{layer}")
        if clarity and baseline:
            results.append(
                _target(
                    f"1. sustainable capacity, {layer}: Clarity / baseline",
                    ratio(clarity["capacity"], baseline["capacity"]),
                    ">= 1.0",
                    lambda value: value >= 1.0,
                    f"{clarity['capacity']:,.0f} vs {baseline['capacity']:,.0f} deliveries/s",
                )
            )
            light_c, light_b = clarity["light_load"], baseline["light_load"]
            results.append(
                _target(
                    f"2. p99 at {light_c['offered']:,.0f} deliveries/s, {layer}: "
                    "Clarity / baseline",
                    ratio(light_c["p99_ms"], light_b["p99_ms"]),
                    "<= 1.2",
                    lambda value: value <= 1.2,
                    f"{light_c['p99_ms']:.1f} vs {light_b['p99_ms']:.1f} ms",
                )
            )
    for server in ("clarity", "baseline"):
        two = find(measurements, "fanout-redis-2w", server)
        one = find(measurements, "fanout-redis", server)
        if two and one:
            results.append(
                _target(
                    f"3. two workers / one worker on Redis, {server}"
                    + ("" if server == "clarity" else " (reference)"),
                    ratio(two["capacity"], one["capacity"]),
                    ">= 1.5",
                    lambda value: value >= 1.5,
                    f"{two['capacity']:,.0f} vs {one['capacity']:,.0f} deliveries/s",
                )
            )
    clarity, baseline = pair("storm")
    if clarity and baseline:
        results.append(
            _target(
                "4. idle memory per connection: Clarity / baseline",
                ratio(clarity["kb_per_connection"], baseline["kb_per_connection"]),
                "<= 1.3",
                lambda value: value <= 1.3,
                f"{clarity['kb_per_connection']:.1f} vs {baseline['kb_per_connection']:.1f} KB",
            )
        )
    if clarity:
        wanted = clarity["connect"]["attempted"]
        clean = (
            clarity["held"] == wanted
            and clarity["connect"]["failed"] == 0
            and not clarity["closes"]
            and not clarity["errors"]
        )
        results.append(
            _target(
                "4. authenticated connections held by one worker without errors",
                float(clarity["held"]),
                f"{wanted:,} (target 5,000)",
                lambda value: clean and value >= 5000,
                f"failed {clarity['connect']['failed']}, closes {clarity['closes'] or 0}, "
                f"errors {clarity['errors'] or 0}, join p99 {clarity['connect']['p99_ms']:.0f} ms",
            )
        )
    results.extend(loss_targets(measurements))
    results.extend(fair_share_targets(measurements))
    results.extend(cost_targets(measurements))
    results.extend(restart_targets(measurements))
    results.extend(stream_targets(measurements))
    return sorted(results, key=lambda target: target["target"].split(".", 1)[0])


def loss_targets(measurements: list[Measurement]) -> list[dict[str, Any]]:
    """5: no loss at or below capacity; every overloaded step visible on the server side."""
    fanouts = [m for m in measurements if m.get("server") == "clarity" and "steps" in m]
    if not fanouts:
        return []
    lost = sum(
        step["lost"]
        for m in fanouts
        for step in m["steps"]
        if step["offered"] is not None and step["offered"] <= m["capacity"]
    )
    overloaded = [
        (m["scenario"], step) for m in fanouts for step in m["steps"] if not step["sustained"]
    ]
    silent_lost: dict[tuple[str, float], list[int]] = {}
    for scenario, step in overloaded:
        if not step["server_signals"]:
            silent_lost.setdefault((scenario, step["offered"]), []).append(step["lost"])
    silent = [
        f"{scenario} @ {offered:,.0f}/s (lost {'+'.join(str(lost) for lost in losts)})"
        for (scenario, offered), losts in silent_lost.items()
    ]
    results = [
        _target(
            "5. messages lost at or below capacity (Clarity)",
            float(lost),
            "0",
            lambda value: value == 0,
            "all Clarity fan-out steps at or below their capacity",
        )
    ]
    results.append(
        _target(
            "5. overloaded steps with no server-side signal (Clarity)",
            float(sum(len(losts) for losts in silent_lost.values())) if overloaded else None,
            "0",
            lambda value: value == 0,
            f"{len(overloaded)} overloaded; silent: {', '.join(silent) or 'none'}",
        )
    )
    return results


def fair_share_targets(measurements: list[Measurement]) -> list[dict[str, Any]]:
    """6: each attack within the limits; 8: slow sockets closed (7 is in `cost_targets`)."""
    results = []
    hostile = find(measurements, "hostile", "clarity")
    for phase in hostile["attacks"] if hostile else []:
        if phase["attack"] == "none":
            continue
        verdicts = phase["verdicts"]
        results.append(
            _target(
                f"6. attack ({phase['issue']}) {phase['attack']} at {phase['rate']}: loop lag, "
                "bystander p99, RSS growth",
                phase["bystander"]["p99_ms"],
                f"lag <= {float(LAG_LIMIT) * 1000:.0f} ms, p99 < {RTT_LIMIT_MS:.0f} ms, "
                f"+{RSS_LIMIT_MB:.0f} MB",
                lambda value, verdicts=verdicts: overall(
                    {k: verdicts[k] for k in ("lag", "bystander", "rss")}
                ),
                f"lag max {lag_text(phase['lag'])} ms, {phase['lag']['over_limit']} ticks over; "
                f"RSS {phase['rss_start_mb']:.0f} -> {phase['rss_end_mb']:.0f} MB in "
                f"{phase['seconds']:.0f} s",
            )
        )
        if "closed" in verdicts:
            results.append(
                _target(
                    f"8. attack ({phase['issue']}) {phase['attack']}: attackers closed",
                    float(phase["attacker"].get("open_at_end", 0)),
                    "0 open; non-reading: each closed <= 5 s after the bound (server metric)",
                    lambda value, met=verdicts["closed"]: met,
                    attacker_outcome(phase["attacker"])
                    + (
                        f"; server: {slow_close_text(phase['slow_closes'])}"
                        if phase["attack"] == "non-reading"
                        else ""
                    ),
                )
            )
            if verdicts["closed"] is None:
                results[-1]["met"] = None
    return results


def cost_measurements(measurements: list[Measurement]) -> list[Measurement]:
    """The CPU-cost comparisons of this run (`bench.cost`), as run."""
    return [m for m in measurements if "ratios" in m and "failure" not in m]


def cost_targets(measurements: list[Measurement]) -> list[dict[str, Any]]:
    """Each CPU-cost comparison's median ratio against its limit (7: the fair-share
    protections; issue 16: sequence numbers)."""
    return [
        _target(
            cost["target"],
            cost["ratio"],
            f"<= {cost['limit']}",
            lambda value, limit=cost["limit"]: value <= limit,
            f"{len(cost['ratios'])} interleaved pairs at {cost['offered']:,.0f} deliveries/s: "
            + ", ".join(f"{ratio:.3f}" for ratio in cost["ratios"]),
        )
        for cost in cost_measurements(measurements)
    ]


RESTART_SCENARIOS = ("restart", "restart-2w")


def restart_targets(measurements: list[Measurement]) -> list[dict[str, Any]]:
    """9: every user back and caught up within RESTART_LIMIT of a worker restart."""
    results = []
    for scenario in RESTART_SCENARIOS:
        m = find(measurements, scenario, "clarity")
        if not m:
            continue
        restart = m["restart"]
        results.append(
            _target(
                f"9. all {m['closed_users']:,} users back and caught up within "
                f"{RESTART_LIMIT:g} s of the restart ({restart['signal']}, {m['workers']} "
                f"worker{'s' if m['workers'] > 1 else ''}): slowest, s",
                m["caught_up_s"]["max"],
                f"<= {RESTART_LIMIT:g} s; 0 never back, refused, missing, duplicates "
                "(target: 2,000 users)",
                lambda value, m=m: restart_met(m),
                restart_detail(m),
            )
        )
        results[-1]["met"] = restart_met(m)  # also when no user caught up (value None)
    return results


def stream_targets(measurements: list[Measurement]) -> list[dict[str, Any]]:
    """Issue 15: the first delta soon after the provider's first chunk; the room's chat p99
    while replies stream, as a ratio to the assistant off."""
    m = find(measurements, "stream", "clarity")
    if not m:
        return []
    first, chat, stub = m["first_delta"], m["chat"], m["stub"]
    over = first["over_first_chunk_ms"]
    if first["streamed"]:
        detail = (
            f"p95 {over['p95']:.0f} ms over {over['n']} replies; first delta p50/p95 "
            f"{spread_text(first['first_delta_ms'])} ms after the question, the stub's first "
            f"chunk after {stub['first_chunk_s'] * 1000:.0f} ms"
        )
    else:
        detail = (
            "not measured: no assistant_delta frame came (the server does not stream; "
            f"provider calls {first['provider_methods']}); stored p50/p95 "
            f"{spread_text(first['stored_ms'])} ms"
        )
    runs, pooled = chat["runs"], chat["pooled"]
    on = [run for run in runs if run["assistant"] == "on"]
    off = [run for run in runs if run["assistant"] == "off"]
    return [
        _target(
            "issue 15: first delta less the provider's first-chunk delay, ms (median)",
            over["p50"] if first["streamed"] else None,
            f"<= {FIRST_DELTA_LIMIT_MS:.0f} ms",
            lambda value: value <= FIRST_DELTA_LIMIT_MS,
            detail,
        ),
        _target(
            f"issue 15: the room's chat p99, {chat['askers']} replies streaming / none "
            "(pooled windows)",
            chat["ratio"],
            f"<= {chat['limit']}",
            lambda value: value <= chat["limit"],
            f"{chat['offered']:,.0f} deliveries/s ({chat['users']} users, "
            f"{chat['messages_per_s']:g} msg/s), {len(on)}+{len(off)} windows of "
            f"{chat['seconds']:g} s in one deployment; p99 with "
            f"{pooled['on']['p99_ms']:.1f} vs without {pooled['off']['p99_ms']:.1f} ms "
            f"({pooled['on']['n']:,}/{pooled['off']['n']:,} probes); pairs' ratios "
            f"{'/'.join(f'{r:.2f}' for r in chat['pair_ratios'])}; replies streaming at once "
            f"(mean) {joined(on, lambda run: run['streaming']['mean'], '.1f')}, deltas/s "
            f"{joined(on, lambda run: run['deltas_per_s'], '.0f')}",
        ),
    ]


def joined(runs: list[Measurement], value: Callable[[Measurement], float], spec: str) -> str:
    return "/".join(format(value(run), spec) for run in runs)


def spread_text(figure: dict[str, Any]) -> str:
    """`p50/p95` of a `bench.stream.spread`, or `-`."""
    if figure["p50"] is None:
        return "-"
    return f"{figure['p50']:.0f}/{figure['p95']:.0f}"


def stream_first_grid(m: Measurement) -> tuple[list[str], list[list[str]]]:
    """The first-delta figures: one row per time measured, ms from sending the question."""
    first = m["first_delta"]
    names = {
        "echo_ms": "question's echo",
        "to_provider_ms": "request at the stub",
        "first_delta_ms": "first assistant_delta",
        "over_first_chunk_ms": "first delta less the stub's first-chunk delay",
        "relay_ms": "stub's first event to the first delta",
        "stored_ms": "stored message from AI",
        "store_ms": "stub's last event to the stored message",
    }
    rows = [
        [
            what,
            "-" if first[key]["p50"] is None else f"{first[key]['p50']:.1f}",
            "-" if first[key]["p95"] is None else f"{first[key]['p95']:.1f}",
            "-" if first[key]["max"] is None else f"{first[key]['max']:.1f}",
            f"{first[key]['n']}",
        ]
        for key, what in names.items()
    ]
    return ["ms", "p50", "p95", "max", "n"], rows


def stream_chat_grid(m: Measurement) -> tuple[list[str], list[list[str]]]:
    """The chat windows, without and with replies: one row per window, in the order run;
    each pair's p99 ratio on its second window's row; the pooled figures last."""
    header = [
        "run",
        "assistant",
        "delivered",
        "lost",
        "p50 ms",
        "p99 ms",
        "max ms",
        "pair p99 on/off",
        "streaming mean (min)",
        "in flight",
        "deltas/s",
        "replies (not the answer)",
        "first delta p50/p95 ms",
        "srv cpu%",
        "gen cpu%",
        "other cpu%",
    ]
    rows, pair = [], {}
    for run in m["chat"]["runs"]:
        pair[run["assistant"]] = run["p99_ms"]
        pair_ratio = ""
        if "on" in pair and "off" in pair:
            value = ratio(pair.pop("on"), pair.pop("off"))
            pair_ratio = "-" if value is None else f"{value:.2f}"
        on = run["assistant"] == "on"
        rows.append(
            [
                f"{run['run'] + 1}",
                run["assistant"],
                f"{run['delivered']:,}",
                f"{run['lost']:,}",
                f"{run['p50_ms']:.1f}",
                f"{run['p99_ms']:.1f}",
                f"{run['max_ms']:.0f}",
                pair_ratio,
                f"{run['streaming']['mean']:.1f} ({run['streaming']['min']})" if on else "",
                f"{run['in_flight']['mean']:.1f}" if on else "",
                f"{run['deltas_per_s']:.0f}" if on else "",
                f"{run['checks']['stored']} ({run['checks']['not_the_answer']})" if on else "",
                spread_text(run["first_delta_ms"]) if on else "",
                f"{run['server_cpu']:.0f}",
                "+".join(f"{cpu:.0f}" for cpu in run["generator_cpu"]),
                f"{run['other_cpu']:.0f}",
            ]
        )
    pooled = m["chat"]["pooled"]
    for variant in ("off", "on"):
        figures = pooled[variant]
        rows.append(
            [
                "all",
                variant,
                f"{figures['n']:,}",
                "",
                f"{figures['p50_ms']:.1f}",
                f"{figures['p99_ms']:.1f}",
                f"{figures['max_ms']:.0f}" if figures["max_ms"] is not None else "-",
                f"{m['chat']['ratio']:.2f}" if variant == "on" and m["chat"]["ratio"] else "",
            ]
            + [""] * (len(header) - 8)
        )
    return header, rows


def stream_title(m: Measurement) -> str:
    stub = m["stub"]
    return (
        f"Streaming assistant replies: Gemini stub, first chunk after "
        f"{stub['first_chunk_s'] * 1000:.0f} ms, then {stub['token_rate']:g} tokens/s of "
        f"{stub['token_chars']} characters, {stub['tokens']} in all ({stub['answer_chars']:,} "
        f"characters, {stub['reply_s']:g} s) in events of {stub.get('tokens_per_event', 1)} "
        f"token(s); 1 worker, {m['layer']} layer, {m['database']}"
    )


def stream_notes(m: Measurement) -> list[str]:
    """What the stream tables have no room for: the answers' checks, signals, failures."""
    first, chat = m["first_delta"], m["chat"]
    notes = [
        f"  first delta: {first['asks']} questions one after the other by one user alone in "
        f"a room; provider calls {first['provider_methods']}; deltas per reply "
        f"{spread_text(first['deltas_per_reply'])} (p50/p95); checks {first['checks']}",
        f"  chat: {chat['users']} users send {chat['messages_per_s']:g} msg/s in all, in "
        f"windows of {chat['seconds']:g} s in one deployment; {chat['askers']} askers in "
        f"{chat['askers_room']} (silent in the windows without replies); streaming / in "
        "flight = replies between the stub's first and last event / from its request to its "
        "last event, over the window; rows `all`: every window's probes pooled",
    ]
    for run in chat["runs"]:
        extras = {
            key: run[key]
            for key in ("errors", "closes", "server_signals", "asker_errors", "asker_closes")
            if run[key]
        }
        wrong = {k: v for k, v in run["checks"].items() if v and k not in CHECK_COUNTS}
        if extras or wrong:
            notes.append(f"  run {run['run'] + 1} {run['assistant']}: {extras} {wrong}".rstrip())
    if first["server_signals"] or first["errors"] or first["closes"]:
        notes.append(
            f"  first delta: server {first['server_signals']}, errors {first['errors']}, "
            f"closes {first['closes']}"
        )
    return notes


CHECK_COUNTS = ("questions", "stored", "streamed")  # counts, not problems


def restart_detail(m: Measurement) -> str:
    return (
        f"back p50/p99/max {seconds(m['back_s'])} s, caught up {seconds(m['caught_up_s'])} s; "
        f"never back {m['never_back']}, not caught up {m['not_caught_up']}, refused "
        f"{m['refused_users']}; {m['acknowledged']:,} acknowledged, missing {m['missing']}, "
        f"duplicates {m['duplicates']}, gaps {m['gaps']}; downtime "
        f"{m['restart']['downtime_s']:.2f} s"
    )


def restart_notes(m: Measurement) -> list[str]:
    """What the restart table has no room for: failed reconnects, CPU, the settling."""
    cpu = m["cpu_until_back"]
    return [
        f"  {m['scenario']}: reconnect attempts that failed, by reason: {m['refusals'] or 0}",
        f"  {m['scenario']}: cpu% from the signal until everyone was back: generators "
        f"{'+'.join(str(c) for c in cpu['generator'])}, new worker {cpu['new_worker']}, "
        f"redis+pg {cpu['services']}; after the messages stopped, settled in "
        f"{m['settled_s']:.1f} s (tail: missing messages after the last one the user received)",
    ]


def restart_grid(measurements: list[Measurement]) -> tuple[list[str], list[list[str]]]:
    """The restart scenarios' table: one row per restart."""
    header = [
        "measurement",
        "closed/users",
        "msg/s",
        "shutdown s",
        "downtime s",
        "back p50/p99/max s",
        "caught up p50/p99/max s",
        "never back",
        "refused",
        "acknowledged",
        "missing (tail)",
        "dupl.",
        "gaps",
        "unacked",
        "attempts (max)",
        "catch-up reads (refused, gaps)",
        "closes seen",
    ]
    rows = [
        [
            f"{m['scenario']} {m['restart']['signal']}",
            f"{m['closed_users']:,}/{m['users']:,}",
            f"{m['messages_per_s']:g}",
            f"{m['restart']['shutdown_s']:.2f}",
            f"{m['restart']['downtime_s']:.2f}",
            seconds(m["back_s"]),
            seconds(m["caught_up_s"]),
            f"{m['never_back']}",
            f"{m['refused_users']}",
            f"{m['acknowledged']:,}",
            f"{m['missing']} ({m['missing_after_last_received']})",
            f"{m['duplicates']}",
            f"{m['gaps']}",
            f"{m['unacknowledged']}",
            f"{m['attempts']:,} ({m['attempts_max']})",
            f"{m['catch_ups']:,} ({m['catch_up_refused']}, {m['gap_fetches']})",
            ", ".join(f"{code} x{n}" for code, n in sorted(m["closes"].items())),
        ]
        for scenario in RESTART_SCENARIOS
        if (m := find(measurements, scenario, "clarity"))
    ]
    return header, rows


def lag_text(lag: dict[str, Any]) -> str:
    if lag["max_ms"] is None:
        return "n/a (metric absent)"
    return f"{'' if lag['max_exact'] else '<='}{lag['max_ms']:.0f}"


def slow_close_text(slow: dict[str, Any]) -> str:
    if slow["closed"] is None:
        return "n/a (metric absent)"
    longest = "-" if slow["max_s"] is None else f"<={slow['max_s']:g} s"
    outcomes = ", ".join(f"{k} {v:.0f}" for k, v in (slow["by_outcome"] or {}).items())
    return f"{slow['closed']:.0f} closed, longest {longest}, {slow['over_limit']} over 5 s" + (
        f" ({outcomes})" if outcomes else ""
    )


def verdict_text(met: bool | None) -> str:
    return {True: "yes", False: "NO", None: "-"}[met]


def hostile_grid(measurement: Measurement) -> tuple[list[str], list[list[str]]]:
    """The hostile scenario's table: one row per attack."""
    header = [
        "attack",
        "rate",
        "s",
        "bystander p50/p99/max ms",
        "loop lag max ms",
        "ticks > 50 ms",
        "RSS start/end/peak MB",
        "busy p99 ms",
        "met",
        "what the server did to the attacker",
        "slow-consumer closes (server)",
    ]
    rows = []
    for phase in measurement["attacks"]:
        bystander = phase["bystander"]
        unanswered = f" ({bystander['unanswered']} unanswered)" if bystander["unanswered"] else ""
        rows.append(
            [
                f"({phase['issue']}) {phase['attack']}",
                phase["rate"],
                f"{phase['seconds']:.0f}",
                f"{bystander['p50_ms']:.1f}/{bystander['p99_ms']:.1f}/{bystander['max_ms']:.0f}"
                + unanswered,
                lag_text(phase["lag"]),
                "n/a"
                if phase["lag"]["over_limit"] is None
                else f"{phase['lag']['over_limit']:.0f}",
                f"{phase['rss_start_mb']:.0f}/{phase['rss_end_mb']:.0f}/{phase['rss_peak_mb']:.0f}",
                f"{phase['busy_room']['p99_ms']:.0f}",
                verdict_text(overall(phase["verdicts"])),
                attacker_outcome(phase["attacker"]),
                slow_close_text(phase["slow_closes"]) if phase["attack"] == "non-reading" else "",
            ]
        )
    return header, rows


def cost_grid(measurement: Measurement) -> tuple[list[str], list[list[str]]]:
    """A cost comparison's table: one row per run, in the order run; each pair's ratio on its
    second run's row."""
    measured, reference = measurement["measured"], measurement["reference"]
    header = [
        "run",
        measurement["varies"],
        "delivered",
        "server cpu s",
        "cpu s / 1,000",
        f"pair {measured}/{reference}",
        "sustained",
        "other cpu%",
    ]
    rows, pair = [], {}
    for run in measurement["runs"]:
        pair[run["variant"]] = run["cpu_s_per_1000"]
        pair_ratio = ""
        if measured in pair and reference in pair:
            value = ratio(pair.pop(measured), pair.pop(reference))
            pair_ratio = "-" if value is None else f"{value:.3f}"
        rows.append(
            [
                f"{run['run'] + 1}",
                run["variant"],
                f"{run['delivered']:,}",
                f"{run['server_cpu_seconds']:.2f}",
                f"{run['cpu_s_per_1000']:.4f}",
                pair_ratio,
                "yes" if run["sustained"] else "NO",
                f"{run['other_cpu']:.0f}",
            ]
        )
    return header, rows


def cost_title(measurement: Measurement) -> str:
    """What a cost comparison ran: the load, and what each variant is."""
    variants = "; ".join(
        f"{name} = {variant['what']}" for name, variant in measurement["variants"].items()
    )
    return (
        f"{measurement['scenario']}: server CPU-seconds per 1,000 deliveries at "
        f"{measurement['offered']:,.0f} deliveries/s for {measurement['step_seconds']:g} s per "
        f"run, {measurement['layer']} layer, {measurement['database']} ({variants})"
    )


def cpu_usage(measurements: list[Measurement]) -> dict[str, float]:
    """Highest CPU use seen in any fan-out step: is the generator the bottleneck?"""
    steps = [step for m in measurements if "steps" in m for step in [m["closed_loop"], *m["steps"]]]
    if not steps:
        return {}
    return {
        "generator_process_max": max(max(step["generator_cpu"]) for step in steps),
        "generator_total_max": max(sum(step["generator_cpu"]) for step in steps),
        "server_max": max(step["server_cpu"] for step in steps),
        "other_max": max(step.get("other_cpu", 0.0) for step in steps),
        "other_mean": sum(step.get("other_cpu", 0.0) for step in steps) / len(steps),
    }


# --- table --------------------------------------------------------------------------------


def _row(cells: list[str], widths: list[int], text_columns: set[int]) -> str:
    return "  ".join(
        cell.ljust(width) if index in text_columns else cell.rjust(width)
        for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
    ).rstrip()


def _grid(
    header: list[str], rows: list[list[str]], text_columns: set[int] | None = None
) -> list[str]:
    """Aligned columns: numbers to the right; the first column and `text_columns` to the left."""
    text = {0} | (text_columns or set())
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return [_row(header, widths, text), _row(["-" * w for w in widths], widths, text)] + [
        _row(row, widths, text) for row in rows
    ]


def _step_cells(label: str, step: dict[str, Any]) -> list[str]:
    offered = "closed loop" if step["offered"] is None else f"{step['offered']:,.0f}"
    if step.get("repeat"):
        offered = "again " + offered
    return [
        label,
        offered,
        f"{step['delivered_per_s']:,.0f}",
        f"{step['lost']:,}",
        f"{step['p50_ms']:.1f}",
        f"{step['p90_ms']:.1f}",
        f"{step['p99_ms']:.1f}",
        f"{step['max_ms']:.0f}",
        f"{step['server_cpu']:.0f}",
        "+".join(f"{cpu:.0f}" for cpu in step["generator_cpu"]),
        f"{step.get('services_cpu', 0):.0f}",
        f"{step.get('other_cpu', 0):.0f}",
        "yes" if step["sustained"] else "NO",
    ]


def number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 10 and value == int(value) else f"{value:.2f}"


def table(record: dict[str, Any]) -> str:
    measurements = record["measurements"]
    machine = record["machine"]
    lines = [
        f"Run {record['run_id']}{' (quick)' if record['quick'] else ''}: "
        f"{machine['cpus']} x {machine['cpu_model']}, Python {machine['python']}, "
        f"commit {machine['commit']}",
        f"Clarity: rate limit {record['server_config']['CHAT_MESSAGE_RATE_LIMIT']:,} frames / "
        f"{record['server_config']['CHAT_RATE_LIMIT_WINDOW']} s per user (set high on purpose: "
        "never reached, still evaluated), max 3 sockets per user, assistant off.",
        "",
    ]
    header = [
        "measurement",
        "offered/s",
        "delivered/s",
        "lost",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "srv cpu%",
        "gen cpu%",
        "redis+pg cpu%",
        "other cpu%",
        "sustained",
    ]
    rows = []
    for m in measurements:
        if "steps" not in m:
            continue
        label = f"{m['scenario']}/{m['server']}"
        rows.append(_step_cells(label, m["closed_loop"]))
        rows.extend(_step_cells(label, step) for step in m["steps"])
    if rows:
        lines.append(
            f"Fan-out steps (p99 limit {P99_LIMIT_MS:.0f} ms; deliveries = messages x room size)"
        )
        lines.extend(_grid(header, rows))
        lines.append("")
        summary = [
            [
                f"{m['scenario']}/{m['server']}",
                f"{m['capacity']:,.0f}",
                f"{m['closed_loop']['delivered_per_s']:,.0f}",
                f"{m['closed_loop']['p99_ms']:.0f}",
                f"{m['light_load']['p99_ms']:.1f}",
                f"{m['connect']['joined']}/{m['connect']['attempted']}",
            ]
            for m in measurements
            if "steps" in m
        ]
        lines.append("Fan-out summary")
        lines.extend(
            _grid(
                [
                    "measurement",
                    "capacity/s",
                    "closed-loop/s",
                    "closed p99 ms",
                    "light p99 ms",
                    "joined",
                ],
                summary,
            )
        )
        lines.append("")
    storms = [m for m in measurements if m.get("scenario") == "storm" and "failure" not in m]
    if storms:
        lines.append("Connection storm (fresh server; RSS growth / sockets joined)")
        lines.extend(
            _grid(
                [
                    "server",
                    "held",
                    "failed",
                    "join p50 ms",
                    "join p99 ms",
                    "seconds",
                    "joins/s",
                    "RSS before MB",
                    "RSS after MB",
                    "KB/socket",
                    "CPU ms/join",
                ],
                [
                    [
                        m["server"],
                        f"{m['held']:,}/{m['connect']['attempted']:,}",
                        f"{m['connect']['failed']}",
                        f"{m['connect']['p50_ms']:.0f}",
                        f"{m['connect']['p99_ms']:.0f}",
                        f"{m['connect']['seconds']:.1f}",
                        f"{m['connect']['joined'] / max(m['connect']['seconds'], 0.001):,.0f}",
                        f"{m['rss_before_mb']:.0f}",
                        f"{m['rss_after_mb']:.0f}",
                        f"{m['kb_per_connection']:.1f}",
                        f"{m['cpu_ms_per_join']:.2f}" if "cpu_ms_per_join" in m else "",
                    ]
                    for m in storms
                ],
            )
        )
        lines.append("")
    usage = cpu_usage(measurements)
    if usage:
        lines.append(
            f"CPU (% of one core, highest step): generator {usage['generator_process_max']:.0f} "
            f"per process, {usage['generator_total_max']:.0f} all processes; servers "
            f"{usage['server_max']:.0f}; rest of the machine {usage['other_max']:.0f} "
            f"(mean {usage['other_mean']:.0f})"
        )
        if usage["other_mean"] > NOISY_CPU:
            lines.append(
                f"WARNING: other work used {usage['other_mean']:.0f}% of a core on average "
                "during the steps: the figures are disturbed; rerun on an idle machine."
            )
        lines.append("")
    hostile = find(measurements, "hostile", "clarity")
    if hostile:
        busy = hostile["busy_room"]
        lines.append(
            f"Hostile clients (fresh worker per attack, Clarity's default limits; busy room: "
            f"{busy['senders']} senders, {busy['messages_per_s']:g} messages/s of "
            f"~{busy['content_chars']:,} characters; bystander: a heartbeat every "
            f"{hostile['bystander']['heartbeat_every_s'] * 1000:.0f} ms from "
            f"{hostile['bystander']['users']} users in a quiet room)"
        )
        lines.extend(_grid(*hostile_grid(hostile), text_columns={1, 9, 10}))
        lines.append("")
    for cost in cost_measurements(measurements):
        lines.append(cost_title(cost))
        lines.extend(_grid(*cost_grid(cost), text_columns={1}))
        lines.append("")
    header, rows = restart_grid(measurements)
    if rows:
        lines.append(
            "Worker restart (times from the signal; caught up: every event up to the "
            "reconnect ack's last_seq arrived)"
        )
        lines.extend(_grid(header, rows, text_columns={16}))
        for scenario in RESTART_SCENARIOS:
            if m := find(measurements, scenario, "clarity"):
                lines.extend(restart_notes(m))
        lines.append("")
    if streamed := find(measurements, "stream", "clarity"):
        lines.append(stream_title(streamed))
        lines.extend(_grid(*stream_first_grid(streamed)))
        lines.append("")
        lines.extend(_grid(*stream_chat_grid(streamed), text_columns={1}))
        lines.extend(stream_notes(streamed))
        lines.append("")
    failures = [m for m in measurements if "failure" in m]
    for m in failures:
        lines.append(f"FAILED {m['scenario']}/{m['server']}: {m['failure'].splitlines()[0]}")
    if record["targets"]:
        lines.append("Targets")
        lines.extend(
            _grid(
                ["target", "value", "goal", "met", "detail"],
                [
                    [
                        t["target"],
                        number(t["value"]),
                        t["goal"],
                        {True: "yes", False: "NO", None: "-"}[t["met"]],
                        t["detail"],
                    ]
                    for t in record["targets"]
                ],
                text_columns={2, 4},
            )
        )
    return "\n".join(lines) + "\n"


# --- plot ---------------------------------------------------------------------------------


def plot(record: dict[str, Any], path: Path) -> Path | None:
    """p50 and p99 latency versus offered load, one panel per fan-out scenario."""
    fanouts = [m for m in record["measurements"] if "steps" in m]
    if not fanouts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys(m["scenario"] for m in fanouts))
    figure, axes = plt.subplots(
        1, len(scenarios), figsize=(6 * len(scenarios), 4.5), squeeze=False, sharey=True
    )
    colors = {"baseline": "tab:blue", "clarity": "tab:red"}
    for axis, scenario in zip(axes[0], scenarios, strict=True):
        for m in (m for m in fanouts if m["scenario"] == scenario):
            steps = [step for step in m["steps"] if step["offered"] and step.get("counted", True)]
            offered = [step["offered"] for step in steps]
            color = colors.get(m["server"])
            axis.plot(
                offered,
                [max(step["p99_ms"], 0.1) for step in steps],
                "o-",
                color=color,
                label=f"{m['server']} p99",
            )
            axis.plot(
                offered,
                [max(step["p50_ms"], 0.1) for step in steps],
                "s--",
                color=color,
                alpha=0.7,
                label=f"{m['server']} p50",
            )
            lossy = [step for step in steps if step["lost"]]
            if lossy:
                axis.scatter(
                    [step["offered"] for step in lossy],
                    [max(step["p99_ms"], 0.1) for step in lossy],
                    marker="x",
                    s=80,
                    color="black",
                    zorder=5,
                    label=f"{m['server']} lost messages",
                )
            if m["capacity"]:
                axis.axvline(m["capacity"], color=color, linestyle=":", alpha=0.6)
        axis.axhline(P99_LIMIT_MS, color="grey", linestyle="-.", linewidth=1)
        axis.set_yscale("log")
        axis.set_title(scenario)
        axis.set_xlabel("offered deliveries/s")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    axes[0][0].set_ylabel("latency ms (log)")
    machine = record["machine"]
    figure.suptitle(
        f"Clarity vs tutorial consumer - run {record['run_id']} - {machine['cpus']} CPU "
        f"{machine['cpu_model']} (dotted: sustainable capacity; dash-dot: p99 limit)",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
