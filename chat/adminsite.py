"""The admin site (`admin.site`, through `chat.apps.ClarityAdminConfig`): Django's, plus

- two-factor sign-in when ADMIN_REQUIRE_2FA is on: the password and a one-time password from
  the user's confirmed TOTP device (django-otp), and a session signed in without one is not
  let in (treated as not staff);
- every sign-in and refused sign-in recorded in the audit (`chat.audit`), with whether the
  username was locked out: django-axes refuses a username after ADMIN_LOGIN_FAILURE_LIMIT
  failures for ADMIN_LOGIN_LOCKOUT seconds (settings; its middleware answers 429).

The settings are read per request, so a test can switch them.
"""

from __future__ import annotations

from django.conf import settings
from django.contrib import admin
from django.contrib.admin.forms import AdminAuthenticationForm
from django_otp.admin import OTPAdminAuthenticationForm, OTPAdminSite

from chat.audit import Actor, audit_record
from chat.models import AuditAction

# What a refused sign-in's entry keeps of the name it gave.
ATTEMPTED_NAME_MAX_CHARS = 150


class ClarityAdminSite(admin.AdminSite):
    site_header = "Clarity Chat administration"
    site_title = "Clarity Chat admin"

    @property
    def login_form(self) -> type[AdminAuthenticationForm]:
        return OTPAdminAuthenticationForm if settings.ADMIN_REQUIRE_2FA else AdminAuthenticationForm

    @property
    def login_template(self) -> str | None:
        return OTPAdminSite.login_template if settings.ADMIN_REQUIRE_2FA else None

    def has_permission(self, request) -> bool:
        return super().has_permission(request) and (
            not settings.ADMIN_REQUIRE_2FA or request.user.is_verified()
        )

    def login(self, request, extra_context=None):
        response = super().login(request, extra_context)
        if request.method != "POST":
            return response
        if response.status_code == 302 and request.user.is_authenticated:
            audit_record(request=request, action=AuditAction.LOGIN)
        elif response.status_code == 200:  # the form again, with why
            attempted = request.POST.get("username", "")[:ATTEMPTED_NAME_MAX_CHARS]
            audit_record(
                request=request,
                action=AuditAction.LOGIN_REFUSED,
                actor=Actor.attempted(attempted),
                details={"locked_out": bool(getattr(request, "axes_locked_out", False))},
            )
        return response
