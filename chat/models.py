import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone


class AssistantMode(models.TextChoices):
    DEFAULT = "", "Server default"
    ALWAYS = "always", "Every message"
    MENTION = "mention", "Messages starting with @ai"
    OFF = "off", "Off"


class RoomKind(models.TextChoices):
    PUBLIC = "public", "Public (any signed-in user may join)"
    PRIVATE = "private", "Private (members only)"
    DIRECT = "direct", "Direct (two users)"
    PERSONAL = "personal", "Personal (one user's health analysis)"


class Role(models.TextChoices):
    OWNER = "owner", "Owner"
    MODERATOR = "moderator", "Moderator"
    MEMBER = "member", "Member"


class Room(models.Model):
    """A chat room (protocol §11). Who may read or write it is decided by `chat.access`."""

    name = models.CharField(primary_key=True, max_length=64, help_text="The room id of the URL.")
    kind = models.CharField(max_length=8, choices=RoomKind.choices, default=RoomKind.PRIVATE)
    title = models.CharField(
        max_length=100, blank=True, help_text="The name members see; empty: the room id."
    )
    # The two uids of a direct room, sorted and joined by a newline (never in a uid), so
    # each pair has one direct room.
    direct_pair = models.CharField(max_length=300, null=True, blank=True, unique=True)
    created_by = models.CharField(max_length=128, blank=True, db_index=True)
    description = models.TextField(blank=True)
    assistant_mode = models.CharField(
        max_length=8, choices=AssistantMode.choices, blank=True, default=AssistantMode.DEFAULT
    )
    max_users = models.PositiveIntegerField(
        null=True, blank=True, help_text="Distinct users allowed at once; empty for no limit."
    )
    is_closed = models.BooleanField(default=False, help_text="Refuse new joins.")
    created_at = models.DateTimeField(default=timezone.now)
    # The seq of the room's latest event (protocol §15; chat.sequence): 0 before any.
    last_seq = models.PositiveBigIntegerField(default=0, editable=False)

    def __str__(self) -> str:
        return self.name

    @property
    def display_name(self) -> str:
        return self.title or self.name


class RoomMember(models.Model):
    """A user's membership of a room: role, push mute, ban (a ban keeps the row so that
    rejoining a public room stays refused until a moderator adds the user again)."""

    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="members")
    user_id = models.CharField(max_length=128, db_index=True)
    role = models.CharField(max_length=10, choices=Role.choices, default=Role.MEMBER)
    joined_at = models.DateTimeField(default=timezone.now)
    muted = models.BooleanField(default=False, help_text="No push notifications.")
    banned = models.BooleanField(default=False, help_text="Refused until added again.")
    last_read_seq = models.PositiveBigIntegerField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["room", "user_id"], name="chat_member_unique")
        ]

    def __str__(self) -> str:
        return f"{self.user_id} in {self.room_id} ({self.role})"


class ChatUser(models.Model):
    """A user as last seen in a verified token. Its row is the per-user lock that makes the
    connection cap and join/leave detection exact across workers."""

    user_id = models.CharField(primary_key=True, max_length=128)
    username = models.CharField(max_length=255)
    first_seen = models.DateTimeField(default=timezone.now)
    # Push notifications show the sender and the start of the message (protocol §13): only
    # if the user asked for it, and only where CHAT_PUSH_PREVIEW_ALLOWED permits.
    push_previews = models.BooleanField(default=False)

    class Meta:
        # The admin's actions on one user's data (chat/userdata.py), each audited.
        permissions = [
            ("export_chatuser", "Can export a chat user's data"),
            ("erase_chatuser", "Can erase a chat user's data"),
        ]

    def __str__(self) -> str:
        return f"{self.username} ({self.user_id})"


