"""ASGI application of the baseline: the tutorial consumer at `/ws/<room>/`.

It reads the project's settings (clarity_project.settings), so it runs on exactly the channel
layer the environment gives Clarity (in-memory, or Redis with the same prefix rules). With
BENCH_BASELINE_LAYER=stock it runs on the stock channels / channels-redis class of that layer
instead (same configuration), as a tutorial deployment would.
"""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "clarity_project.settings")

from django.core.asgi import get_asgi_application

django_asgi_app = get_asgi_application()

from django.conf import settings  # noqa: E402

STOCK_LAYERS = {
    "chat.layers.InMemoryChannelLayer": "channels.layers.InMemoryChannelLayer",
    "chat.pubsub.RedisPubSubChannelLayer": "channels_redis.pubsub.RedisPubSubChannelLayer",
}
if os.environ.get("BENCH_BASELINE_LAYER") == "stock":
    layer = settings.CHANNEL_LAYERS["default"]
    layer["BACKEND"] = STOCK_LAYERS.get(layer["BACKEND"], layer["BACKEND"])

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import re_path  # noqa: E402

from bench.baseline.consumer import ChatConsumer  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": URLRouter([re_path(r"^ws/(?P<room_name>[^/]+)/$", ChatConsumer.as_asgi())]),
    }
)
