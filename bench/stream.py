"""Streaming assistant replies (issue 15, protocol §14), Clarity only (the tutorial consumer
has no assistant).

The assistant is Gemini through google-genai, pointed at a stub (`bench.gemini_stub`, a
process of its own) that writes the same answer at a fixed pace every time: its first event
`stream_first_chunk` s (0.8) after the request, then a piece of 4 characters (a "token")
every 1 / `stream_token_rate` s (50 a second), TOKENS pieces in all (~6.8 s a reply), in
events of `stream_tokens_per_event` (10; Gemini 2.5 Flash sends ~50 tokens an event, see
bench/README.md; 1 is the most events, hence the most work for the SDK). The
askers (`bench.askers`) are users in a process of their own. Each part runs a fresh worker
in `fanout-memory`'s deployment (in-memory layer, SQLite), with the assistant's settings of
`assistant_env` (`@ai` messages answered).

1. **First delta**: one asker alone in a room asks `stream_asks` (20) questions one after the
   other, after one warm-up question (the provider's HTTP client is built on first use); for
   each, the time from sending it to the first `assistant_delta` answering it and to the
   stored `message` from AI. The issue's figure is the first delta less the stub's
   first-chunk delay (target: median <= FIRST_DELTA_LIMIT_MS). The stub's own timestamps
   split the times: until the request reached the stub (the server's work before it asks
   the provider), from the stub's first event to the first delta (the streaming path), from
   its last event to the stored message.
2. **Chat while replies stream**: one room of ROOM_USERS generator users sending CHAT_RATE
   messages/s in all (a fixed light load) and ASKERS askers in the same room, measured in
   windows of `stream_seconds` (20) in one deployment: windows without replies (the askers
   joined and silent, none streaming) and with them (each asker asks again as soon as its
   answer is stored; their first questions staggered over one reply's time before the
   window, so ASKERS replies are being written throughout and every delta goes to every
   member of the measured room; their last answers awaited after it). `stream_pairs` (4)
   pairs, off/on then on/off... Only the chat messages' latency is measured (the
   generator's probes), pooled by kind of window: the target is p99(with) / p99(without)
   <= P99_RATIO_LIMIT. One deployment for all windows, alternated, and thousands of
   probes per p99: a fresh worker per run left the ratio to a handful of messages (pairs of
   the same code ranged 0.7-1.9).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from bench import askers, gemini_stub
from bench.fleet import Fleet, merge_counts
from bench.servers import Deployment, ServerKind
from bench.stats import pair_ratios, percentile
from bench.wire import User

if TYPE_CHECKING:
    from bench.scenarios import Bench, Scenario

FIRST_DELTA_LIMIT_MS = 100.0  # issue 15: first delta - the provider's first-chunk delay
P99_RATIO_LIMIT = 1.2  # issue 15: the room's chat p99, 8 replies streaming / assistant off
TOKENS = 300  # pieces of the stub's answer (gemini_stub.TOKEN_CHARS characters each)
ROOM = "stream-room"
SOLO_ROOM = "stream-solo"
ROOM_USERS = 50  # generator users in the measured room
CHAT_RATE = 20.0  # chat messages/s of all of them together: 1,000 deliveries/s
ASKERS = 8  # replies being written at once in the measured room
CHAT_STEP = {"mode": "rate", "users": ROOM_USERS, "room_size": ROOM_USERS}
CYCLE_MARGIN = 0.1  # s: an asker's question and storing, on top of the stub's answer time
STATUS_EVERY = 0.25  # s between two looks at the askers' progress


@dataclasses.dataclass(frozen=True)
class Rig:
    """What every run of the scenario uses: the Gemini stub (a process), its answer and
    port, and the askers (a process)."""

    stub: Fleet
    clients: Fleet
    answer: gemini_stub.Answer
    port: int


def assistant_env(port: int, mode: str) -> dict[str, str | None]:
    """The worker's assistant: Gemini at the stub, answering `@ai` messages (`mention`: the
    chat's probes never start with it) or nothing (`off`), with no quota in the way."""
    return {
        "ASSISTANT_PROVIDER": "gemini",
        "GEMINI_API_KEY": "bench-key",
        "GOOGLE_GEMINI_BASE_URL": f"http://{gemini_stub.HOST}:{port}",
        "GOOGLE_GENAI_API_VERSION": None,
        "NO_PROXY": f"{gemini_stub.HOST},localhost",
        "ASSISTANT_MODE": mode,
        "ASSISTANT_USER_RATE_LIMIT": "1000000",
        "ASSISTANT_MAX_CONCURRENCY": str(2 * ASKERS),
    }


