"""The browser client end to end: the page at `/` in headless Chromium (Debian's chromium and
chromium-driver), driven by Selenium, against a real daphne worker (tests/servers.py).

Rooms are deny by default (protocol §11): the server starts with the public room `lobby`
seeded as `scripts/serve` does (`manage.py createroom`), and a user reaches a room only
through the rooms list or an invitation link (`#room=<id>`). Browser sessions sign in with the
dev sign-in form, find the public room in the list, chat there, see each other's presence and
typing, reload, ask the assistant; one messages another in a direct room; one starts a private
room with another as member and both chat in it; a non-member's invitation link to a private
room is refused without a reconnect loop; one runs the health analysis on the sample file;
one rides out a server restart and catches up on what it missed.

Screenshots go to each test's output directory (the path is printed). With UPDATE_SCREENSHOT=1
the two-users-chatting state (in their private room) is also written to docs/screenshot.png
(the README's picture). Without Chromium the tests fail under CI (CI=true; `.ci/run` installs
it) and skip elsewhere.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import (
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from chat.testing.processes import HOST, ROOT, Worker, free_ports, manage, worker_start
from tests.servers import run_workers

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# Root needs --no-sandbox; the rest keeps Chromium off the (closed) network and quiet.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
)
WAIT = 15  # seconds: the bound of every wait (a reconnect after a restart is the slowest)
# Small, so that only the `history after` request of a reconnect can bring back all the
# messages missed while disconnected.
JOIN_HISTORY = 5
SCREENSHOT = ROOT / "docs" / "screenshot.png"
TOKEN_IN_URL = re.compile(r"([?&]token=)[^&'\s]+")
LOBBY = "lobby"  # the public room the server starts with
# Run in a page before its own scripts: records the path of every WebSocket it opens.
COUNT_SOCKETS = """
window.clarityTestSockets = [];
window.WebSocket = class extends window.WebSocket {
  constructor(url, ...rest) {
    super(url, ...rest);
    window.clarityTestSockets.push(new URL(url).pathname);
  }
};
"""


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in {"", "0", "false", "no", "off"}


def require_chromium() -> None:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if not missing:
        return
    message = (
        f"browser tests need {' and '.join(missing)}: "
        "apt-get install -y chromium chromium-driver (.ci/run does it)"
    )
    if _truthy("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def test_missing_chromium_fails_under_ci_and_skips_elsewhere(monkeypatch, tmp_path):
    monkeypatch.setattr(sys.modules[__name__], "CHROMEDRIVER", tmp_path / "chromedriver")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y chromium chromium-driver"):
        require_chromium()
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match="chromedriver"):
        require_chromium()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[list[Worker]]:
    """One worker; the list is yielded so that a test may replace a restarted worker in it
    (run_workers stops whatever the list holds at the end)."""
    require_chromium()
    (port,) = free_ports(1)
    env = {
        "CHAT_ALLOWED_ORIGINS": f"http://{HOST}:{port}",
        "ASSISTANT_PROVIDER": "builtin",
        "ASSISTANT_MODE": "mention",
        "CHAT_HISTORY_ON_JOIN": str(JOIN_HISTORY),
        "CHAT_OPEN_ROOMS": "0",  # deny by default, as deployed: rooms come from createroom
    }
    directory = tmp_path_factory.mktemp("browser-server")
    with run_workers(directory, env=env, ports=[port]) as workers:
        create_room(workers, directory, LOBBY, "--kind", "public", "--name", "Lobby")
        yield workers
        for worker in workers:
            print(worker.logs())


def create_room(server: list[Worker], log_dir: Path, room: str, *options: str) -> None:
    """`manage.py createroom` in the workers' database (rooms are not made by joining)."""
    manage(
        ["createroom", room, *options, "--if-missing"],
        env=server[0].env,
        log_path=log_dir / f"room-{room}.log",
    )


