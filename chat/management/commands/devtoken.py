from django.core.management.base import BaseCommand, CommandError

from chat.auth import emulator_mode
from chat.devtokens import emulator_token


class Command(BaseCommand):
    help = "Print a Firebase Auth Emulator ID token (development only: emulator mode)."

    def add_arguments(self, parser):
        parser.add_argument("uid", help="the user id (token subject)")
        parser.add_argument("--name", help="display name claim")
        parser.add_argument("--email", help="email claim")
        parser.add_argument("--lifetime", type=int, default=3600, help="seconds until exp")

    def handle(self, *args, uid, name, email, lifetime, **options):
        if not emulator_mode():
            raise CommandError(
                "FIREBASE_AUTH_EMULATOR_HOST is not set: this server would refuse the token."
            )
        self.stdout.write(emulator_token(uid=uid, name=name, email=email, lifetime=lifetime))
