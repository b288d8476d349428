"""ASGI entry point: HTTP goes to Django, WebSockets through the origin policy to the chat."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "clarity_project.settings")

from django.core.asgi import get_asgi_application

django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from chat.checks import enforce_checks  # noqa: E402
from chat.origins import OriginPolicy  # noqa: E402
from chat.routing import websocket_urlpatterns  # noqa: E402
from chat.worker import WorkerLifecycle  # noqa: E402

enforce_checks()

application = WorkerLifecycle(
    ProtocolTypeRouter(
        {
            "http": django_asgi_app,
            "websocket": OriginPolicy(URLRouter(websocket_urlpatterns)),
        }
    )
)