class ChatPage:
    """One browser session on the chat page; every wait is bounded by WAIT."""

    def __init__(self, driver: webdriver.Chrome, name: str):
        self.driver = driver
        self.name = name

    def wait(self, condition: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(
                lambda _: condition()
            )
        except TimeoutException:
            raise AssertionError(
                f"{self.name}: timed out waiting for {what}\n{self.describe()}"
            ) from None

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def find(self, css: str):
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def describe(self) -> str:
        """What the page shows, for failure messages."""
        return (
            f"status: {self.status()!r} room: {self.room()!r}\nmessages: {self.messages()}\n"
            f"presence: {self.presence()}\nalerts: {self.text('#alerts')!r}\n"
            f"my rooms: {self.rooms('my-rooms')}\npublic rooms: {self.rooms('public-rooms')}"
        )

    def text(self, css: str) -> str:
        return self.js("return document.querySelector(arguments[0])?.textContent ?? ''", css)

    def status(self) -> str:
        return self.js("return document.getElementById('connection-status').dataset.state")

    def wait_answer(self, question: str) -> None:
        """Until the assistant's answer quoting `question` is shown."""
        self.wait(
            lambda: any(
                m["author"] == "AI assistant" and question in m["body"] for m in self.messages()
            ),
            "the assistant's answer",
        )

    def messages(self) -> list[dict]:
        return self.js(
            """return [...document.querySelectorAll('#messages li.message')].map(li => ({
                id: li.dataset.messageId ?? null,
                author: li.querySelector('.author').textContent,
                body: li.querySelector('.body').textContent,
            }))"""
        )

    def bodies(self) -> list[str]:
        return [message["body"] for message in self.messages()]

    def notices(self) -> list[str]:
        return self.js(
            "return [...document.querySelectorAll('#messages li.notice')].map(li => li.textContent)"
        )

    def presence(self) -> list[str]:
        return self.js(
            "return [...document.querySelectorAll('#presence .name')].map(n => n.textContent)"
        )

    def room(self) -> str:
        """The id of the room open on the page ('' for none)."""
        return self.js("return document.getElementById('room-title').dataset.roomId ?? ''")

    def rooms(self, section: str) -> list[dict]:
        """The entries of one rooms list: `my-rooms` or `public-rooms`."""
        return self.js(
            """return [...document.querySelectorAll(`#${arguments[0]} .room-entry`)].map(b => ({
                id: b.dataset.roomId,
                kind: b.dataset.kind,
                name: b.querySelector('.room-name').textContent,
                sub: b.querySelector('.room-sub').textContent,
                current: b.getAttribute('aria-current') === 'true',
            }))""",
            section,
        )

    def listed(self, section: str, room: str) -> dict | None:
        return next((entry for entry in self.rooms(section) if entry["id"] == room), None)

    def sign_in(self, base_url: str, fragment: str = "") -> None:
        """Load the page (at `fragment`); sign in with the dev form unless the tab still is."""
        self.driver.get(f"{base_url}/{fragment}")
        self.wait(
            lambda: self.find("#dev-name").is_displayed() or self.find("#chat").is_displayed(),
            "the sign-in form or the chat",
        )
        if self.find("#dev-name").is_displayed():
            self.find("#dev-name").send_keys(self.name)
            self.find("#dev-sign-in button[type=submit]").click()
        self.wait(lambda: self.find("#chat").is_displayed(), "the signed-in page")

    def open(self, base_url: str, room: str) -> None:
        """Load the page on this room's link and wait for the connection."""
        self.sign_in(base_url, f"#room={room}")
        self.wait_in_room(room)

    def wait_in_room(self, room: str) -> None:
        self.wait(
            lambda: self.room() == room and self.status() == "open", f"the connection to {room}"
        )

    def click_room(self, section: str, room: str) -> None:
        """Open a room by clicking its entry in the list."""

        def clicked() -> bool:
            # The list may be redrawn (a refresh answered) between finding and clicking.
            try:
                self.find(f'#{section} .room-entry[data-room-id="{room}"]').click()
            except (NoSuchElementException, StaleElementReferenceException):
                return False
            return True

        self.wait(clicked, f"{room} in {section}")
        self.wait_in_room(room)

    def refresh_rooms(self, section: str, room: str) -> dict:
        """Refresh the rooms list and wait for this room (made by someone else) to show."""
        self.find("#rooms-refresh").click()
        return self.wait(lambda: self.listed(section, room), f"{room} in {section}")

    def submit(self, details: str, fields: dict[str, str]) -> None:
        """Fill in and submit one of the rooms list's forms (`new-room`, `direct`)."""
        if not self.find(f"#{details}").get_attribute("open"):
            self.find(f"#{details} summary").click()
        for field_id, value in fields.items():
            self.find(f"#{field_id}").clear()
            self.find(f"#{field_id}").send_keys(value)
        self.find(f"#{details} button[type=submit]").click()

    def form_error(self, details: str) -> str:
        return self.js(
            "const p = document.querySelector(`#${arguments[0]} .form-error`);"
            "return p.hidden ? '' : p.textContent",
            details,
        )

    def wait_connected(self) -> None:
        self.wait(lambda: self.status() == "open", "the connection")

    def type(self, text: str) -> None:
        self.find("#message-input").send_keys(text)

    def send(self, text: str) -> None:
        self.type(text)
        self.find("#send").click()
        self.wait_message(self.name, text)

    def wait_message(self, author: str, body: str) -> dict:
        def found():
            return next(
                (m for m in self.messages() if m["author"] == author and m["body"] == body), None
            )

        return self.wait(found, f"{author}: {body!r}")

    def wait_presence(self, names: list[str]) -> None:
        self.wait(lambda: sorted(self.presence()) == sorted(names), f"presence {names}")

    def screenshot(self, directory: Path, name: str) -> Path:
        path = directory / f"{name}.png"
        self.driver.save_screenshot(str(path))
        print(f"screenshot: {path}")
        return path


def new_driver(profile: Path) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))


