"""Prometheus metrics of this worker process (each worker serves its own at /metrics).

Metrics are per process by nature: Prometheus scrapes every worker and sums them.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CONNECTIONS_OPEN = Gauge(
    "clarity_connections_open", "WebSocket sessions open on this worker", ["endpoint"]
)
CONNECTIONS_REFUSED = Counter(
    "clarity_connections_refused_total", "Sockets refused after accept, by close code", ["code"]
)
FRAMES_IN = Counter(
    "clarity_frames_in_total", "Inbound frames accepted by the pipeline, by message type", ["type"]
)
FRAMES_OUT = Counter(
    "clarity_frames_out_total", "Frames written to sockets, by message type", ["type"]
)
ERRORS = Counter("clarity_errors_total", "Error frames sent, by error code", ["code"])
RATE_LIMITED = Counter(
    "clarity_rate_limit_rejections_total",
    "Frames, replies and connection attempts refused by a budget (chat/budgets.py), by budget",
    ["budget"],
)
CLOSES = Counter("clarity_server_closes_total", "Sockets closed by the server, by code", ["code"])
ASSISTANT_SECONDS = Histogram(
    "clarity_assistant_seconds",
    "Time for one assistant reply, by provider and outcome",
    ["provider", "outcome"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60),
)
ASSISTANT_FIRST_CHUNK_SECONDS = Histogram(
    "clarity_assistant_first_chunk_seconds",
    "Time from asking the assistant to the first piece of its answer, by provider",
    ["provider"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20),
)
ASSISTANT_DELTAS = Counter(
    "clarity_assistant_delta_frames_total",
    "assistant_delta frames sent (one per room or user, before fan-out), by kind",
    ["kind"],
)
REAPED_SESSIONS = Counter(
    "clarity_reaped_sessions_total", "Sessions of dead workers ended by this worker"
)
LAYER_OVERFLOWS = Counter(
    "clarity_layer_overflows_total",
    "Sockets whose channel-layer queue filled up (closed 4009 Client too slow)",
)
LAYER_DROPPED = Counter(
    "clarity_layer_dropped_total",
    "Channel-layer messages dropped for a socket whose queue filled up (overload)",
)
# Seconds late: from a few milliseconds (normal) to seconds (a worker far behind).
DELAY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
LOOP_LAG = Histogram(
    "clarity_event_loop_lag_seconds",
    "How late this worker's event loop wakes from a timer (CPU overload)",
    buckets=DELAY_BUCKETS,
)
# The histogram's buckets say how often; this says how bad it got (the bench reads it around
# each attack of its `hostile` scenario, on a fresh worker).
LOOP_LAG_MAX = Gauge(
    "clarity_event_loop_lag_max_seconds",
    "Longest event-loop lag this worker has seen since it started",
)
WRITER_BACKLOG = Gauge(
    "clarity_messages_waiting_to_be_stored", "Chat messages queued for the database writer"
)
OVERLOADED = Counter(
    "clarity_overload_ticks_total",
    "Half-second ticks in which this worker was overloaded (loop lag or storage backlog)",
)
DELIVERY_DELAY = Histogram(
    "clarity_delivery_delay_seconds",
    "Longest delay per half second between a room frame's broadcast and its delivery here",
    buckets=DELAY_BUCKETS,
)
SLOW_CLOSES = Counter(
    "clarity_slow_consumer_closes_total",
    "Sockets closed 4009 for unsent output past CHAT_MAX_OUTBOUND_BUFFER, by how they ended: "
    "clean (the client read up to the close and answered it) or aborted",
    ["outcome"],
)
SLOW_CLOSE_SECONDS = Histogram(
    "clarity_slow_consumer_close_seconds",
    "Seconds from a socket's unsent output passing CHAT_MAX_OUTBOUND_BUFFER to its connection "
    "being gone (its buffer freed)",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10),
)
HEAD_TIMEOUTS = Counter(
    "clarity_request_head_timeouts_total",
    "Connections aborted because a request's headers took longer than CHAT_HANDSHAKE_TIMEOUT",
)
ANALYSES_IN_FLIGHT = Gauge(
    "clarity_analyses_in_flight",
    "Health analyses accepted and not finished on this worker: waiting for or in an analysis "
    "process, or being narrated (at most CHAT_ANALYSIS_QUEUE)",
)
ANALYSIS_JOBS = Counter(
    "clarity_analysis_jobs_total",
    "Jobs run in this worker's analysis processes, by outcome: analysed, refused (the frame "
    "failed a check), failed (the job or its process failed)",
    ["outcome"],
)
ANALYSES_REFUSED = Counter(
    "clarity_analyses_refused_total",
    "Health analyses refused before any work, by reason: rate_limit (the user's "
    "CHAT_ANALYSIS_RATE_LIMIT), queue_full (CHAT_ANALYSIS_QUEUE on this worker)",
    ["reason"],
)