class ChatMessage(models.Model):
    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="messages")
    user_id = models.CharField(max_length=128, db_index=True)
    username = models.CharField(max_length=255)
    content = models.TextField()
    metadata = models.JSONField(null=True, blank=True)
    client_message_id = models.CharField(max_length=128, null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    # Set by an edit (chat.edits.message_edit), which keeps what it replaced as a
    # MessageVersion; history frames then carry it as `metadata.edited_at` (protocol §12).
    edited_at = models.DateTimeField(null=True, blank=True)
    # Set when the message is deleted, its content emptied and its metadata removed (an
    # erasure, chat.userdata.user_erase): it keeps its id and place in the room's history,
    # whose frames show it with `content: null` and `metadata.deleted_at` (protocol §12).
    deleted_at = models.DateTimeField(null=True, blank=True)
    # Its room's seq when it was stored, and the seq of its latest change (its edit or
    # deletion, else `seq`): protocol §15, chat.sequence. Null only on a row stored before
    # seqs existed that the migration could not number (none: 0006 numbers them all).
    seq = models.PositiveBigIntegerField(null=True, editable=False)
    latest_seq = models.PositiveBigIntegerField(null=True, editable=False)

    class Meta:
        indexes = [
            models.Index(fields=["room", "id"], name="chat_message_room_id"),
            models.Index(fields=["room", "latest_seq"], name="chat_message_room_latest"),
            # Idempotent send (protocol §15): a client id looked up in its room.
            models.Index(
                fields=["room", "client_message_id"],
                name="chat_message_room_client_id",
                condition=models.Q(client_message_id__isnull=False),
            ),
        ]
        constraints = [
            models.UniqueConstraint(fields=["room", "seq"], name="chat_message_room_seq")
        ]

    def __str__(self) -> str:
        # No content: this is what the admin's pages, history and deletion pages name.
        return f"#{self.pk} {self.username} in {self.room_id}"


class EditorKind(models.TextChoices):
    USER = "user", "User (the author)"
    OPERATOR = "operator", "Operator (the admin)"


class MessageVersion(models.Model):
    """What a message said until an edit replaced it: its content and metadata then, and who
    replaced them when (`editor` is a user id or, for an operator, the staff username)."""

    message = models.ForeignKey(ChatMessage, on_delete=models.CASCADE, related_name="versions")
    content = models.TextField()
    metadata = models.JSONField(null=True, blank=True)
    edited_at = models.DateTimeField(default=timezone.now)
    editor_kind = models.CharField(max_length=8, choices=EditorKind.choices)
    editor = models.CharField(max_length=150)

    class Meta:
        indexes = [models.Index(fields=["message", "id"], name="chat_version_message_id")]

    def __str__(self) -> str:
        return f"#{self.message_id} before {self.edited_at:%Y-%m-%d %H:%M:%S}"


class Platform(models.TextChoices):
    ANDROID = "android"
    IOS = "ios"
    WEB = "web"


class Device(models.Model):
    """A phone or browser that can be sent push notifications (protocol §13): its Firebase
    Cloud Messaging registration token, registered by the user signed in on it. The token is
    a secret (whoever holds it can have messages sent to that device): never in a URL, a
    log or the admin's lists."""

    token = models.CharField(max_length=4096, unique=True)
    user_id = models.CharField(max_length=128, db_index=True)
    platform = models.CharField(max_length=8, choices=Platform.choices)
    registered_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        # No token: what the admin's pages name.
        return f"{self.platform} device of {self.user_id}"


class PushState(models.Model):
    """A member's push notifications for one room (protocol §13): whether one is owed
    (`pending`, from `due_at`: coalesced, at most one per CHAT_PUSH_COALESCE), when one was
    last sent, and the failed attempts of the one owed. Queued by the chat workers as
    messages are stored (`chat.push.pushes_queue`), sent by the push worker
    (`manage.py pushworker`): the outbox survives restarts of both."""

    user_id = models.CharField(max_length=128)
    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="push_states")
    pending = models.BooleanField(default=False)
    # The latest message the push is owed for (its preview, where the user asked for one).
    message = models.ForeignKey(
        ChatMessage, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    due_at = models.DateTimeField(null=True, blank=True)
    last_sent_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user_id", "room"], name="chat_push_state_unique")
        ]
        indexes = [
            models.Index(fields=["due_at"], name="chat_push_due", condition=models.Q(pending=True))
        ]

    def __str__(self) -> str:
        return f"push to {self.user_id} for {self.room_id}"


