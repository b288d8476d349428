"""The operators' admin. Room memberships edited here go through `chat.membership`'s
services as an operator (outside the member rule of `chat.access`): a membership deleted or
banned here closes that user's sockets in the room, as a removal through the API does."""

from __future__ import annotations

from asgiref.sync import async_to_sync
from django import forms
from django.conf import settings
from django.contrib import admin
from django.db import transaction
from django.db.models import Count, Q

from chat.membership import (
    InvalidRequest,
    member_put,
    member_remove,
    membership_mute,
    room_id_check,
    room_sockets_revoke,
)
from chat.models import ChatMessage, ChatSession, ChatUser, Room, RoomKind, RoomMember
from chat.sessions import sessions_terminate

# Kinds an operator may give a room: direct rooms are made for a pair of users by the API,
# personal rooms by their user's health-analysis socket.
OPERATOR_KINDS = (RoomKind.PUBLIC, RoomKind.PRIVATE)


def _messages(error: InvalidRequest) -> list[str]:
    return [item["msg"] for item in error.details["errors"]]


def _revoke_after_commit(*, room_id: str, user_id: str, channels: list[str]) -> None:
    """Close the user's sockets in the room once the admin's transaction has committed (the
    sockets' own session ends need the database the transaction holds)."""
    if channels:
        transaction.on_commit(
            lambda: async_to_sync(room_sockets_revoke)(
                room_id=room_id,
                user_id=user_id,
                channels=channels,
                timeout=settings.CHAT_REVOKE_TIMEOUT,
            )
        )


class RoomForm(forms.ModelForm):
    class Meta:
        model = Room
        fields = "__all__"

    def clean_name(self) -> str:
        name = self.cleaned_data["name"]
        if self.instance._state.adding:
            try:
                room_id_check(room_id=name)
            except InvalidRequest as error:
                raise forms.ValidationError(_messages(error)) from None
        return name

    def clean_kind(self) -> str:
        kind = self.cleaned_data["kind"]
        before = None if self.instance._state.adding else self.instance.kind
        if kind != before and (kind not in OPERATOR_KINDS or before not in (None, *OPERATOR_KINDS)):
            raise forms.ValidationError(
                "Operators make public and private rooms, and may switch a room between them."
            )
        return kind


class RoomMemberForm(forms.ModelForm):
    class Meta:
        model = RoomMember
        fields = ["user_id", "role", "muted", "banned"]

    def clean(self):
        data = super().clean()
        if self.instance.pk is not None and "user_id" in self.changed_data:
            raise forms.ValidationError("Delete this membership and add the other user instead.")
        if self.initial.get("banned") and data.get("banned") and "role" in self.changed_data:
            raise forms.ValidationError("Lift the ban first to change the role.")
        return data


class RoomMemberInline(admin.TabularInline):
    model = RoomMember
    form = RoomMemberForm
    fields = ["user_id", "role", "muted", "banned", "joined_at", "last_read_seq"]
    readonly_fields = ["joined_at", "last_read_seq"]
    extra = 0


@admin.register(Room)
class RoomAdmin(admin.ModelAdmin):
    form = RoomForm
    inlines = [RoomMemberInline]
    list_display = [
        "name",
        "title",
        "kind",
        "assistant_mode",
        "max_users",
        "is_closed",
        "members_now",
        "created_at",
    ]
    list_filter = ["kind", "is_closed", "assistant_mode"]
    search_fields = ["name", "title", "description"]

    def get_readonly_fields(self, request, obj=None):
        made_by_users = ["direct_pair", "created_by"]
        return made_by_users if obj is None else ["name", *made_by_users]

    def save_formset(self, request, form, formset, change):
        if formset.model is not RoomMember:
            return super().save_formset(request, form, formset, change)
        self._save_memberships(request, room_id=form.instance.pk, formset=formset)

    def _save_memberships(self, request, *, room_id: str, formset) -> None:
        """Each changed membership through the services, as the operator; the formset's
        record of what changed filled in for the admin's history."""
        actor = f"admin:{request.user.get_username()}"
        formset.new_objects, formset.changed_objects, formset.deleted_objects = [], [], []
        for inline in formset.forms:
            member = inline.instance
            if inline in formset.deleted_forms:
                if member.pk is not None:
                    self._remove(actor, room_id, member.user_id, ban=False)
                    formset.deleted_objects.append(member)
                continue
            if not inline.has_changed():
                continue
            data, new = inline.cleaned_data, member.pk is None
            if data["banned"]:
                if new or not inline.initial.get("banned"):
                    self._remove(actor, room_id, data["user_id"], ban=True)
            else:
                member_put(
                    actor_id=actor,
                    room_id=room_id,
                    user_id=data["user_id"],
                    role=data["role"],
                    as_operator=True,
                )
            if "muted" in inline.changed_data:
                membership_mute(
                    user_id=data["user_id"], room_id=room_id, muted=data["muted"], as_operator=True
                )
            if new:
                formset.new_objects.append(member)
            else:
                formset.changed_objects.append((member, inline.changed_data))

    def _remove(self, actor: str, room_id: str, user_id: str, *, ban: bool) -> None:
        channels = member_remove(
            actor_id=actor, room_id=room_id, user_id=user_id, as_operator=True, ban=ban
        )
        _revoke_after_commit(room_id=room_id, user_id=user_id, channels=channels)

    def delete_model(self, request, obj):
        self.delete_queryset(request, Room.objects.filter(pk=obj.pk))

    def delete_queryset(self, request, queryset):
        """A deleted room's open sockets are closed as if each user had been removed."""
        sockets = ChatSession.objects.filter(
            room__in=queryset, disconnected_at__isnull=True
        ).values_list("room_id", "user_id", "channel_name")
        by_user: dict[tuple[str, str], list[str]] = {}
        for room_id, user_id, channel in sockets:
            by_user.setdefault((room_id, user_id), []).append(channel)
        super().delete_queryset(request, queryset)
        for (room_id, user_id), channels in by_user.items():
            _revoke_after_commit(room_id=room_id, user_id=user_id, channels=channels)

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
