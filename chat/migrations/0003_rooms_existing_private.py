"""Rooms that existed before v1.1 (protocol §11) become private (0002 gave them the default
kind), with everyone who posted or held a session there as a member: nothing readable before
becomes readable by more people after. The reserved health-analysis rooms become personal,
owned by their user."""

from django.db import migrations

HEALTH_ROOM_PREFIX = "health_analysis_"
AI_USER_ID = "AI"


def existing_rooms_private(apps, schema_editor):
    Room = apps.get_model("chat", "Room")
    RoomMember = apps.get_model("chat", "RoomMember")
    ChatMessage = apps.get_model("chat", "ChatMessage")
    ChatSession = apps.get_model("chat", "ChatSession")
    members: set[tuple[str, str]] = set()
    members.update(
        ChatMessage.objects.exclude(user_id=AI_USER_ID).values_list("room_id", "user_id").distinct()
    )
    members.update(ChatSession.objects.values_list("room_id", "user_id").distinct())
    personal = set(
        Room.objects.filter(name__startswith=HEALTH_ROOM_PREFIX).values_list("name", flat=True)
    )
    Room.objects.filter(name__in=personal).update(kind="personal")
    rows = []
    for room_id, user_id in sorted(members):
        if room_id in personal:
            if room_id != HEALTH_ROOM_PREFIX + user_id:
                continue  # never anyone else's
            rows.append(RoomMember(room_id=room_id, user_id=user_id, role="owner"))
        else:
            rows.append(RoomMember(room_id=room_id, user_id=user_id, role="member"))
    RoomMember.objects.bulk_create(rows, batch_size=1000, ignore_conflicts=True)


class Migration(migrations.Migration):
    dependencies = [("chat", "0002_rooms_membership")]

    operations = [migrations.RunPython(existing_rooms_private, migrations.RunPython.noop)]
