"""The Gemini API, mocked at the HTTP boundary only: respx routes answer every request.

In this process (a `GeminiProvider` called by a test): google-genai sends through httpx2 (a
fork of httpx with its own httpcore2), which respx does not patch, so HTTPCore2Mocker
teaches respx to patch httpcore2's connection pools the way its built-in "httpcore" mocker
patches httpcore's: the SDK, its real httpx2 client and transport all run, and only the
socket-level exchange is replaced by respx routes.

From the worker's provider process (chat/assistant/process.py: what sockets' questions go
to): `GeminiServer`, a real HTTP server on the test's event loop at GEMINI_BASE_URL,
answers each request with the same routes and streams the body chunked as it is produced
(delays and dropped connections included). Unmatched requests fail (404 from the server);
nothing reaches the network. Fixtures `gemini` (settings) and `api` (routes, server) are in
conftest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpcore2
import httpx
from respx import MockRouter
from respx.mocks import HTTPCoreMocker


class HTTPCore2Mocker(HTTPCoreMocker):
    """respx's httpcore mocker, aimed at httpcore2 (used as `respx.mock(using="httpcore2")`)."""

    name = "httpcore2"
    targets = [
        "httpcore2._async.connection.AsyncHTTPConnection",
        "httpcore2._async.connection_pool.AsyncConnectionPool",
        "httpcore2._async.http_proxy.AsyncHTTPProxy",
    ]

    @classmethod
    def from_sync_httpx_response(cls, httpx_response, target, **kwargs):
        return httpcore2.Response(
            status=httpx_response.status_code,
            headers=httpx_response.headers.raw,
            content=httpx_response.stream,
            extensions=httpx_response.extensions,
        )


# The SDK's streaming call (generate_content_stream): server-sent events, one JSON
# GenerateContentResponse per `data:` line. Google's host, or GEMINI_BASE_URL's.
GENERATE_URL = re.compile(
    r"(https://generativelanguage\.googleapis\.com|http://127\.0\.0\.1:\d+)"
    r"/v1\w*/models/gemini-2\.5-pro:streamGenerateContent\?alt=sse"
)
VERTEX_URL = re.compile(
    r"https://us-central1-aiplatform\.googleapis\.com/v1\w*/projects/clarity-test/"
    r"locations/us-central1/publishers/google/models/gemini-2\.5-pro"
    r":streamGenerateContent\?alt=sse"
)


def chunk(text: str | None = None, *, finish: str | None = None, **extra: Any) -> dict:
    """One streamed GenerateContentResponse: a candidate saying `text` (none if None),
    ending with `finish` if given."""
    candidate: dict[str, Any] = {}
    if text is not None:
        candidate["content"] = {"role": "model", "parts": [{"text": text}]}
    if finish is not None:
        candidate["finishReason"] = finish
    return {"candidates": [candidate], **extra} if candidate else extra


def model_streams(
    chunks: Sequence[dict],
    *,
    delays: Sequence[float] = (),
    broken_after: int | None = None,
) -> httpx.Response:
    """A streamed answer: `chunks` as server-sent events, the i-th sent after `delays[i]`
    seconds (0 if not given); with `broken_after`, the connection drops after that many."""

    return httpx.Response(
        200,
        headers={"content-type": "text/event-stream"},
        content=_Events(chunks=chunks, delays=delays, broken_after=broken_after),
    )


class _Events:
    """The body of a streamed answer; iterable again for each request a route answers."""

    def __init__(
        self, *, chunks: Sequence[dict], delays: Sequence[float], broken_after: int | None
    ) -> None:
        self.chunks, self.delays, self.broken_after = list(chunks), list(delays), broken_after

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for index, item in enumerate(self.chunks):
            if self.broken_after is not None and index == self.broken_after:
                raise httpcore2.ReadError("connection reset by the model's server")
            if index < len(self.delays) and self.delays[index] > 0:
                await asyncio.sleep(self.delays[index])
            yield f"data: {json.dumps(item)}\r\n\r\n".encode()


def model_says(text: str) -> httpx.Response:
    """A streamed answer whose only chunk says all of `text`."""
    return model_streams([chunk(text, finish="STOP")])


def model_writes(text: str, *, pieces: int = 4, delay: float = 0.0) -> httpx.Response:
    """A streamed answer saying `text` in `pieces` chunks, `delay` seconds apart."""
    size = -(-len(text) // pieces)
    parts = [text[i : i + size] for i in range(0, len(text), size)]
    return model_streams(
        [chunk(part) for part in parts[:-1]] + [chunk(parts[-1], finish="STOP")],
        delays=[delay] * len(parts),
    )


class GeminiServer:
    """The routes of `router` over real HTTP on 127.0.0.1 (on the running event loop): one
    request per connection, the response body sent chunked as its stream yields it; an
    error raised by the stream ends the connection with the body unfinished."""

    def __init__(self, router: MockRouter) -> None:
        self.router = router
        self.server: asyncio.Server | None = None
        self.url = ""
        self.writers: set[asyncio.StreamWriter] = set()
        # Responses the client hung up on before their end (a stream cut short).
        self.dropped = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.connection, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        for writer in list(self.writers):
            writer.transport.abort()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = [tuple(line.split(": ", 1)) for line in lines[1:] if ": " in line]
            length = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
            body = await reader.readexactly(length)
            request = httpx.Request(method, self.url + target, headers=headers, content=body)
            try:
                response = await self.router.async_handler(request)
            except Exception as exc:  # unmatched: respx's "not mocked"
                response = httpx.Response(404, text=f"{type(exc).__name__}: {exc}")
            await self.respond(writer, response)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    async def respond(self, writer: asyncio.StreamWriter, response: httpx.Response) -> None:
        skip = {"content-length", "transfer-encoding", "connection"}
        head = [f"HTTP/1.1 {response.status_code} {http.HTTPStatus(response.status_code).phrase}"]
        head += [f"{k}: {v}" for k, v in response.headers.items() if k.lower() not in skip]
        head += ["transfer-encoding: chunked", "connection: close", "", ""]
        writer.write("\r\n".join(head).encode("latin-1"))
        try:
            async for data in response.aiter_raw():
                if data:
                    writer.write(b"%x\r\n%s\r\n" % (len(data), data))
                    await writer.drain()
        except (httpcore2.ReadError, httpx.ReadError):
            return  # closed (what was sent is flushed) with the body unfinished
        except ConnectionError:
            self.dropped += 1
            return
        writer.write(b"0\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
