"""The production environment documented in deploy/clarity.env.example: Django's deployment
checks pass with it (and fail without its HTTPS settings or with its placeholder secret), and
the admin signs in through the TLS proxy of deploy/nginx.conf — a request carrying the headers
nginx sets — with its CSRF cookie and token, getting Secure cookies and HSTS back."""

from __future__ import annotations

import re
import runpy
import secrets
from pathlib import Path

import pytest
from django.test import Client
from django_otp.plugins.otp_totp.models import TOTPDevice

from chat.testing.processes import BASE_ENV, ServerError, manage, server_env
from tests.conftest import second_factor, totp_token

ROOT = Path(__file__).resolve().parent.parent
ENV_EXAMPLE = ROOT / "deploy" / "clarity.env.example"
NGINX = ROOT / "deploy" / "nginx.conf"
SETTINGS = ROOT / "clarity_project" / "settings.py"
HOST = "chat.example.com"
# What nginx sends for a request that reached it over TLS (deploy/nginx.conf).
THROUGH_PROXY = {"HTTP_HOST": HOST, "HTTP_X_FORWARDED_PROTO": "https", "REMOTE_ADDR": "10.0.0.5"}
# The settings the production environment decides for HTTP (what the test client needs).
HTTP_SETTINGS = (
    "DEBUG",
    "ALLOWED_HOSTS",
    "SECURE_PROXY_SSL_HEADER",
    "SECURE_SSL_REDIRECT",
    "SECURE_REDIRECT_EXEMPT",
    "SECURE_HSTS_SECONDS",
    "SECURE_HSTS_INCLUDE_SUBDOMAINS",
    "SECURE_HSTS_PRELOAD",
    "SESSION_COOKIE_SECURE",
    "CSRF_COOKIE_SECURE",
    "CSRF_TRUSTED_ORIGINS",
    "ADMIN_REQUIRE_2FA",
)


def documented_environment() -> dict[str, str]:
    """deploy/clarity.env.example as systemd's EnvironmentFile reads it."""
    env = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            env[name.strip()] = value.strip()
    return env


def production_environment(**changes: str | None) -> dict[str, str | None]:
    """The documented environment with test values for its secrets, nothing of the test
    suite's development environment (emulator mode, DEBUG) left; `changes` on top (None
    removes a variable)."""
    kept = ("DJANGO_SETTINGS_MODULE", "PYTHONUNBUFFERED")
    cleared: dict[str, str | None] = {name: None for name in BASE_ENV if name not in kept}
    return {
        **cleared,
        "LOG_FORMAT": None,
        "LOG_LEVEL": None,
        "ASSISTANT_MODE": None,
        **documented_environment(),
        "SECRET_KEY": secrets.token_urlsafe(50),
        "GEMINI_API_KEY": "test-gemini-key",
        **changes,
    }


def deploy_check(tmp_path: Path, **changes: str | None) -> str:
    env = server_env(production_environment(**changes))
    return manage(
        ["check", "--deploy", "--fail-level", "WARNING"],
        env=env,
        log_path=tmp_path / "check.log",
        timeout=60,
    )


def test_the_documented_production_environment_passes_the_deploy_check(tmp_path):
    assert "System check identified no issues" in deploy_check(tmp_path)


@pytest.mark.parametrize(
    ("changes", "finding"),
    [
        ({"SECURE_HSTS_SECONDS": None}, "security.W004"),
        ({"SECURE_SSL_REDIRECT": None}, "security.W008"),
        ({"SESSION_COOKIE_SECURE": "0"}, "security.W012"),
        ({"CSRF_COOKIE_SECURE": "0"}, "security.W016"),
        # The example's placeholder is not a real key.
        ({"SECRET_KEY": documented_environment()["SECRET_KEY"]}, "security.W009"),
        ({"ADMIN_REQUIRE_2FA": "0"}, "chat.W001"),
    ],
)
def test_the_deploy_check_fails_without_each_setting(tmp_path, changes, finding):
    with pytest.raises(ServerError, match=re.escape(finding)):
        deploy_check(tmp_path, **changes)