@pytest.fixture(scope="module")
def browsers(server) -> Iterator[Callable[[str], ChatPage]]:
    """Opens browser sessions (one profile each), kept for the module; prints each one's
    console log at the end."""
    opened: list[ChatPage] = []
    profiles = Path(tempfile.mkdtemp(prefix="clarity-chromium-"))

    def open_browser(name: str) -> ChatPage:
        page = ChatPage(new_driver(profiles / name), name)
        opened.append(page)
        return page

    yield open_browser
    for page in opened:
        for entry in page.driver.get_log("browser"):
            message = TOKEN_IN_URL.sub(r"\1<token>", entry["message"])
            print(f"[{page.name} console] {entry['level']} {message}")
        page.driver.quit()
    shutil.rmtree(profiles, ignore_errors=True)


@pytest.fixture(scope="module")
def ana(browsers) -> ChatPage:
    return browsers("Ana")


@pytest.fixture(scope="module")
def ben(browsers) -> ChatPage:
    return browsers("Ben")


def base_url(server: list[Worker]) -> str:
    return server[0].http_url


@pytest.fixture(scope="module")
def cleo(browsers) -> ChatPage:
    page = browsers("Cleo")
    page.driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": COUNT_SOCKETS})
    return page


def test_two_users_find_the_public_room_chat_type_ask_the_assistant_and_reload(
    server, ana, ben, tmp_path
):
    ana.sign_in(base_url(server))
    lobby = ana.wait(lambda: ana.listed("public-rooms", LOBBY), "the lobby among public rooms")
    assert lobby["name"] == "Lobby" and lobby["kind"] == "public"
    # Nothing is joined before the user picks a room.
    assert ana.room() == "" and ana.find("#no-room").is_displayed()
    assert not ana.find("#message-input").is_enabled()
    assert ana.status() == "offline"

    ana.click_room("public-rooms", LOBBY)
    ana.wait_presence(["Ana"])
    assert ana.text("#room-title") == "Lobby"
    # Joining made Ana a member: the lobby moves to her own rooms, marked as open.
    ana.wait(
        lambda: (
            (ana.listed("my-rooms", LOBBY) or {}).get("current")
            and not ana.listed("public-rooms", LOBBY)
        ),
        "the lobby among Ana's rooms",
    )
    ben.sign_in(base_url(server))
    ben.click_room("public-rooms", LOBBY)
    ben.wait_presence(["Ana", "Ben"])
    ana.wait_presence(["Ana", "Ben"])
    assert ana.text("#online-count") == "2 online"
    ana.wait(lambda: "Ben joined the chat" in ana.notices(), "Ben's join notice")

    ana.send("Good morning, Ben! How did you sleep?")
    ben.wait_message("Ana", "Good morning, Ben! How did you sleep?")
    ben.send("Morning! Almost eight hours. <b>not bold</b>")
    ana.wait_message("Ben", "Morning! Almost eight hours. <b>not bold</b>")
    assert not ana.js("return document.querySelector('#messages b') !== null"), "HTML injected"

    ana.send("@ai Any tips for a steadier sleep schedule?")
    for page in (ana, ben):
        page.wait_answer("steadier sleep schedule")

    ben.type("I will try a fixed wake-up time")
    ana.wait(lambda: ana.text("#typing") == "Ben is typing…", "Ben's typing indicator")
    ben.find("#send").click()
    for page in (ben, ana):
        page.wait_message("Ben", "I will try a fixed wake-up time")
    ana.wait(lambda: ana.text("#typing") == "", "Ben's typing indicator to clear")
    ana.screenshot(tmp_path, "lobby")

    # A reload signs in again by itself, reopens the room of the address (#room=lobby) and
    # shows its stored history.
    before = [m for m in ben.messages() if m["id"] is not None][-JOIN_HISTORY:]
    ben.driver.refresh()
    ben.wait_in_room(LOBBY)
    ben.wait(lambda: ben.messages() == before, "the history after a reload")
    ana.wait_presence(["Ana", "Ben"])


