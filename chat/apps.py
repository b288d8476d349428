from django.apps import AppConfig


class ChatConfig(AppConfig):
    name = "chat"
    verbose_name = "Clarity Chat"

    def ready(self) -> None:
        from django.db.models.signals import post_save

        from chat import checks  # noqa: F401  (registers the system checks)
        from chat.models import Room
        from chat.rooms import room_saved

        post_save.connect(room_saved, sender=Room, dispatch_uid="chat.room_saved")
