from django.core.management.base import BaseCommand, CommandError

from chat.membership import InvalidRequest, room_create
from chat.models import Room, RoomKind


class Command(BaseCommand):
    help = (
        "Create a room as an operator (rooms are no longer made by joining, protocol §11): "
        "public by default, or private with an owner who can then add members."
    )

    def add_arguments(self, parser):
        parser.add_argument("room_id", help="the id in the room's URL: 1-64 of A-Z a-z 0-9 _ . -")
        parser.add_argument(
            "--kind", choices=[RoomKind.PUBLIC, RoomKind.PRIVATE], default=RoomKind.PUBLIC
        )
        parser.add_argument("--name", default="", help="the name members see (default: the id)")
        parser.add_argument("--owner", help="uid of the room's owner")
        parser.add_argument(
            "--if-missing",
            action="store_true",
            help="do nothing if the room exists (whatever its kind): for setup scripts",
        )

    def handle(self, *args, room_id, kind, name, owner, if_missing, **options):
        if if_missing and Room.objects.filter(pk=room_id).exists():
            self.stdout.write(f"Room {room_id} exists.")
            return
        try:
            room = room_create(room_id=room_id, kind=kind, title=name, owner_id=owner)
        except InvalidRequest as error:
            problems = "; ".join(
                f"{'.'.join(map(str, item['loc']))} {item['msg']}"
                for item in error.details["errors"]
            )
            raise CommandError(problems) from None
        self.stdout.write(f"Created {room.kind} room {room.name}.")
