"""The operators' admin. Room memberships edited here go through `chat.membership`'s
services as an operator (outside the member rule of `chat.access`): a membership deleted or
banned here closes that user's sockets in the room, as a removal through the API does.

Chat content is health data. Every page that shows an object, every search, every addition,
change and deletion here is recorded in the audit (`AuditedAdmin`, `chat.audit`); the
message list shows who wrote where and when, never what (the change page does, and its view
is recorded); an operator's edit keeps the previous version (`chat.edits`); one user's data
is exported or erased through `chat.userdata`, each audited. Audit entries are shown to
superusers only, and nobody changes them. What comes from users is shown
bounded (`bounded`), so no stored row can make a page fail or balloon."""

from __future__ import annotations

from typing import Any

from asgiref.sync import async_to_sync
from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.utils import unquote
from django.contrib.admin.views.main import SEARCH_VAR
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin
from django.db import transaction
from django.db.models import Count, Q, TextField
from django.db.models.functions import Cast
from django.http import JsonResponse
from django.template.response import TemplateResponse
from django.utils.http import content_disposition_header
from django_otp.plugins.otp_totp.admin import TOTPDeviceAdmin
from django_otp.plugins.otp_totp.models import TOTPDevice

from chat.audit import audit_record
from chat.edits import Editor, EditRefused, content_check, message_edit
from chat.membership import (
    InvalidRequest,
    member_put,
    member_remove,
    membership_mute,
    room_id_check,
    room_sockets_revoke,
)
from chat.models import (
    AuditAction,
    AuditEntry,
    ChatMessage,
    ChatSession,
    ChatUser,
    MessageVersion,
    Room,
    RoomKind,
    RoomMember,
)
from chat.sessions import sessions_terminate
from chat.userdata import (
    UnknownUser,
    UserDataRefused,
    export_summary,
    user_data_counts,
    user_erase,
    user_export,
)

# The most of one stored value (content, metadata, a user agent) a page shows.
DISPLAY_MAX_CHARS = 5000

# Kinds an operator may give a room: direct rooms are made for a pair of users by the API,
# personal rooms by their user's health-analysis socket.
OPERATOR_KINDS = (RoomKind.PUBLIC, RoomKind.PRIVATE)


def bounded(text: str, limit: int = DISPLAY_MAX_CHARS) -> str:
    """At most `limit` characters of `text`, saying how many more there are."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit} more characters)"


def json_text(field: str) -> Cast:
    """A JSON column as the database's text: shown without decoding it here, so a stored
    value nested deeper than Python's decoder takes still shows (bounded)."""
    return Cast(field, output_field=TextField())


def _change_summary(message: Any) -> list[dict[str, Any]]:
    """The admin's change message without the inline objects' names (which may be anything
    a user wrote): which fields and which kinds of related objects changed."""
    if not isinstance(message, list):
        return []
    return [
        {kind: {key: value for key, value in change.items() if key != "object"}}
        for item in message
        for kind, change in item.items()
    ]


