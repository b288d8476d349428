from django.urls import re_path

from chat.consumers import ChatConsumer

# Both chat paths of the original (protocol §1). The room id is validated by the consumer,
# after accept, so a bad one is answered with INVALID_ROOM / 4004 rather than a bare 403.
websocket_urlpatterns = [
    re_path(r"^api/v1/(?:ws|chat)/(?P<room_id>.*)$", ChatConsumer.as_asgi()),
]
