"""The access audit: who opened, searched, changed, deleted or exported what, when, and from
where. Chat content is health data; this is its access log.

`audit_record` is the one way to write an entry. The admin calls it for every change-page
view, changelist search, addition, change and deletion (`chat.admin.AuditedAdmin`) and for
every sign-in and refused sign-in (`chat.adminsite`); a user's data export and erasure
(`chat.userdata`, from the admin or `manage.py exportuser` / `eraseuser`) record
`AuditAction.EXPORT` and `AuditAction.DELETE` on the chat user. An entry names objects,
never their content: a search is recorded by its length and the fields it searched, not its
text.

The address is REMOTE_ADDR, the one Django sees: the client's, which
`chat.client_address.ProxiedClient` reads from `X-Forwarded-For` only when the connection
comes from one of CHAT_TRUSTED_PROXIES (the proxy; deploy/nginx.conf). Nothing here reads a
forwarding header itself.
"""

from __future__ import annotations

import getpass
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django.contrib.auth.base_user import AbstractBaseUser
from django.db import models
from django.http import HttpRequest

from chat.models import ActorKind, AuditAction, AuditEntry

ACTOR_MAX_CHARS = 150
OBJECT_ID_MAX_CHARS = 255
ADDRESS_MAX_CHARS = 64


@dataclass(frozen=True)
class Actor:
    """Who acted: a staff user of the admin, a name someone tried to sign in with, or a chat
    user (by uid) acting through the API."""

    kind: ActorKind
    name: str
    staff_user_id: int | None = None

    @classmethod
    def staff(cls, user: AbstractBaseUser) -> Actor:
        return cls(ActorKind.STAFF, user.get_username(), user.pk)

    @classmethod
    def attempted(cls, username: str) -> Actor:
        """The name a refused sign-in gave (no account is implied)."""
        return cls(ActorKind.STAFF, username)

    @classmethod
    def chat_user(cls, user_id: str) -> Actor:
        return cls(ActorKind.USER, user_id)

    @classmethod
    def command(cls, command: str) -> Actor:
        """An operator running `manage.py <command>` on a server, as the system user."""
        return cls(ActorKind.COMMAND, f"{getpass.getuser()} (manage.py {command})")


def client_address(request: HttpRequest) -> str:
    """The client's address as Django sees it (REMOTE_ADDR; see the module's docstring). Also
    the address django-axes counts sign-in failures by (AXES_CLIENT_IP_CALLABLE)."""
    return request.META.get("REMOTE_ADDR", "")[:ADDRESS_MAX_CHARS]


def audit_record(
    *,
    request: HttpRequest | None,
    action: AuditAction,
    model: type[models.Model] | None = None,
    object_ids: Iterable[object] = (),
    details: dict[str, Any] | None = None,
    actor: Actor | None = None,
) -> list[AuditEntry]:
    """Record `action` on each of `object_ids` of `model`: one entry per object, or one entry
    naming no object when there is none (a sign-in). `actor` defaults to the request's
    signed-in user; without a request (a management command) it must be given, and the
    entry has no address. `details` is small and never content (field names, a length, a
    count).

    Written in the caller's transaction when there is one: if the entry cannot be written,
    the access it records fails with it."""
    if actor is None:
        if request is None or not request.user.is_authenticated:
            raise ValueError("an entry without a signed-in request needs an explicit actor")
        actor = Actor.staff(request.user)
    label = model._meta.label_lower if model is not None else ""
    address = client_address(request) if request is not None else ""
    ids = [str(pk)[:OBJECT_ID_MAX_CHARS] for pk in object_ids] or [""]
    return AuditEntry.objects.bulk_create(
        AuditEntry(
            actor_kind=actor.kind,
            actor=actor.name[:ACTOR_MAX_CHARS],
            staff_user_id=actor.staff_user_id,
            action=action,
            model=label,
            object_id=object_id,
            details=details or {},
            client_address=address,
        )
        for object_id in ids
    )
