"""Operations endpoints: liveness, readiness (database, cache, channel layer), metrics."""

import pytest
from django.test import AsyncClient

pytestmark = pytest.mark.django_db(transaction=True)


async def test_healthz():
    response = await AsyncClient().get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


async def test_readyz_checks_every_backing_service():
    response = await AsyncClient().get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["ready"] is True
    assert {name: check["ok"] for name, check in body["checks"].items()} == {
        "database": True,
        "cache": True,
        "channel_layer": True,
    }


async def test_readyz_reports_an_unreachable_cache(settings):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": "redis://127.0.0.1:1/0",  # nothing listens there
            "OPTIONS": {"socket_connect_timeout": 0.5},
        }
    }
    response = await AsyncClient().get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["ready"] is False
    assert body["checks"]["cache"]["ok"] is False
    assert body["checks"]["database"]["ok"] is True


async def test_metrics_count_frames_errors_and_connections(clients):
    alice = await clients.join("lobby", "alice")
    await alice.send({"type": "message", "content": "counted"})
    await alice.recv_type("message")
    await alice.send_text("not json")
    await alice.expect_error("INVALID_JSON")
    text = (await AsyncClient().get("/metrics")).content.decode()
    assert 'clarity_frames_in_total{type="message"}' in text
    assert 'clarity_errors_total{code="INVALID_JSON"}' in text
    assert 'clarity_connections_open{endpoint="chat"} 1.0' in text
    assert 'clarity_frames_out_total{type="connection_ack"}' in text
    assert "# TYPE clarity_assistant_seconds histogram" in text
