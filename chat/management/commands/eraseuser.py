from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from chat.audit import Actor, audit_record
from chat.models import AuditAction, ChatUser
from chat.userdata import UnknownUser, UserDataRefused, user_data_counts, user_erase


class Command(BaseCommand):
    help = (
        "Erase one chat user's data (the right to deletion): their messages become "
        "tombstones in their rooms' history (content null), their versions are deleted, their "
        "sessions lose addresses and user agents, their memberships go (bans stay), their "
        "open sockets are closed on every worker. Recorded in the audit. Without --yes, shows "
        "what would be erased and erases nothing."
    )

    def add_arguments(self, parser):
        parser.add_argument("user_id", help="the user's uid (Firebase)")
        parser.add_argument("--yes", action="store_true", help="erase: this cannot be undone")

    def handle(self, *args, user_id: str, yes: bool, **options):
        try:
            if not yes:
                counts = user_data_counts(user_id=user_id)
                self.stdout.write(
                    f"Stored for {user_id}: " + ", ".join(f"{n} {k}" for k, n in counts.items())
                )
                raise CommandError("Nothing erased: run again with --yes to erase.")
            erasure = user_erase(
                user_id=user_id,
                timeout=settings.CHAT_REVOKE_TIMEOUT,
                audit=lambda counts: audit_record(
                    request=None,
                    action=AuditAction.DELETE,
                    model=ChatUser,
                    object_ids=[user_id],
                    actor=Actor.command("eraseuser"),
                    details={"erasure": counts},
                ),
            )
        except UserDataRefused as error:
            raise CommandError(str(error)) from None
        except UnknownUser:
            raise CommandError(f"Nothing is stored for uid {user_id!r}.") from None
        self.stdout.write(
            f"Erased {user_id}: {erasure.messages} message(s) made tombstones, "
            f"{erasure.versions} version(s) deleted, {erasure.sessions} session(s) "
            f"anonymised, {erasure.memberships} membership(s) removed, "
            f"{erasure.sockets_closed} socket(s) closed."
        )
        if erasure.sockets_open:
            self.stderr.write(
                f"{erasure.sockets_open} socket(s) of {user_id} still open: their worker did "
                f"not close them within {settings.CHAT_REVOKE_TIMEOUT} s."
            )
