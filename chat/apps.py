from collections import deque

from django.apps import AppConfig
from django.contrib.admin import apps as admin_apps

# With DEBUG, Django keeps the last 9,000 SQL statements of each database connection
# (`connection.queries`) and empties the list at each HTTP request. WebSocket sessions are
# not requests: a worker's list would fill up and stay full (about 10 MB). Development keeps
# the most recent ones only.
DEBUG_QUERIES_KEPT = 200


def cap_debug_query_log(sender, connection, **kwargs) -> None:
    connection.queries_log = deque(connection.queries_log, maxlen=DEBUG_QUERIES_KEPT)


class ChatConfig(AppConfig):
    name = "chat"
    verbose_name = "Clarity Chat"

    def ready(self) -> None:
        from django.db.backends.signals import connection_created
        from django.db.models.signals import post_save

        from chat import checks  # noqa: F401  (registers the system checks)
        from chat.models import Room
        from chat.rooms import room_saved

        post_save.connect(room_saved, sender=Room, dispatch_uid="chat.room_saved")
        connection_created.connect(cap_debug_query_log, dispatch_uid="chat.cap_debug_query_log")


class ClarityAdminConfig(admin_apps.AdminConfig):
    """Django's admin, with this project's site as `admin.site` (chat/adminsite.py). Named in
    INSTALLED_APPS in place of `django.contrib.admin`; not the `chat` app's own config."""

    default = False
    default_site = "chat.adminsite.ClarityAdminSite"
