"""The Gemini API, mocked at the HTTP boundary only.

google-genai sends through httpx2 (a fork of httpx with its own httpcore2), which respx does
not patch, so HTTPCore2Mocker teaches respx to patch httpcore2's connection pools the way its
built-in "httpcore" mocker patches httpcore's: the SDK, its real httpx2 client and transport
all run, and only the socket-level exchange is replaced by respx routes. Unmatched requests
fail; nothing reaches the network. Fixtures `gemini` (settings) and `gemini_api` (routes)
are in conftest.py.
"""

from __future__ import annotations

import re

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


GENERATE_URL = re.compile(
    r"https://generativelanguage\.googleapis\.com/v1\w*/models/gemini-2\.5-pro:generateContent"
)
VERTEX_URL = re.compile(
    r"https://us-central1-aiplatform\.googleapis\.com/v1\w*/projects/clarity-test/"
    r"locations/us-central1/publishers/google/models/gemini-2\.5-pro:generateContent"
)


def model_says(text: str) -> httpx.Response:
    """A generateContent response whose only candidate says `text`."""
    return httpx.Response(
        200,
        json={
            "candidates": [
                {"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP"}
            ]
        },
    )
