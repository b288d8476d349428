from django.contrib import admin
from django.urls import path

from chat import views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/ws/chat/stats", views.stats, name="chat-stats"),
    path("api/v1/ws/chat/users/<str:room_id>", views.room_users, name="chat-room-users"),
]
