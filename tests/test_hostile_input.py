"""Hostile input, property-based: thousands of malformed frames thrown at the real consumer.

Every frame generated here is bad by construction, and each kind knows the error code it must
get. Asserted for every batch: no exception escapes the consumer (the communicator would
re-raise it), the socket is never closed (so never 1011), each bad frame gets exactly one
typed `error` frame with the expected code, and afterwards the socket still delivers a valid
chat message.
"""

from __future__ import annotations

import json

import pytest
from asgiref.sync import async_to_sync
from django.test import override_settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import NO_BUDGETS, join

pytestmark = pytest.mark.django_db(transaction=True)

KNOWN_TYPES = ["message", "typing", "heartbeat", "history", "auth", "health_insight"]
MAX_SIZE = 65536

# (frame to send: str or bytes, expected error code)
Bad = tuple[str | bytes, str]


def _not_json(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return True
    return False


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def dumps(value) -> str:
    return json.dumps(value)


invalid_json: st.SearchStrategy[Bad] = st.one_of(
    st.text(min_size=1, max_size=200).filter(_not_json),
    st.sampled_from(['{"type": NaN}', '{"type": "message", "content": Infinity}', "-Infinity"]),
    st.integers(min_value=1, max_value=5).map(lambda n: "1" + "0" * (4300 * n)),  # huge int
    # nesting deep enough for RecursionError in the parser, still under the size limit
    st.integers(min_value=20_000, max_value=32_000).map(lambda n: "[" * n + "]" * n),
    st.integers(min_value=7_000, max_value=8_000).map(lambda n: '{"a":' * n + "1" + "}" * n),
    st.just(""),  # empty frame
    st.sampled_from(['{"type": "message"', "{'type': 'message'}", "\x00", "1e999"]),
).map(lambda text: (text, "INVALID_JSON"))

non_objects: st.SearchStrategy[Bad] = st.one_of(st.lists(json_values, max_size=5), scalars).map(
    lambda value: (dumps(value), "MESSAGE_PARSE_ERROR")
)

unknown_types: st.SearchStrategy[Bad] = st.one_of(
    st.text(max_size=30).filter(lambda t: t not in KNOWN_TYPES),
    st.integers(),
    st.none(),
    st.lists(st.integers(), max_size=3),
    st.just("error"),
    st.just("connection_ack"),
    st.just("health_data"),  # a health-socket type on the chat socket
).map(lambda type_: (dumps({"type": type_, "content": "hi"}), "UNKNOWN_MESSAGE_TYPE"))

not_a_string = st.one_of(st.integers(), st.booleans(), st.lists(scalars, max_size=3), st.none())
not_a_bool = st.one_of(
    st.integers(), st.text(max_size=5), st.none(), st.floats(allow_nan=False, allow_infinity=False)
)

wrong_fields: st.SearchStrategy[Bad] = st.one_of(
    not_a_string.filter(lambda v: v is not None).map(lambda v: {"type": "message", "content": v}),
    st.just({"type": "message"}),
    st.text(alphabet=" \t\n\r", max_size=10).map(lambda ws: {"type": "message", "content": ws}),
    st.integers(min_value=2001, max_value=5000).map(
        lambda n: {"type": "message", "content": "x" * n}
    ),
    st.text(min_size=1, max_size=10).map(lambda t: {"type": "message", "content": t + "\x00"}),
    json_values.filter(lambda v: not isinstance(v, dict) and v is not None).map(
        lambda v: {"type": "message", "content": "ok", "metadata": v}
    ),
    not_a_bool.map(lambda v: {"type": "typing", "is_typing": v}),
    st.one_of(st.integers(), st.lists(scalars, max_size=2)).map(
        lambda v: {"type": "heartbeat", "client_timestamp": v}
    ),
    st.one_of(st.integers(max_value=0), st.integers(min_value=101)).map(
        lambda n: {"type": "history", "limit": n}
    ),
    st.just({"type": "history", "before": 5, "after": 1}),
    st.one_of(st.just(""), st.integers(), st.none()).map(lambda v: {"type": "auth", "token": v}),
    st.one_of(st.lists(scalars, max_size=3), st.text(max_size=5), st.integers()).map(
        lambda v: {"type": "health_insight", "content": v}
    ),
).map(lambda payload: (dumps(payload), "MESSAGE_PARSE_ERROR"))

# A lone surrogate can only arrive as a JSON escape (the socket's text is valid UTF-8).
lone_surrogates: st.SearchStrategy[Bad] = st.sampled_from(["\\ud800", "\\udfff", "a\\ud83d"]).map(
    lambda escape: ('{"type": "message", "content": "' + escape + '"}', "MESSAGE_PARSE_ERROR")
)

# Ids that are valid strings (no NUL/control characters or lone surrogates: those are parse
# errors before the identity check).
storable_ids = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=20
)
spoofing: st.SearchStrategy[Bad] = storable_ids.filter(
    lambda uid: uid.strip() and uid.strip() != "alice"
).map(
    lambda uid: (
        dumps({"type": "message", "content": "hi", "user_id": uid}),
        "USER_ID_MISMATCH",
    )
)

binary: st.SearchStrategy[Bad] = st.binary(min_size=1, max_size=64).map(
    lambda data: (data, "UNSUPPORTED_FRAME")
)

oversize: st.SearchStrategy[Bad] = st.integers(min_value=MAX_SIZE + 1, max_value=MAX_SIZE * 2).map(
    lambda n: (dumps({"type": "message", "content": "x", "pad": "y" * n}), "MESSAGE_TOO_LARGE")
)

bad_frames = st.one_of(
    invalid_json,
    non_objects,
    unknown_types,
    wrong_fields,
    lone_surrogates,
    spoofing,
    binary,
    oversize,
)


async def throw(frames: list[Bad]) -> None:
    client = await join("hostile", "alice")
    try:
        for data, expected in frames:
            if isinstance(data, bytes):
                await client.send_bytes(data)
            else:
                await client.send_text(data)
            error = await client.recv(timeout=5)
            assert error["type"] == "error", (data[:200], error)
            assert error["error_code"] == expected, (data[:200], error)
        await client.expect_nothing_pending()  # exactly one error per frame
        await client.send({"type": "message", "content": "still fine"})
        delivered = await client.recv(timeout=5)
        assert delivered["type"] == "message" and delivered["content"] == "still fine"
    finally:
        await client.close()


@override_settings(**NO_BUDGETS)
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(frames=st.lists(bad_frames, min_size=20, max_size=60))
def test_malformed_frames_get_one_typed_error_each_and_the_socket_survives(frames):
    async_to_sync(throw)(frames)
