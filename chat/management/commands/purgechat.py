from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from chat.retention import BATCH_SIZE, chat_purge, chat_purge_pending


def _scope(days: int) -> str:
    return f"older than {days} days" if days else "retention off"


class Command(BaseCommand):
    help = (
        "Delete messages (with their versions) older than CHAT_MESSAGE_RETENTION_DAYS and "
        "ended sessions older than CHAT_SESSION_RETENTION_DAYS, in batches; open sessions "
        "are never deleted. A setting at 0 (the default) keeps that kind forever. Run daily "
        "by deploy/clarity-chat-purge.timer, like clearsessions."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--batch-size",
            type=int,
            default=BATCH_SIZE,
            help=f"rows per delete transaction (default {BATCH_SIZE})",
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="count what would be deleted; delete nothing"
        )

    def handle(self, *args, batch_size: int, dry_run: bool, **options):
        if batch_size < 1:
            raise CommandError("--batch-size must be at least 1.")
        days = {
            "message_days": settings.CHAT_MESSAGE_RETENTION_DAYS,
            "session_days": settings.CHAT_SESSION_RETENTION_DAYS,
        }
        if dry_run:
            purged, verb = chat_purge_pending(**days), "Would delete"
        else:
            purged, verb = chat_purge(**days, batch_size=batch_size), "Deleted"
        self.stdout.write(
            f"{verb} {purged.messages} message(s) and {purged.versions} version(s) "
            f"({_scope(days['message_days'])}), {purged.sessions} ended session(s) "
            f"({_scope(days['session_days'])})."
        )
