"""Sequence numbers (protocol §15): the messages stored before them are numbered 1, 2, 3...
in each room in the order they were stored (their ids), and each room's `last_seq` is its
count."""

from django.db import migrations, models

BATCH = 1000


def number_existing_messages(apps, schema_editor):
    Room = apps.get_model("chat", "Room")
    ChatMessage = apps.get_model("chat", "ChatMessage")
    rooms = ChatMessage.objects.values_list("room_id", flat=True).distinct().order_by("room_id")
    for room_id in list(rooms):
        ids = list(
            ChatMessage.objects.filter(room_id=room_id).order_by("id").values_list("id", flat=True)
        )
        for start in range(0, len(ids), BATCH):
            rows = [
                ChatMessage(id=id_, seq=start + n + 1, latest_seq=start + n + 1)
                for n, id_ in enumerate(ids[start : start + BATCH])
            ]
            ChatMessage.objects.bulk_update(rows, ["seq", "latest_seq"])
        Room.objects.filter(pk=room_id).update(last_seq=len(ids))


class Migration(migrations.Migration):
    dependencies = [
        ("chat", "0005_userdata"),
    ]

    operations = [
        migrations.AddField(
            model_name="chatmessage",
            name="latest_seq",
            field=models.PositiveBigIntegerField(editable=False, null=True),
        ),
        migrations.AddField(
            model_name="chatmessage",
            name="seq",
            field=models.PositiveBigIntegerField(editable=False, null=True),
        ),
        migrations.AddField(
            model_name="room",
            name="last_seq",
            field=models.PositiveBigIntegerField(default=0, editable=False),
        ),
        migrations.RunPython(number_existing_messages, migrations.RunPython.noop),
        migrations.AddIndex(
            model_name="chatmessage",
            index=models.Index(fields=["room", "latest_seq"], name="chat_message_room_latest"),
        ),
        migrations.AddIndex(
            model_name="chatmessage",
            index=models.Index(
                condition=models.Q(("client_message_id__isnull", False)),
                fields=["room", "client_message_id"],
                name="chat_message_room_client_id",
            ),
        ),
        migrations.AddConstraint(
            model_name="chatmessage",
            constraint=models.UniqueConstraint(
                fields=("room", "seq"), name="chat_message_room_seq"
            ),
        ),
    ]