def stream(bench: Bench, scenario: Scenario) -> dict[str, Any]:
    options = bench.options
    answer = gemini_stub.Answer(
        options.stream_first_chunk,
        options.stream_token_rate,
        TOKENS,
        options.stream_tokens_per_event,
    )
    with Fleet(1, target=gemini_stub.main) as stub, Fleet(1, target=askers.main) as clients:
        (listening,) = stub.call([{"op": "listen", "answer": dataclasses.asdict(answer)}])
        rig = Rig(stub=stub, clients=clients, answer=answer, port=listening["port"])
        first = first_delta(bench, scenario, rig)
        chatted = chat(bench, scenario, rig)
    return {
        **scenario.head(ServerKind.CLARITY),
        "database": bench.database(scenario.layer).template.backend,
        "stub": {
            "first_chunk_s": answer.first_chunk,
            "token_rate": answer.rate,
            "tokens": answer.tokens,
            "tokens_per_event": answer.tokens_per_event,
            "events": len(answer.pieces()),
            "token_chars": gemini_stub.TOKEN_CHARS,
            "answer_chars": len(answer.text()),
            "reply_s": round(answer.seconds(), 3),
        },
        "server_env": assistant_env(0, "mention") | {"GOOGLE_GEMINI_BASE_URL": "(the stub)"},
        "streamed": first["streamed"] or any(run["deltas_per_s"] for run in chatted["runs"]),
        "first_delta": first,
        "chat": chatted,
    }


# --- the askers ---------------------------------------------------------------------------


def ask(
    clients: Fleet,
    answer: gemini_stub.Answer,
    label: str,
    *,
    asks: int | None,
    start_at: float,
    stagger: float = 0.0,
    until: float | None = None,
) -> None:
    """Start the askers (in the background): from `start_at`, asker i after i x `stagger`."""
    clients.call(
        [
            {
                "op": "start",
                "label": label,
                "asks": asks,
                "start_at": start_at,
                "stagger": stagger,
                "until": until,
                "expected": answer.text(),
            }
        ]
    )


def wait_askers(
    bench: Bench, clients: Fleet, label: str, *, until: Callable[[dict], bool], deadline: float
) -> None:
    """Show the askers' progress until `until(status)` or `deadline` (monotonic)."""
    while time.monotonic() < deadline:
        (status,) = clients.call([{"op": "status"}])
        if until(status):
            return
        bench.progress.update(f"{label}: {status['answered']}/{status['asked']} questions answered")
        time.sleep(STATUS_EVERY)


def collect(clients: Fleet, answer: gemini_stub.Answer) -> dict[str, Any]:
    timeout = answer.seconds() + askers.REPLY_TIMEOUT
    (collected,) = clients.call([{"op": "collect", "timeout": timeout}], timeout=timeout + 30)
    return collected


def ask_in_turn(
    bench: Bench, clients: Fleet, answer: gemini_stub.Answer, label: str, tag: str, asks: int
) -> dict[str, Any]:
    """The (one) asker asks `asks` questions, one after the other; what it saw."""
    ask(clients, answer, tag, asks=asks, start_at=time.monotonic() + 0.1)
    wait_askers(
        bench,
        clients,
        label,
        until=lambda status: status["answered"] >= asks,
        deadline=time.monotonic() + asks * (answer.seconds() + askers.REPLY_TIMEOUT),
    )
    return collect(clients, answer)


def served(stub: Fleet) -> list[dict[str, Any]]:
    """The stub's requests since the last call."""
    (report,) = stub.call([{"op": "requests"}])
    return report["requests"]


# --- 1. first delta -----------------------------------------------------------------------


