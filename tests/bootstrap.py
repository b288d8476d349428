"""Loaded with `-p tests.bootstrap` before pytest-django reads the settings: the test
environment is the embedded default (SQLite, in-memory layer, local-memory cache) in Firebase
Auth Emulator mode. Tests of the signed-token path switch emulator mode off themselves.

It also keeps everything the run logs, and scans it at the end (tests/logscan.py): every
record of this process goes to `pytest.log` in the run's base temporary directory, where the
server processes the tests start write their output too; after the last test, a token or a
health payload value in any `*.log` file there fails the run, naming the file and line.
Records reach `pytest.log` through the same redaction (chat.logs.RedactingFilter) as every
handler of a server, so the scan reads what a server would write."""

import logging
import os

import pytest

os.environ["DEBUG"] = "1"
os.environ["FIREBASE_AUTH_EMULATOR_HOST"] = "127.0.0.1:9099"
os.environ["FIREBASE_PROJECT_ID"] = "clarity-test"
os.environ.setdefault("SECRET_KEY", "test-only-secret-key")
# The assistant answers every message by default (protocol §7); tests of the chat itself
# are clearer without it, and the assistant's tests turn it on for their rooms.
os.environ["ASSISTANT_MODE"] = "off"
os.environ["ASSISTANT_PROVIDER"] = "builtin"
# The built-in assistant streams its answer at once (tests that watch it stream slow it).
os.environ["ASSISTANT_BUILTIN_WORD_DELAY"] = "0"
# Our loggers at their most talkative, so the log scan sees everything they could write.
os.environ["LOG_LEVEL"] = "DEBUG"
for name in (
    "REDIS_URL",
    "DATABASE_URL",
    "FIREBASE_CREDENTIALS",
    "FIREBASE_CHECK_REVOKED",
    "GEMINI_API_KEY",
    "GOOGLE_CLOUD_PROJECT",
    "LOG_FORMAT",
):
    os.environ.pop(name, None)

LOG_FILE = "pytest.log"
_log_file = pytest.StashKey[logging.Handler]()
_findings = pytest.StashKey[list]()


def pytest_sessionstart(session: pytest.Session) -> None:
    # Importing the ASGI application runs django.setup(), which reconfigures logging and so
    # drops the root's handlers; it does that once per process, so do it before adding ours.
    import clarity_project.asgi  # noqa: F401
    from chat.logs import JsonFormatter, RedactingFilter

    # pytest's own factory behind the tmp_path fixtures (fixtures are not available here).
    basetemp = session.config._tmp_path_factory.getbasetemp()
    handler = logging.FileHandler(basetemp / LOG_FILE, encoding="utf-8")
    handler.setFormatter(JsonFormatter())
    # Like every handler of the project's LOGGING: the scan reads what a server would write.
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    # Libraries at INFO, as a server at daphne's default verbosity logs them.
    root.setLevel(logging.INFO)
    session.config.stash[_log_file] = handler


def pytest_sessionfinish(session: pytest.Session) -> None:
    handler = session.config.stash.get(_log_file, None)
    if handler is None or session.config.option.collectonly:
        return
    logging.getLogger().removeHandler(handler)
    handler.close()
    from tests.logscan import scan_tree, suite_runs

    findings = scan_tree(session.config._tmp_path_factory.getbasetemp(), suite_runs())
    session.config.stash[_findings] = findings
    if findings and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    findings = config.stash.get(_findings, [])
    if not findings:
        return
    terminalreporter.section("log scan: tokens or health payloads were logged", red=True)
    for finding in findings[:50]:
        terminalreporter.write_line(str(finding))
    if len(findings) > 50:
        terminalreporter.write_line(f"... and {len(findings) - 50} more")
