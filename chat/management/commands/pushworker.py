"""`manage.py pushworker`: send the push notifications the chat workers queued (protocol §13,
chat/push.py), until SIGTERM or SIGINT. Run one or more beside the daphne workers, on the
same database, with Firebase credentials (FIREBASE_CREDENTIALS, or Application Default
Credentials) and CHAT_PUSH on in the chat workers. With `--metrics-port`, its Prometheus
counters (`clarity_pushes_total`: sent, failed, pruned) are served on that port."""

from __future__ import annotations

import threading

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from prometheus_client import start_http_server

from chat.auth import emulator_mode, firebase_app
from chat.push import push_worker_run, stop_on_signals


class Command(BaseCommand):
    help = "Send the queued push notifications (protocol §13) until stopped."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--metrics-port", type=int, default=0, help="serve /metrics here")

    def handle(self, *args, metrics_port: int = 0, **options) -> None:
        if emulator_mode() and not settings.FIREBASE_CREDENTIALS:
            raise CommandError(
                "pushworker needs Firebase credentials (FIREBASE_CREDENTIALS): the Auth "
                "Emulator does not send push notifications"
            )
        if metrics_port:
            start_http_server(metrics_port, addr="127.0.0.1")
        stop = threading.Event()
        stop_on_signals(stop)
        self.stdout.write("push worker: sending queued pushes")
        push_worker_run(app=firebase_app(), stop=stop, poll=settings.CHAT_PUSH_POLL)
        self.stdout.write("push worker: stopped")
