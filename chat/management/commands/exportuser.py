import json
import os

from django.core.management.base import BaseCommand, CommandError

from chat.audit import Actor, audit_record
from chat.models import AuditAction, ChatUser
from chat.userdata import UnknownUser, UserDataRefused, export_summary, user_export


class Command(BaseCommand):
    help = (
        "Export everything stored about one chat user (their messages and versions, their "
        "personal room's analyses, sessions with addresses and user agents, memberships) as "
        "JSON: the right of access. Recorded in the audit. The file is health data: it is "
        "created readable by its owner only."
    )

    def add_arguments(self, parser):
        parser.add_argument("user_id", help="the user's uid (Firebase)")
        parser.add_argument(
            "--output", "-o", help="write to this file (a new one) instead of standard output"
        )

    def handle(self, *args, user_id: str, output: str | None, **options):
        try:
            data = user_export(user_id=user_id)
        except UserDataRefused as error:
            raise CommandError(str(error)) from None
        except UnknownUser:
            raise CommandError(f"Nothing is stored for uid {user_id!r}.") from None
        text = json.dumps(data, ensure_ascii=False, indent=2)
        if output is None:
            self.record(user_id, data)
            self.stdout.write(text)
            return
        try:
            descriptor = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise CommandError(f"{output} exists: choose a new file.") from None
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            try:
                self.record(user_id, data)
            except BaseException:
                os.unlink(output)
                raise
            file.write(text + "\n")
        self.stderr.write(f"Exported {user_id}'s data to {output}.")

    def record(self, user_id: str, data: dict) -> None:
        """The export's audit entry, before anything is written: an export that cannot be
        recorded does not happen."""
        audit_record(
            request=None,
            action=AuditAction.EXPORT,
            model=ChatUser,
            object_ids=[user_id],
            actor=Actor.command("exportuser"),
            details=export_summary(data),
        )
