from django.urls import re_path

from chat.consumers import ChatConsumer, HealthAnalysisConsumer, UnroutedConsumer
from chat.context import WorkerContext


def websocket_routes(*, worker: WorkerContext) -> list:
    """Both paths of the original for each consumer (protocol §1). Any other path under them
    is a chat room id (any character, a newline included), validated by the consumer after
    accept, so a bad one is answered with INVALID_ROOM / 4004 rather than a bare 403. Every
    other path is answered the same (protocol §16), never with a 500 handshake. Each
    consumer gets this worker's context."""
    return [
        re_path(
            r"^api/v1/(?:ws|chat)/health-analysis/(?P<user_id>[^/]+)$",
            HealthAnalysisConsumer.as_asgi(worker=worker),
        ),
        re_path(r"(?s)^api/v1/(?:ws|chat)/(?P<room_id>.*)$", ChatConsumer.as_asgi(worker=worker)),
        re_path(r"(?s)^.*$", UnroutedConsumer.as_asgi()),
    ]
