from django.contrib import admin
from django.urls import path

from chat import api, ops, views, web

urlpatterns = [
    path("", web.index, name="chat-client"),
    path("dev/token", web.dev_token, name="dev-token"),
    path("firebase-messaging-sw.js", web.push_service_worker, name="push-service-worker"),
    path("admin/", admin.site.urls),
    path("api/v1/ws/chat/stats", views.stats, name="chat-stats"),
    path("api/v1/ws/chat/users/<str:room_id>", views.room_users, name="chat-room-users"),
    path("api/v1/rooms", api.rooms, name="api-rooms"),
    path("api/v1/devices", api.devices, name="api-devices"),
    path("api/v1/push", api.push_settings, name="api-push"),
    path("api/v1/rooms/direct", api.direct_room, name="api-direct-room"),
    path(
        "api/v1/rooms/<str:room_id>/members/<str:user_id>",
        api.room_member,
        name="api-room-member",
    ),
    path("api/v1/rooms/<str:room_id>/membership", api.room_membership, name="api-room-membership"),
    path("healthz", ops.healthz, name="healthz"),
    path("readyz", ops.readyz, name="readyz"),
    path("metrics", ops.metrics, name="metrics"),
]
