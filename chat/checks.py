"""System checks: configurations that must not start."""

from django.conf import settings
from django.core.checks import Error, Warning, register, run_checks

from chat.auth import emulator_mode

TAG = "clarity"


@register(TAG)
def emulator_only_in_debug(app_configs, **kwargs):
    if emulator_mode() and not settings.DEBUG:
        return [
            Error(
                "FIREBASE_AUTH_EMULATOR_HOST is set while DEBUG is off.",
                hint="Emulator mode accepts unsigned tokens: development only. Unset it, or "
                "set DEBUG=1 on a development machine.",
                id="chat.E001",
            )
        ]
    return []


def enforce_checks() -> None:
    """Refuse to start on serious misconfiguration (daphne runs no system checks itself)."""
    serious = [error for error in run_checks(tags=[TAG]) if error.is_serious()]
    if serious:
        raise SystemExit("\n".join(str(error) for error in serious))


@register(TAG)
def assistant_configured(app_configs, **kwargs):
    from chat.assistant.base import PROVIDERS

    if settings.ASSISTANT_PROVIDER not in PROVIDERS:
        return [
            Error(
                f"ASSISTANT_PROVIDER={settings.ASSISTANT_PROVIDER!r} is not a provider.",
                hint=f"Use one of {', '.join(sorted(PROVIDERS))}.",
                id="chat.E002",
            )
        ]
    if settings.ASSISTANT_PROVIDER == "gemini" and not (
        settings.GEMINI_API_KEY or settings.GOOGLE_CLOUD_PROJECT
    ):
        return [
            Error(
                "ASSISTANT_PROVIDER=gemini needs GEMINI_API_KEY or GOOGLE_CLOUD_PROJECT.",
                hint="Set an API key (Gemini Developer API) or a project (Vertex AI).",
                id="chat.E003",
            )
        ]
    if settings.ASSISTANT_MODE not in {"", "always", "mention", "off"}:
        return [
            Error(
                f"ASSISTANT_MODE={settings.ASSISTANT_MODE!r} is not a mode.",
                hint="Use always, mention or off, or leave it empty (by room kind).",
                id="chat.E004",
            )
        ]
    if not 0 < settings.ASSISTANT_FIRST_CHUNK_TIMEOUT <= settings.ASSISTANT_TIMEOUT:
        return [
            Error(
                "ASSISTANT_FIRST_CHUNK_TIMEOUT must be above 0 and at most ASSISTANT_TIMEOUT.",
                hint="The first piece of an answer cannot be waited for longer than all of it.",
                id="chat.E005",
            )
        ]
    if not (settings.ASSISTANT_STREAM_INTERVAL > 0 and settings.ASSISTANT_STREAM_DELIVERIES > 0):
        return [
            Error(
                "ASSISTANT_STREAM_INTERVAL and ASSISTANT_STREAM_DELIVERIES must be above 0.",
                hint="They pace the assistant_delta frames sent to a room.",
                id="chat.E006",
            )
        ]
    return []


@register(TAG)
def admin_two_factor_in_production(app_configs, **kwargs):
    if not settings.DEBUG and not settings.ADMIN_REQUIRE_2FA:
        return [
            Warning(
                "ADMIN_REQUIRE_2FA is off while DEBUG is off.",
                hint="The admin shows health data: production requires a second factor. "
                "Give each staff user a device (manage.py addtotpdevice), then set "
                "ADMIN_REQUIRE_2FA=1 (the default without DEBUG).",
                id="chat.W001",
            )
        ]
    return []
