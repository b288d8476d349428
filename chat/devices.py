"""Push devices (protocol §13): the Firebase Cloud Messaging registration tokens users
register for their phones and browsers.

A token belongs to one device, and a device to whoever signed in on it last: registering a
token another user registered moves it to the caller (the other user signed out, or the
device changed hands). A user has at most CHAT_MAX_DEVICES_PER_USER devices: a new one
beyond that replaces the one registered longest ago (a reinstalled app gets a new token, and
its old one would otherwise hold the place). A token is removed by its own user only (with
the token in the request's body, never its URL); removing another user's token, or an
unknown one, changes nothing and says so the same way.
"""

from __future__ import annotations

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from chat.auth import display_name
from chat.models import Device
from chat.sessions import user_lock

# What FCM registration tokens are made of (they are ~150-250 characters).
TOKEN_PATTERN = r"^[A-Za-z0-9_:.\-]{1,4096}$"


def device_register(*, user_id: str, token: str, platform: str) -> bool:
    """Register the token for the user (moved from another user if it was theirs); whether
    it is new to this user."""
    with transaction.atomic():
        # One user's registrations in turn (a user who never connected gets the row a token
        # without a name would give them).
        user_lock(user_id=user_id, username=display_name({}, user_id))
        now = timezone.now()
        device = Device.objects.select_for_update().filter(token=token).first()
        new = device is None or device.user_id != user_id
        if device is None:
            Device.objects.create(
                token=token, user_id=user_id, platform=platform, registered_at=now
            )
        else:
            device.user_id, device.platform, device.registered_at = user_id, platform, now
            device.save(update_fields=["user_id", "platform", "registered_at"])
        excess = Device.objects.filter(user_id=user_id).order_by("-registered_at", "-id")[
            settings.CHAT_MAX_DEVICES_PER_USER :
        ]
        Device.objects.filter(pk__in=list(excess.values_list("pk", flat=True))).delete()
    return new


def device_remove(*, user_id: str, token: str) -> bool:
    """Remove the user's device with this token; whether there was one."""
    removed, _ = Device.objects.filter(user_id=user_id, token=token).delete()
    return removed > 0


def push_preferences(*, user_id: str, previews: bool | None = None) -> dict[str, bool]:
    """The user's push settings, changed first if `previews` is given: whether they asked for
    previews, and whether this deployment sends them (CHAT_PUSH_PREVIEW_ALLOWED)."""
    with transaction.atomic():
        user = user_lock(user_id=user_id, username=display_name({}, user_id))
        if previews is not None and previews != user.push_previews:
            user.push_previews = previews
            user.save(update_fields=["push_previews"])
    return {"previews": user.push_previews, "allowed": settings.CHAT_PUSH_PREVIEW_ALLOWED}