def test_without_a_secret_key_production_does_not_start(tmp_path):
    with pytest.raises(ServerError, match="SECRET_KEY must be set when DEBUG is off"):
        deploy_check(tmp_path, SECRET_KEY=None)


def test_nginx_sends_the_scheme_and_host_wherever_it_proxies():
    """The proxy header the settings trust is set by nginx on every proxied location, so no
    client can claim HTTPS through it."""
    locations = re.findall(r"location [^{]+\{[^}]*\}", NGINX.read_text())
    proxied = [block for block in locations if "proxy_pass" in block]
    assert len(proxied) >= 4
    for block in proxied:
        assert "proxy_set_header X-Forwarded-Proto $scheme;" in block, block
        assert "proxy_set_header Host $host;" in block, block
    assert documented_environment()["SECURE_PROXY_SSL_HEADER"] == "X-Forwarded-Proto"


# --- the admin through the proxy ---------------------------------------------------------------


@pytest.fixture
def production(settings, monkeypatch):
    """The HTTP settings clarity_project/settings.py makes from the production environment
    (the module run afresh under it), applied to this test."""
    for name, value in production_environment().items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    made = runpy.run_path(str(SETTINGS))
    assert made["SECURE_PROXY_SSL_HEADER"] == ("HTTP_X_FORWARDED_PROTO", "https")
    for name in HTTP_SETTINGS:
        setattr(settings, name, made[name])
    return settings


def csrf_token(page) -> str:
    return re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)


@pytest.mark.django_db
def test_the_admin_signs_in_through_the_proxy_with_secure_cookies(production, django_user_model):
    user = django_user_model.objects.create_superuser("olga", "olga@example.com", "right-pw")
    device = TOTPDevice.objects.create(user=user, name="phone", confirmed=True)
    browser = Client(enforce_csrf_checks=True)

    # Plain HTTP at the proxy's back door is sent to HTTPS.
    plain = browser.get("/admin/login/", **{**THROUGH_PROXY, "HTTP_X_FORWARDED_PROTO": "http"})
    assert plain.status_code == 301 and plain["Location"] == f"https://{HOST}/admin/login/"
    # The probes are not redirected (the load balancer may ask a worker directly).
    assert browser.get("/healthz", HTTP_HOST=HOST).status_code == 200

    page = browser.get("/admin/login/", **THROUGH_PROXY)
    assert page.status_code == 200
    assert page["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains; preload"
    assert browser.cookies["csrftoken"]["secure"] is True
    form = {
        "username": "olga",
        "password": "right-pw",
        "next": "/admin/",
        "csrfmiddlewaretoken": csrf_token(page),
        **second_factor(device, totp_token(device)),
    }
    origin = {"HTTP_ORIGIN": f"https://{HOST}", "HTTP_REFERER": f"https://{HOST}/admin/login/"}

    # Without the token, or from another origin: refused.
    without = {key: value for key, value in form.items() if key != "csrfmiddlewaretoken"}
    assert browser.post("/admin/login/", without, **THROUGH_PROXY, **origin).status_code == 403
    elsewhere = {**origin, "HTTP_ORIGIN": "https://evil.example"}
    assert browser.post("/admin/login/", form, **THROUGH_PROXY, **elsewhere).status_code == 403
    assert "sessionid" not in browser.cookies

    signed_in = browser.post("/admin/login/", form, **THROUGH_PROXY, **origin)

    assert signed_in.status_code == 302 and signed_in["Location"] == "/admin/"
    session = browser.cookies["sessionid"]
    assert session["secure"] is True and session["httponly"] is True
    assert browser.cookies["csrftoken"]["secure"] is True  # rotated at sign-in, still Secure
    assert browser.get("/admin/", **THROUGH_PROXY).status_code == 200
