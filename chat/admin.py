from django.contrib import admin
from django.db.models import Count, Q

from chat.models import ChatMessage, ChatSession, ChatUser, Room
from chat.sessions import sessions_terminate


@admin.register(Room)
class RoomAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "description",
        "assistant_mode",
        "max_users",
        "is_closed",
        "members_now",
        "created_at",
    ]
    list_filter = ["is_closed", "assistant_mode"]
    search_fields = ["name", "description"]

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .annotate(
                _members=Count(
                    "sessions__user",
                    filter=Q(sessions__disconnected_at__isnull=True),
                    distinct=True,
                )
            )
        )

    @admin.display(description="Members now", ordering="_members")
    def members_now(self, room):
        return room._members


@admin.register(ChatUser)
class ChatUserAdmin(admin.ModelAdmin):
    list_display = ["user_id", "username", "first_seen"]
    search_fields = ["user_id", "username"]

    def has_add_permission(self, request):
        return False


@admin.register(ChatSession)
class ChatSessionAdmin(admin.ModelAdmin):
    list_display = [
        "session_id",
        "username",
        "user_id",
        "room",
        "endpoint",
        "worker_id",
        "connected_at",
        "last_seen",
        "disconnected_at",
        "close_code",
        "messages_sent",
    ]
    list_filter = [
        ("disconnected_at", admin.EmptyFieldListFilter),  # active = empty
        "endpoint",
        "room",
        "user",
        "worker_id",
    ]
    search_fields = ["session_id", "user__user_id", "username", "room__name", "client_address"]
    date_hierarchy = "connected_at"
    actions = ["terminate_sessions"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False  # sessions are the audit trail of connections

    @admin.action(description="Terminate selected sessions")
    def terminate_sessions(self, request, queryset):
        session_ids = [str(pk) for pk in queryset.values_list("session_id", flat=True)]
        count = sessions_terminate(session_ids=session_ids)
        self.message_user(request, f"Asked the workers to close {count} open session(s).")


@admin.register(ChatMessage)
class ChatMessageAdmin(admin.ModelAdmin):
    list_display = ["id", "room", "username", "user_id", "short_content", "created_at"]
    list_filter = ["room", "user_id"]
    search_fields = ["content", "user_id", "username"]
    date_hierarchy = "created_at"
    raw_id_fields = ["room"]

    @admin.display(description="Content")
    def short_content(self, message):
        return message.content[:80]