def test_message_a_user_opens_a_direct_room_both_see(server, ana, ben, tmp_path):
    ben.sign_in(base_url(server))
    # A direct room with oneself is refused: the server's message shows in the form.
    ben.submit("direct", {"direct-user": "dev-ben"})
    ben.wait(lambda: ben.form_error("direct"), "the refusal of a direct room with oneself")
    assert "a direct room needs another user" in ben.form_error("direct")
    assert ben.room() == ""

    ben.submit("direct", {"direct-user": "dev-ana"})
    ben.wait(lambda: ben.room() != "" and ben.status() == "open", "the direct room")
    direct = ben.room()
    assert ben.form_error("direct") == ""
    # Listed under the other person's name.
    ben.wait(lambda: ben.listed("my-rooms", direct), "the direct room in Ben's list")
    assert ben.listed("my-rooms", direct)["name"] == "Ana"
    assert ben.listed("my-rooms", direct)["kind"] == "direct"
    assert ben.text("#room-title") == "Ana" and ben.text("#room-kind") == "Direct message"

    ana.sign_in(base_url(server))
    entry = ana.refresh_rooms("my-rooms", direct)
    assert entry["name"] == "Ben" and entry["kind"] == "direct"
    ana.click_room("my-rooms", direct)
    ana.wait_presence(["Ana", "Ben"])
    ana.send("Just between us: the lobby is busy today")
    ben.wait_message("Ana", "Just between us: the lobby is busy today")
    ben.send("Agreed!")
    ana.wait_message("Ben", "Agreed!")
    # Opening it again from the form finds the same room.
    ana.submit("direct", {"direct-user": "dev-ben"})
    ana.wait(lambda: not ana.find("#direct").get_attribute("open"), "the form to close")
    assert ana.room() == direct
    ana.screenshot(tmp_path, "direct-room")


