from django.contrib import admin
from django.urls import path

from chat import ops, views, web

urlpatterns = [
    path("", web.index, name="chat-client"),
    path("dev/token", web.dev_token, name="dev-token"),
    path("admin/", admin.site.urls),
    path("api/v1/ws/chat/stats", views.stats, name="chat-stats"),
    path("api/v1/ws/chat/users/<str:room_id>", views.room_users, name="chat-room-users"),
    path("healthz", ops.healthz, name="healthz"),
    path("readyz", ops.readyz, name="readyz"),
    path("metrics", ops.metrics, name="metrics"),
]
