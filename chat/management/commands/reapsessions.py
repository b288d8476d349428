from asgiref.sync import async_to_sync
from django.core.management.base import BaseCommand, CommandError

from chat.liveness import liveness_is_shared
from chat.worker import reap_dead_workers


class Command(BaseCommand):
    help = (
        "End the open sessions of workers that are no longer alive (their liveness key in "
        "Redis has expired) and tell their rooms those users left. Live workers do "
        "this by themselves every CHAT_REAP_INTERVAL seconds; this is the on-demand cleanup, "
        "like clearsessions."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--all",
            action="store_true",
            dest="assume_all_dead",
            help="Treat every worker as dead: only when no server is running (required "
            "without Redis (REDIS_URL), where this command cannot see the workers' liveness).",
        )

    def handle(self, *args, assume_all_dead: bool, **options):
        if not assume_all_dead and not liveness_is_shared():
            raise CommandError(
                "Worker liveness lives in Redis (REDIS_URL), which is not configured: "
                "stop the server and use --all."
            )
        count = async_to_sync(reap_dead_workers)(assume_all_dead=assume_all_dead)
        self.stdout.write(f"Ended {count} session(s) of dead workers.")
