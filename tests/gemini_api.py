"""The Gemini API, mocked at the HTTP boundary only.

google-genai sends through httpx2 (a fork of httpx with its own httpcore2), which respx does
not patch, so HTTPCore2Mocker teaches respx to patch httpcore2's connection pools the way its
built-in "httpcore" mocker patches httpcore's: the SDK, its real httpx2 client and transport
all run, and only the socket-level exchange is replaced by respx routes. Unmatched requests
fail; nothing reaches the network. Fixtures `gemini` (settings) and `gemini_api` (routes)
are in conftest.py.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpcore2
import httpx
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
# GenerateContentResponse per `data:` line.
GENERATE_URL = re.compile(
    r"https://generativelanguage\.googleapis\.com/v1\w*/models/gemini-2\.5-pro"
    r":streamGenerateContent\?alt=sse"
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