class Endpoint(models.TextChoices):
    CHAT = "chat", "Chat"
    HEALTH = "health", "Health analysis"


class ChatSession(models.Model):
    """One row per WebSocket connection, open until `disconnected_at` is set."""

    session_id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(ChatUser, on_delete=models.CASCADE, related_name="sessions")
    username = models.CharField(max_length=255)
    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="sessions")
    endpoint = models.CharField(max_length=8, choices=Endpoint.choices, default=Endpoint.CHAT)
    channel_name = models.CharField(max_length=255)
    worker_id = models.CharField(max_length=128, db_index=True)
    client_address = models.CharField(max_length=64, blank=True)
    user_agent = models.CharField(max_length=512, blank=True)
    connected_at = models.DateTimeField(default=timezone.now)
    last_seen = models.DateTimeField(default=timezone.now)
    disconnected_at = models.DateTimeField(null=True, blank=True, db_index=True)
    close_code = models.PositiveIntegerField(null=True, blank=True)
    close_reason = models.CharField(
        max_length=64,
        blank=True,
        help_text="client, worker_lost, or the server's close (shutdown, connection_timeout, "
        "session_terminated, invalid_token, ...)",
    )
    messages_sent = models.PositiveIntegerField(default=0)
    leave_due_at = models.DateTimeField(
        null=True,
        blank=True,
        db_index=True,
        help_text="A stopping worker closed this socket: the room is told the user left only "
        "if they are not back by then (CHAT_SHUTDOWN_REJOIN_GRACE).",
    )

    class Meta:
        indexes = [
            models.Index(
                fields=["room", "user"],
                condition=Q(disconnected_at__isnull=True),
                name="chat_session_active_room",
            ),
            models.Index(
                fields=["user"],
                condition=Q(disconnected_at__isnull=True),
                name="chat_session_active_user",
            ),
        ]

    @property
    def is_active(self) -> bool:
        return self.disconnected_at is None

    def __str__(self) -> str:
        return f"{self.username} in {self.room_id} ({self.session_id})"


class AuditAction(models.TextChoices):
    VIEW = "view", "Viewed"
    SEARCH = "search", "Searched"
    ADD = "add", "Added"
    CHANGE = "change", "Changed"
    DELETE = "delete", "Deleted"
    EXPORT = "export", "Exported"
    LOGIN = "login", "Signed in"
    LOGIN_REFUSED = "login_refused", "Sign-in refused"


class ActorKind(models.TextChoices):
    STAFF = "staff", "Staff (admin)"
    USER = "user", "Chat user"
    COMMAND = "command", "Operator (manage.py)"


class AuditEntry(models.Model):
    """One access to health data or the admin: who, when, what, from where (chat/audit.py).
    Never what was read: a search is recorded by its length and fields, not its text.
    Append-only: the admin shows entries to superusers and lets nobody change them."""

    at = models.DateTimeField(default=timezone.now, db_index=True)
    actor_kind = models.CharField(max_length=8, choices=ActorKind.choices)
    # The staff username or chat user id, kept as it was (the account may change or go).
    actor = models.CharField(max_length=150, db_index=True)
    staff_user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="Empty for a chat user, a refused sign-in, or a deleted account.",
    )
    action = models.CharField(max_length=16, choices=AuditAction.choices)
    model = models.CharField(max_length=100, blank=True, help_text="app_label.model")
    object_id = models.CharField(max_length=255, blank=True)
    details = models.JSONField(default=dict, blank=True)
    client_address = models.CharField(max_length=64, blank=True)

    class Meta:
        verbose_name_plural = "audit entries"
        indexes = [models.Index(fields=["model", "object_id"], name="chat_audit_object")]

    def __str__(self) -> str:
        return f"{self.actor} {self.action} {self.model} {self.object_id}".rstrip()
