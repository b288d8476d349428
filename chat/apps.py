from django.apps import AppConfig


class ChatConfig(AppConfig):
    name = "chat"
    verbose_name = "Clarity Chat"

    def ready(self) -> None:
        from chat import checks  # noqa: F401  (registers the system checks)
