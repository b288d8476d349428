"""The client side of tests against real workers: `ChatSocket`, a thin v1-protocol client over
`websockets` (asyncio API) with a bound on every wait; emulator tokens the workers accept
(`token_for`); and HTTP calls to the workers' API (`http_request`).

To show that a socket received nothing more, without waiting for silence: `barrier()` sends a
heartbeat with a unique `client_timestamp`; frames to one socket arrive in order, so the very
next frame must be the `heartbeat_ack` echoing it (protocol: heartbeats are answered at once,
never rate-limited).

Every payload a ChatSocket sends is first passed to each of `SENT_OBSERVERS` (the test suite's
log scan records them, to recognise them in the workers' logs).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import requests
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from chat.devtokens import emulator_token
from chat.testing.processes import PROJECT_ID

SENT_OBSERVERS: list[Callable[[Any], None]] = []


def token_for(uid: str, name: str | None = None, **kwargs: Any) -> str:
    """An emulator ID token the workers (FIREBASE_PROJECT_ID=PROJECT_ID) accept."""
    name = name if name is not None else uid.title()
    return emulator_token(uid=uid, name=name, project_id=PROJECT_ID, **kwargs)


def heartbeat_probe() -> dict:
    """A heartbeat whose ack can be told from any other: a unique ISO `client_timestamp`."""
    return {"type": "heartbeat", "client_timestamp": datetime.now(UTC).isoformat()}


def presence_of(frame_or_body: dict) -> list[tuple[str, int]]:
    """(user id, connection count) of a presence frame or a room's users from the API."""
    return [(user["user_id"], user["connection_count"]) for user in frame_or_body["users"]]


def http_session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # loopback only: never through a proxy from the environment
    return session


async def http_request(
    method: str,
    url: str,
    *,
    token: str | None = None,
    raw_auth: str | None = None,
    body: Any = None,
    timeout: float = 10.0,
) -> requests.Response:
    """One HTTP call (in a thread), with `Authorization: Bearer <token>` or `raw_auth`."""
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if raw_auth is not None:
        headers["Authorization"] = raw_auth
    with http_session() as session:
        return await asyncio.to_thread(
            session.request, method, url, headers=headers, json=body, timeout=timeout
        )


class ChatSocket:
    """One real WebSocket speaking the v1 protocol; every wait is bounded."""

    def __init__(self, connection: ClientConnection):
        self.connection = connection
        self.ack: dict | None = None
        self.presence: dict | None = None
        self.history: dict | None = None

    @classmethod
    async def open(
        cls,
        base_url: str,
        path: str,
        *,
        token: str | None = None,
        timeout: float = 5.0,
        **kwargs: Any,
    ) -> ChatSocket:
        url = base_url + path + (f"?token={token}" if token is not None else "")
        connection = await connect(url, open_timeout=timeout, close_timeout=2, proxy=None, **kwargs)
        return cls(connection)

    @classmethod
    async def join(
        cls,
        base_url: str,
        room: str,
        uid: str,
        name: str | None = None,
        *,
        path: str = "",
        **kwargs: Any,
    ) -> ChatSocket:
        """Open with a valid token and read the join frames: ack, presence, history. `kwargs`
        go to `websockets`' `connect`, as with `open`."""
        client = await cls.open(
            base_url, path or f"/api/v1/ws/{room}", token=token_for(uid, name), **kwargs
        )
        try:
            client.ack = await client.expect("connection_ack")
            client.presence = await client.expect("presence")
            client.history = await client.expect("history")
        except BaseException:
            await client.close()
            raise
        return client

    async def recv(self, timeout: float = 3.0) -> dict:
        message = await asyncio.wait_for(self.connection.recv(), timeout)
        assert isinstance(message, str), f"binary frame from the server: {message!r}"
        return json.loads(message)

    async def expect(self, type_: str, timeout: float = 3.0) -> dict:
        """The very next frame, which must be of this type."""
        frame = await self.recv(timeout)
        assert frame["type"] == type_, f"expected {type_}, got {frame}"
        return frame

    async def recv_type(self, type_: str, timeout: float = 3.0) -> dict:
        """The next frame of this type; frames of other types before it are skipped."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            frame = await self.recv(max(deadline - loop.time(), 0.01))
            if frame["type"] == type_:
                return frame

    async def expect_error(self, code: str, timeout: float = 3.0) -> dict:
        frame = await self.expect("error", timeout)
        assert frame["error_code"] == code, frame
        return frame

    async def expect_close(self, code: int, timeout: float = 3.0) -> ConnectionClosed:
        """The server closes next (no further frame) with this code."""
        try:
            frame = await self.recv(timeout)
        except ConnectionClosed as closed:
            assert closed.rcvd is not None, f"no close frame received: {closed!r}"
            assert closed.rcvd.code == code, f"close code {closed.rcvd.code}, expected {code}"
            return closed
        raise AssertionError(f"expected close {code}, got frame {frame}")

    async def barrier(self, timeout: float = 3.0) -> None:
        """Nothing has arrived that was not read: the answer to a heartbeat sent now is the
        very next frame."""
        probe = heartbeat_probe()
        await self.send(probe)
        ack = await self.expect("heartbeat_ack", timeout)
        assert ack["client_timestamp"] == probe["client_timestamp"], (probe, ack)

    async def send(self, payload: Any) -> None:
        await self.send_raw(json.dumps(payload), observed=payload)

    async def send_raw(self, data: str | bytes, *, observed: Any = None) -> None:
        """Send one frame as it is; the observers see `observed` (default: the frame)."""
        for observe in SENT_OBSERVERS:
            observe(data if observed is None else observed)
        await asyncio.wait_for(self.connection.send(data), 3)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.connection.close(), 5)