def ms(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else (end - start) * 1000


def spread(values: Sequence[float | None]) -> dict[str, float | None]:
    """p50, p95 and max of the values measured (None: not measured)."""
    ordered = sorted(value for value in values if value is not None)
    if not ordered:
        return {"n": 0, "p50": None, "p95": None, "max": None}
    return {
        "n": len(ordered),
        "p50": round(percentile(ordered, 0.5), 1),
        "p95": round(percentile(ordered, 0.95), 1),
        "max": round(ordered[-1], 1),
    }


def question_times(
    questions: list[dict[str, Any]], requests: list[dict[str, Any]], first_chunk: float
) -> list[dict[str, Any]]:
    """Each question's times (ms from sending it), with the stub's view of its request."""
    by_tag = {request["tag"]: request for request in requests if request["tag"]}
    rows = []
    for question in questions:
        request = by_tag.get(question["tag"], {})
        first = ms(question["sent_at"], question["first_delta_at"])
        rows.append(
            {
                "tag": question["tag"],
                "echo_ms": ms(question["sent_at"], question["echo_at"]),
                "first_delta_ms": first,
                "over_first_chunk_ms": None if first is None else first - first_chunk * 1000,
                "stored_ms": ms(question["sent_at"], question["stored_at"]),
                "to_provider_ms": ms(question["sent_at"], request.get("received_at")),
                "relay_ms": ms(request.get("first_at"), question["first_delta_at"]),
                "store_ms": ms(request.get("last_at"), question["stored_at"]),
                "method": request.get("method"),
                "deltas": question["deltas"],
                "first_index": question["first_index"],
                "in_order": question["in_order"],
                "stored_ok": question["stored_ok"],
                "deltas_prefix": question["deltas_prefix"],
                "deltas_whole": question["deltas_whole"],
                "error": question["error"],
            }
        )
    return rows


def checks(questions: list[dict[str, Any]]) -> dict[str, int]:
    """What went wrong with the answers, by kind (0 each when all is well)."""
    stored = [q for q in questions if q["stored_at"] is not None]
    streamed = [q for q in stored if q["deltas"]]
    return {
        "questions": len(questions),
        "stored": len(stored),
        "streamed": len(streamed),
        "not_stored": len(questions) - len(stored),
        "not_the_answer": sum(not q["stored_ok"] for q in stored),  # e.g. the apology
        "first_index_not_0": sum(q["first_index"] != 0 for q in streamed),
        "out_of_order": sum(not q["in_order"] for q in streamed),
        "deltas_not_a_prefix": sum(not q["deltas_prefix"] for q in streamed),
        "deltas_not_whole": sum(not q["deltas_whole"] for q in streamed),
    }


def first_delta(bench: Bench, scenario: Scenario, rig: Rig) -> dict[str, Any]:
    stub, clients, answer, port = rig.stub, rig.clients, rig.answer, rig.port
    options, kind = bench.options, ServerKind.CLARITY
    label = f"{scenario.name}/first-delta"
    env = assistant_env(port, "mention")
    with bench.deploy(scenario, kind, env=env, label="-first") as deployment:
        clients.call(
            [{"op": "setup", "url": deployment.urls[0], "room": SOLO_ROOM, "users": ["solo"]}]
        )
        # A warm-up question first: the provider's HTTP client is built on first use.
        ask_in_turn(bench, clients, answer, f"{label} warm-up", "warm", 1)
        served(stub)
        metrics_before = deployment.metrics()
        log_lines_before = len(deployment.log_problems())
        collected = ask_in_turn(bench, clients, answer, label, "solo", options.stream_asks)
        requests = served(stub)
        signals = bench.signals(
            metrics_before,
            deployment.metrics(),
            len(deployment.log_problems()) - log_lines_before,
        )
        clients.call([{"op": "close"}])
        deployment.check_alive()
        problems = deployment.log_problems()
    questions = collected["questions"]
    rows = question_times(questions, requests, answer.first_chunk)
    figures = {
        key: spread([row[key] for row in rows])
        for key in (
            "first_delta_ms",
            "over_first_chunk_ms",
            "stored_ms",
            "echo_ms",
            "to_provider_ms",
            "relay_ms",
            "store_ms",
        )
    }
    result = {
        "asks": options.stream_asks,
        "streamed": any(q["deltas"] for q in questions),
        "provider_methods": merge_counts([{r["method"]: 1} for r in requests]),
        **figures,
        "deltas_per_reply": spread([float(q["deltas"]) for q in questions if q["deltas"]]),
        "checks": checks(questions),
        "errors": collected["errors"],
        "closes": collected["closes"],
        "server_signals": signals,
        "log_problems": problems[-10:],
        "questions": rows,
    }
    bench.progress.note(f"  {label}: {describe_first(result, answer)}")
    return result


def describe_first(result: dict[str, Any], answer: gemini_stub.Answer) -> str:
    def p(key: str) -> str:
        figure = result[key]
        return "-" if figure["p50"] is None else f"{figure['p50']:.0f}/{figure['p95']:.0f}"

    return (
        f"{result['checks']['stored']}/{result['asks']} stored, "
        f"{result['checks']['streamed']} streamed; p50/p95 ms: first delta {p('first_delta_ms')}"
        f" (less the stub's {answer.first_chunk * 1000:.0f} ms: {p('over_first_chunk_ms')}), "
        f"stored {p('stored_ms')}; to the provider {p('to_provider_ms')}, stub's first event "
        f"to delta {p('relay_ms')}, last event to stored {p('store_ms')}; provider calls "
        f"{result['provider_methods']}"
    )


# --- 2. the room's chat while replies stream ----------------------------------------------


def overlap(intervals: list[tuple[float, float]], start: float, end: float) -> dict[str, float]:
    """How many of the intervals cover each moment of [start, end]: mean and least (sampled
    every 10 ms)."""
    if end <= start:
        return {"mean": 0.0, "min": 0}
    covered = sum(max(0.0, min(b, end) - max(a, start)) for a, b in intervals)
    samples = [start + i * 0.01 for i in range(int((end - start) / 0.01))]
    least = min((sum(a <= t < b for a, b in intervals) for t in samples), default=0)
    return {"mean": round(covered / (end - start), 2), "min": least}


def chat(bench: Bench, scenario: Scenario, rig: Rig) -> dict[str, Any]:
    """Part 2: one deployment, its chat measured in windows alternately without and with
    replies streaming; every probe's latency pooled by kind of window."""
    options, kind = bench.options, ServerKind.CLARITY
    label = f"{scenario.name}/chat"
    with bench.deploy(scenario, kind, env=assistant_env(rig.port, "mention"), label="-chat") as (
        deployment
    ):
        url = deployment.urls[0]
        users = [User(i, f"chat-{i}", ROOM, url) for i in range(ROOM_USERS)]
        joined = bench.connect(deployment, kind, users, label)
        uids = [f"asker-{i}" for i in range(ASKERS)]
        rig.clients.call([{"op": "setup", "url": url, "room": ROOM, "users": uids}])
        bench.step(
            deployment,
            f"{label} warm-up",
            offered=CHAT_RATE * ROOM_USERS,
            duration=options.warmup_seconds,
            **CHAT_STEP,
        )
        served(rig.stub)
        windows = []
        for index in range(options.stream_pairs):
            for on in (False, True) if index % 2 == 0 else (True, False):
                windows.append(window(bench, deployment, rig, on=on, index=index, name=label))
        closes = merge_counts([reply["closes"] for reply in bench.fleet.close_all()])
        rig.clients.call([{"op": "close"}])
        deployment.check_alive()
    runs = [run for run, _ in windows]
    pooled = {
        variant: sorted(
            ms for run, latencies in windows if run["assistant"] == variant for ms in latencies
        )
        for variant in ("on", "off")
    }
    p99 = {variant: percentile(latencies, 0.99) for variant, latencies in pooled.items()}
    ratios, median = pair_ratios(
        runs,
        key="assistant",
        value="p99_ms",
        measured="on",
        reference="off",
        pairs=options.stream_pairs,
    )
    ratio = round(p99["on"] / p99["off"], 3) if p99["off"] else None
    bench.progress.note(
        f"  {label}: pooled chat p99 on {p99['on']:.1f} / off {p99['off']:.1f} ms = {ratio}; "
        f"windows' pairs {', '.join(f'{r:.2f}' for r in ratios)}"
    )
    return {
        "users": ROOM_USERS,
        "askers": ASKERS,
        "askers_room": "the measured room",
        "messages_per_s": CHAT_RATE,
        "offered": CHAT_RATE * ROOM_USERS,
        "seconds": options.stream_seconds,
        "joined": joined["joined"],
        "closes": closes,
        "runs": runs,
        "pooled": {
            variant: {
                "n": len(latencies),
                "p50_ms": round(percentile(latencies, 0.5), 2),
                "p99_ms": round(p99[variant], 2),
                "max_ms": round(latencies[-1], 2) if latencies else None,
            }
            for variant, latencies in pooled.items()
        },
        "pair_ratios": ratios,
        "pair_median": median,
        "ratio": ratio,
        "limit": P99_RATIO_LIMIT,
    }


def window(
    bench: Bench, deployment: Deployment, rig: Rig, *, on: bool, index: int, name: str
) -> tuple[dict[str, Any], list[float]]:
    """One window of the room's chat: the askers silent (`on` False) or each asking again
    as soon as its answer is stored, from one reply's time before the window to its end (and
    their last answers awaited after it, so that the next window starts with none
    streaming). Its figures, and every probe's latency (ms)."""
    stub, clients, answer = rig.stub, rig.clients, rig.answer
    options = bench.options
    variant = "on" if on else "off"
    label = f"{name} {variant} {index + 1}"
    duration = options.stream_seconds
    served(stub)
    if on:
        cycle = answer.seconds() + CYCLE_MARGIN
        start_at = time.monotonic() + 0.3
        ask(
            clients,
            answer,
            f"{variant}{index}",
            asks=None,
            start_at=start_at,
            stagger=cycle / ASKERS,
            # the step starts about 0.3 s after it is called: no question after its end
            until=start_at + cycle + 0.3 + duration,
        )
        wait_askers(
            bench,
            clients,
            f"{label} askers starting",
            until=lambda s: False,
            deadline=start_at + cycle,
        )
    ticks: list[float] = []
    result = bench.step(
        deployment,
        label,
        offered=CHAT_RATE * ROOM_USERS,
        duration=duration,
        tick=lambda: ticks.append(time.monotonic()),
        **CHAT_STEP,
    )
    window_span = (ticks[0] + 0.3, ticks[0] + 0.3 + duration)  # the first tick: the step's start
    collected = collect(clients, answer) if on else {"questions": [], "delta_times": []}
    requests = served(stub)
    questions = collected["questions"]
    streaming = overlap(
        [(r["first_at"], r["last_at"]) for r in requests if r["first_at"] is not None],
        *window_span,
    )
    in_flight = overlap(
        [(r["received_at"], r["last_at"] or window_span[1]) for r in requests], *window_span
    )
    deltas = sum(window_span[0] <= t < window_span[1] for t in collected["delta_times"])
    rows = question_times(questions, requests, answer.first_chunk)
    run = {
        "run": index,
        "assistant": variant,
        "sent": result.sent,
        "delivered": result.received,
        "lost": result.lost,
        "p50_ms": result.p50_ms,
        "p90_ms": result.p90_ms,
        "p99_ms": result.p99_ms,
        "max_ms": result.max_ms,
        "sustained": result.sustained,
        "server_cpu": round(result.server_cpu, 1),
        "generator_cpu": [round(cpu, 1) for cpu in result.generator_cpu],
        "other_cpu": round(result.other_cpu, 1),
        "errors": result.errors,
        "closes": result.closes,
        "server_signals": result.server_signals,
        "streaming": streaming,
        "in_flight": in_flight,
        "deltas_per_s": round(deltas / duration, 1),
        "first_delta_ms": spread([row["first_delta_ms"] for row in rows]),
        "stored_ms": spread([row["stored_ms"] for row in rows]),
        "checks": checks(questions),
        "asker_errors": collected.get("errors", {}),
        "asker_closes": collected.get("closes", {}),
    }
    bench.progress.note(f"  {label}: {describe_run(run)}")
    return run, result.latencies_ms


def describe_run(run: dict[str, Any]) -> str:
    text = (
        f"chat p50 {run['p50_ms']:.1f} p99 {run['p99_ms']:.1f} max {run['max_ms']:.0f} ms, "
        f"lost {run['lost']}, srv cpu {run['server_cpu']:.0f}%, other {run['other_cpu']:.0f}%"
    )
    if run["assistant"] == "on":
        checked = run["checks"]
        text += (
            f"; replies streaming at once mean {run['streaming']['mean']:.1f} "
            f"(min {run['streaming']['min']}), in flight {run['in_flight']['mean']:.1f}, "
            f"{run['deltas_per_s']:.0f} deltas/s in the room, {checked['stored']} stored "
            f"({checked['not_the_answer']} not the answer), first delta p50 "
            f"{run['first_delta_ms']['p50']} ms"
        )
    if run["server_signals"]:
        text += f"; server {run['server_signals']}"
    return text