class AuditedAdmin(admin.ModelAdmin):
    """A model admin whose every object view (GET of the change page), search (a changelist
    with `q`), addition, change and deletion (bulk ones too: one entry per object) is
    recorded in the audit: a view or search before the page is sent, a change in its own
    transaction, a deletion before it happens. What cannot be recorded does not happen."""

    def changeform_view(self, request, object_id=None, form_url="", extra_context=None):
        response = super().changeform_view(request, object_id, form_url, extra_context)
        if request.method == "GET" and object_id is not None and response.status_code == 200:
            audit_record(
                request=request,
                action=AuditAction.VIEW,
                model=self.model,
                object_ids=[unquote(object_id)],
            )
        return response

    def changelist_view(self, request, extra_context=None):
        response = super().changelist_view(request, extra_context)
        query = request.GET.get(SEARCH_VAR, "")
        if request.method == "GET" and query and response.status_code == 200:
            # Not every page answering 200 is a list (`?e=1`: Django's "database error").
            changelist = (getattr(response, "context_data", None) or {}).get("cl")
            audit_record(
                request=request,
                action=AuditAction.SEARCH,
                model=self.model,
                details={
                    "query_length": len(query),
                    "fields": list(self.get_search_fields(request)),
                    "results": changelist.result_count if changelist else None,
                },
            )
        return response

    def log_addition(self, request, obj, message):
        logged = super().log_addition(request, obj, message)
        audit_record(request=request, action=AuditAction.ADD, model=self.model, object_ids=[obj.pk])
        return logged

    def log_change(self, request, obj, message):
        logged = super().log_change(request, obj, message)
        if not message:  # saved without a change: nothing to record beyond the view
            return logged
        audit_record(
            request=request,
            action=AuditAction.CHANGE,
            model=self.model,
            object_ids=[obj.pk],
            details={"changes": _change_summary(message)},
        )
        return logged

    def log_deletions(self, request, queryset):
        logged = super().log_deletions(request, queryset)
        audit_record(
            request=request,
            action=AuditAction.DELETE,
            model=self.model,
            object_ids=[obj.pk for obj in queryset],
        )
        return logged


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
class RoomAdmin(AuditedAdmin):
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
class ChatUserAdmin(AuditedAdmin):
    """Chat users, and the two actions on one user's data (`chat.userdata`), each audited:
    export (a JSON download; permission `chat.export_chatuser`) and erasure (after a
    confirmation page; permission `chat.erase_chatuser`)."""

    list_display = ["user_id", "username", "first_seen"]
    search_fields = ["user_id", "username"]
    actions = ["export_user_data", "erase_user_data"]

    def has_add_permission(self, request):
        return False

    def has_export_permission(self, request) -> bool:
        return request.user.has_perm("chat.export_chatuser")

    def has_erase_permission(self, request) -> bool:
        return request.user.has_perm("chat.erase_chatuser")

    @admin.action(description="Export selected user's data (JSON)", permissions=["export"])
    def export_user_data(self, request, queryset):
        user_ids = list(queryset.values_list("user_id", flat=True)[:2])
        if len(user_ids) != 1:
            self.message_user(request, "Select one user to export.", messages.WARNING)
            return None
        [user_id] = user_ids
        data = user_export(user_id=user_id)
        audit_record(
            request=request,
            action=AuditAction.EXPORT,
            model=ChatUser,
            object_ids=[user_id],
            details=export_summary(data),
        )
        response = JsonResponse(data, json_dumps_params={"ensure_ascii": False, "indent": 2})
        response["Content-Disposition"] = content_disposition_header(
            True, f"clarity-user-{user_id}.json"
        )
        return response  # the admin's pages are never cached (no-store), this one too

    @admin.action(description="Erase selected users' data", permissions=["erase"])
    def erase_user_data(self, request, queryset):
        """First a confirmation page saying what will be erased and what stays; erased when
        it is posted back (`post=yes`)."""
        users = list(queryset.order_by("user_id"))
        if request.POST.get("post") != "yes":
            context = {
                **self.admin_site.each_context(request),
                "title": "Erase these users' data?",
                "opts": self.model._meta,
                "users": [(user, user_data_counts(user_id=user.pk)) for user in users],
                "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
                "revoke_timeout": settings.CHAT_REVOKE_TIMEOUT,
            }
            return TemplateResponse(request, "admin/chat/chatuser/erase_confirmation.html", context)
        for user in users:
            try:
                erasure = user_erase(
                    user_id=user.pk,
                    timeout=settings.CHAT_REVOKE_TIMEOUT,
                    audit=lambda counts, user_id=user.pk: audit_record(
                        request=request,
                        action=AuditAction.DELETE,
                        model=ChatUser,
                        object_ids=[user_id],
                        details={"erasure": counts},
                    ),
                )
            except (UserDataRefused, UnknownUser) as error:
                self.message_user(request, f"{user.pk}: not erased ({error}).", messages.ERROR)
                continue
            self.message_user(
                request,
                f"Erased {user.pk}: {erasure.messages} message(s), {erasure.versions} "
                f"version(s), {erasure.sessions} session(s), {erasure.memberships} "
                f"membership(s); {erasure.sockets_closed} socket(s) closed.",
            )
            if erasure.sockets_open:
                self.message_user(
                    request,
                    f"{user.pk}: {erasure.sockets_open} socket(s) still open after "
                    f"{settings.CHAT_REVOKE_TIMEOUT} s.",
                    messages.WARNING,
                )
        return None


@admin.register(ChatSession)
class ChatSessionAdmin(AuditedAdmin):
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
    fields = [
        "session_id",
        "user",
        "username",
        "room",
        "endpoint",
        "channel_name",
        "worker_id",
        "client_address",
        "agent",
        "connected_at",
        "last_seen",
        "disconnected_at",
        "close_code",
        "close_reason",
        "messages_sent",
    ]
    readonly_fields = fields

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False  # sessions are the audit trail of connections

    @admin.display(description="User agent")
    def agent(self, session):
        return bounded(session.user_agent)

    @admin.action(description="Terminate selected sessions")
    def terminate_sessions(self, request, queryset):
        session_ids = [str(pk) for pk in queryset.values_list("session_id", flat=True)]
        audit_record(
            request=request,
            action=AuditAction.CHANGE,
            model=ChatSession,
            object_ids=session_ids,
            details={"action": "terminate"},
        )
        count = sessions_terminate(session_ids=session_ids)
        self.message_user(request, f"Asked the workers to close {count} open session(s).")


