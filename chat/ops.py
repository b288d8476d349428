"""Operations endpoints (protocol §8): liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import asyncio
import time
import uuid

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.core.cache import caches
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from chat.shared_state import shared_state

READY_TIMEOUT = 2.0


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """The process is alive and serving HTTP."""
    return JsonResponse({"status": "ok"})


def _database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


def _cache() -> None:
    """The shared state the workers rely on (liveness, rate limits) and Django's cache: the
    same Redis with REDIS_URL."""
    key = f"readyz:{uuid.uuid4().hex}"
    state = shared_state()
    state.set(key, 1, ttl=5)
    found = state.get_many([key])
    state.delete_many([key])
    cache = caches["default"]
    cache.set(key, 1, timeout=5)
    if found != {key: 1} or cache.get(key) != 1:
        raise RuntimeError("cache did not return what was written")
    cache.delete(key)


async def _layer_roundtrip() -> None:
    layer = get_channel_layer()
    channel = await layer.new_channel("readyz.")
    await layer.send(channel, {"type": "readyz.ping"})
    async with asyncio.timeout(READY_TIMEOUT):
        # (A `layer.resubscribed` notice may come first: chat/pubsub.py.)
        while (await layer.receive(channel)).get("type") != "readyz.ping":
            pass


def _channel_layer() -> None:
    async_to_sync(_layer_roundtrip)()


@require_GET
def readyz(request: HttpRequest) -> JsonResponse:
    """Database, cache and channel layer each reachable: 200, else 503 naming what is not."""
    checks = {}
    for name, probe in (
        ("database", _database),
        ("cache", _cache),
        ("channel_layer", _channel_layer),
    ):
        started = time.monotonic()
        try:
            probe()
            checks[name] = {"ok": True, "ms": round((time.monotonic() - started) * 1000, 1)}
        except Exception as exc:
            checks[name] = {"ok": False, "error": type(exc).__name__}
    ready = all(check["ok"] for check in checks.values())
    return JsonResponse({"ready": ready, "checks": checks}, status=200 if ready else 503)


@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    return HttpResponse(generate_latest(), content_type=CONTENT_TYPE_LATEST)