def test_new_room_with_a_member_both_chat_in_it(server, ana, ben, tmp_path):
    ana.sign_in(base_url(server))
    previous = ana.room()
    ana.submit("new-room", {"new-room-name": "Sleep study", "new-room-members": "dev-ben,"})
    ana.wait(lambda: ana.room() not in {"", previous} and ana.status() == "open", "the new room")
    room = ana.room()
    assert ana.text("#room-title") == "Sleep study"
    assert ana.text("#room-kind") == "Private room"
    ana.wait(lambda: ana.listed("my-rooms", room), "the new room in Ana's list")
    assert not ana.listed("public-rooms", room)
    assert ana.messages() == []

    ben.sign_in(base_url(server))
    entry = ben.refresh_rooms("my-rooms", room)
    assert entry["name"] == "Sleep study" and entry["kind"] == "private"
    ben.click_room("my-rooms", room)
    for page in (ana, ben):
        page.wait_presence(["Ana", "Ben"])
    ben.send("Thanks for the invite! Shall we compare our sleep logs?")
    ana.wait_message("Ben", "Thanks for the invite! Shall we compare our sleep logs?")
    # The open room's entry follows its newest message.
    ana.wait(
        lambda: ana.listed("my-rooms", room)["sub"].startswith("Ben: Thanks for the invite!"),
        "the newest message in the rooms list",
    )
    ana.send("@ai How regular should bedtimes be?")
    for page in (ana, ben):
        page.wait_answer("How regular should bedtimes be")
    ben.type("Within half an hour, I read")
    ana.wait(lambda: ana.text("#typing") == "Ben is typing…", "Ben's typing indicator")
    shot = ana.screenshot(tmp_path, "two-users-chatting")
    ben.screenshot(tmp_path, "two-users-chatting-ben")
    if _truthy("UPDATE_SCREENSHOT"):
        shutil.copyfile(shot, SCREENSHOT)
        print(f"screenshot: {SCREENSHOT}")
    ben.find("#send").click()
    ana.wait_message("Ben", "Within half an hour, I read")


def test_a_non_member_cannot_open_a_private_room_by_its_link(server, cleo, tmp_path):
    room = "ana-and-ben"
    create_room(server, tmp_path, room, "--kind", "private", "--owner", "dev-ana")
    manage(
        [
            "shell",
            "-c",
            "from chat.history import message_store\n"
            f"message_store(room_id={room!r}, user_id='dev-ana', username='Ana',"
            " content='members only', metadata=None, client_message_id=None)\n",
        ],
        env=server[0].env,
        log_path=tmp_path / "insert-private.log",
    )
    cleo.sign_in(base_url(server), f"#room={room}")
    cleo.wait(lambda: "You are not a member of this room" in cleo.text("#alerts"), "the refusal")
    # Back to the list: no room open, nothing of the room shown, no reconnection scheduled.
    cleo.wait(lambda: cleo.find("#no-room").is_displayed(), "the rooms list")
    assert cleo.status() == "closed", cleo.describe()
    assert cleo.room() == "" and cleo.messages() == [] and cleo.presence() == []
    assert "room=" not in cleo.js("return location.hash")
    cleo.wait(lambda: cleo.listed("public-rooms", LOBBY), "the public rooms")
    assert not cleo.listed("my-rooms", room) and not cleo.listed("public-rooms", room)
    # The list answered after the refusal; still the one socket.
    assert cleo.js("return window.clarityTestSockets") == [f"/api/v1/ws/{room}"]
    cleo.screenshot(tmp_path, "refused")

    # The public room still opens from the list.
    cleo.click_room("public-rooms", LOBBY)
    assert "members only" not in cleo.bodies()