class ContentField(forms.CharField):
    """A message's content as typed: not stripped, and with the line breaks browsers send
    (CRLF) read back as stored (LF), so saving an untouched page is not an edit."""

    def __init__(self, **kwargs):
        super().__init__(strip=False, widget=forms.Textarea(attrs={"rows": 8}), **kwargs)

    def to_python(self, value):
        return super().to_python(value).replace("\r\n", "\n")


class ChatMessageForm(forms.ModelForm):
    content = ContentField()

    class Meta:
        model = ChatMessage
        fields = ["content"]

    def clean_content(self) -> str:
        content = self.cleaned_data["content"]
        if content != self.instance.content:
            if self.instance.deleted_at is not None:
                raise forms.ValidationError("A deleted message cannot be edited.")
            try:
                content_check(content=content, current=self.instance.content)
            except EditRefused as error:
                raise forms.ValidationError(str(error)) from None
        return content


class MessageVersionInline(admin.TabularInline):
    """A message's earlier versions, newest first, read-only."""

    model = MessageVersion
    fields = ["edited_at", "editor_kind", "editor", "previous_content", "previous_metadata"]
    readonly_fields = fields
    ordering = ["-id"]
    extra = 0
    verbose_name = "earlier version"

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def get_queryset(self, request):
        versions = super().get_queryset(request).defer("metadata")
        return versions.annotate(_metadata=json_text("metadata"))

    @admin.display(description="Content")
    def previous_content(self, version):
        return bounded(version.content)

    @admin.display(description="Metadata")
    def previous_metadata(self, version):
        return bounded(version._metadata or "")


@admin.register(ChatMessage)
class ChatMessageAdmin(AuditedAdmin):
    """The list shows who wrote where and when, and whether it was edited, never what: the
    content is on the change page (each view recorded). An edit there goes through
    `chat.edits.message_edit` as the operator: the previous version is kept and shown, and
    clients see the message as edited. Messages are not added here: only the chat stores
    them (and delivers them)."""

    form = ChatMessageForm
    inlines = [MessageVersionInline]
    list_display = ["id", "room", "username", "user_id", "created_at", "edited", "deleted"]
    list_filter = ["room", "user_id"]
    search_fields = ["content", "user_id", "username"]
    date_hierarchy = "created_at"
    fields = [
        "room",
        "user_id",
        "username",
        "created_at",
        "edited_at",
        "deleted_at",
        "client_message_id",
        "content",
        "metadata_display",
    ]
    readonly_fields = [name for name in fields if name != "content"]

    def get_queryset(self, request):
        # Nothing of what users wrote is read for the list (nor for a bulk deletion).
        return super().get_queryset(request).defer("content", "metadata")

    def has_add_permission(self, request):
        return False

    @admin.display(description="Edited", boolean=True, ordering="edited_at")
    def edited(self, message):
        return message.edited_at is not None

    @admin.display(description="Deleted", boolean=True, ordering="deleted_at")
    def deleted(self, message):
        return message.deleted_at is not None

    @admin.display(description="Metadata")
    def metadata_display(self, message):
        stored = ChatMessage.objects.filter(pk=message.pk).values_list(
            json_text("metadata"), flat=True
        )
        return bounded(stored.first() or "")

    def save_model(self, request, obj, form, change):
        if "content" in form.changed_data:
            message_edit(
                message_id=obj.pk,
                content=form.cleaned_data["content"],
                editor=Editor.operator(request.user.get_username()),
            )


User = get_user_model()
admin.site.unregister(User)


@admin.register(User)
class AuditedUserAdmin(AuditedAdmin, UserAdmin):
    """Django's user admin, audited (staff accounts, their passwords and permissions)."""


admin.site.unregister(TOTPDevice)


@admin.register(TOTPDevice)
class AuditedTOTPDeviceAdmin(AuditedAdmin, TOTPDeviceAdmin):
    """django-otp's TOTP devices, audited (who gave whom a second factor)."""


@admin.register(AuditEntry)
class AuditEntryAdmin(admin.ModelAdmin):
    """The audit: superusers read it; nobody adds, changes or deletes entries here, and other
    staff do not see it, whatever permissions they were given."""

    list_display = [
        "at",
        "actor",
        "actor_kind",
        "action",
        "model",
        "object_id",
        "client_address",
        "details",
    ]
    list_filter = ["action", "actor_kind", "model"]
    search_fields = ["actor", "object_id", "client_address"]
    date_hierarchy = "at"

    def has_module_permission(self, request):
        return request.user.is_superuser

    def has_view_permission(self, request, obj=None):
        return request.user.is_superuser

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
