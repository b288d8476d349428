"""System checks: configurations that must not start."""

from django.conf import settings
from django.core.checks import Error, register, run_checks

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