def test_health_analysis_of_the_sample_file(server, ana, tmp_path):
    create_room(server, tmp_path, "wellness", "--kind", "public")
    ana.open(base_url(server), "wellness")
    ana.find("#analyze").click()
    ana.wait(
        lambda: (
            ana.js("return document.getElementById('analysis-progress').value") == 100
            and ana.find("#analysis-status").get_attribute("data-status") == "completed"
        ),
        "the analysis to complete",
    )
    ana.wait(lambda: ana.find("#insight").is_displayed(), "the insight")
    assert "summary of your recent activity data" in ana.text("#insight-text")
    metrics = ana.js(
        """return Object.fromEntries([...document.querySelectorAll('#insight-metrics div')]
            .map(d => [d.dataset.metric, d.querySelector('dd').textContent]))"""
    )
    assert metrics["total_sleep_time"].endswith(" h"), metrics
    assert metrics["sleep_efficiency"].endswith("%"), metrics
    # The sample holds a 40-minute awakening: the built-in assistant's rule for it fires.
    recommendations = ana.js(
        "return [...document.querySelectorAll('#insight-recommendations li')]"
        ".map(li => li.textContent)"
    )
    assert any("night waking" in text for text in recommendations), recommendations
    # The narrative's private copy as a chat message is not repeated in the conversation.
    assert ana.messages() == []
    ana.screenshot(tmp_path, "health-analysis")


def test_reconnect_after_a_server_restart_fetches_missed_messages(server, ana, tmp_path):
    room = "relay"
    create_room(server, tmp_path, room, "--kind", "public")
    ana.open(base_url(server), room)
    ana.send("before the restart")
    worker = server[0]
    # Stored while this session cannot see them: written straight to the database, not
    # broadcast. More than the join history holds.
    missed = [f"missed {n}" for n in range(1, JOIN_HISTORY + 4)]
    manage(
        [
            "shell",
            "-c",
            "from chat.history import message_store\n"
            f"for text in {missed!r}:\n"
            f"    message_store(room_id={room!r}, user_id='dev-cleo', username='Cleo',"
            " content=text, metadata=None, client_message_id=None)\n",
        ],
        env=worker.env,
        log_path=tmp_path / "insert-missed.log",
    )
    assert not any(body.startswith("missed") for body in ana.bodies())

    worker.stop()  # SIGTERM: the page gets close 4012 and retries with backoff
    ana.wait(lambda: ana.status() in {"waiting", "connecting"}, "the drop to be noticed")
    restarted = worker_start(
        index=1, port=worker.port, env=worker.env, log_dir=worker.stdout_path.parent
    )
    server[0] = restarted
    restarted.wait_listening(20)
    ana.wait_connected()
    ana.wait(
        lambda: ana.bodies()[-len(missed) - 1 :] == ["before the restart", *missed],
        "every missed message, once each, in order",
    )
    assert len(set(ana.bodies())) == len(ana.bodies())
    ana.screenshot(tmp_path, "after-reconnect")


def test_reconnect_backoff_is_exponential_jittered_and_capped(server, ana):
    """The client's own delay function, run in the browser: each step doubles from 0.5 s up
    to 30 s, and its jitter keeps a delay between half the step and the whole step."""
    ana.sign_in(base_url(server))
    attempts = [0, 1, 2, 3, 5, 6, 7, 12, 40]
    low, high = ana.driver.execute_async_script(
        """const [url, attempts, done] = arguments;
        import(url).then(({ backoffDelay }) => done([
            attempts.map(a => backoffDelay(a, () => 0)),
            attempts.map(a => backoffDelay(a, () => 0.999999)),
        ]));""",
        "/static/chat/connection.js",
        attempts,
    )
    steps = [min(30_000, 500 * 2**attempt) for attempt in attempts]
    assert low == [step / 2 for step in steps]
    assert all(step * 0.99 < delay <= step for step, delay in zip(steps, high, strict=True))
