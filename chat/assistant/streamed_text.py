"""The text of a reply while the model is still writing it (protocol §14).

`JsonNarrative` reads the `narrative` string out of a JSON answer arriving in pieces, escapes
split across pieces included, so only plain text is ever streamed, never the model's JSON.

`StreamText` turns the narrative as written into what may be shown now: the same sanitising
as the stored reply (prompts.sanitize_text) applied to the part that can no longer change —
a tag, comment or script not yet closed, and trailing whitespace, wait for what follows — and
the same REPLY_MAX_CHARS cap. What it releases is always a prefix of the stored text, so the
deltas of a reply that succeeds add up to exactly its stored content.
"""

from __future__ import annotations

import re

from chat.assistant.base import REPLY_MAX_CHARS
from chat.assistant.prompts import TRUNCATED, strip_blocks, tidy_text

# sanitize_text cuts an over-long text at a word boundary up to 40 characters before the
# limit, then strips: nothing past this point is shown until the whole text is known.
_CUT_MARGIN = 48
# The start of what sanitize_text may still remove or change, once more text arrives.
_OPEN_SCRIPT = re.compile(r"<(script|style)\b", re.IGNORECASE)
_OPEN_TAG = re.compile(r"<(?:/?[A-Za-z][^<>]*|/|!-?-?)?\Z")


def _blocks_settled(raw: str) -> int:
    """The end of the part of `raw` in which no comment, script or style is still open."""
    end = len(raw)
    comment = raw.rfind("<!--")
    if comment >= 0 and raw.find("-->", comment + 4) < 0:
        end = comment
    for opened in _OPEN_SCRIPT.finditer(raw, 0, end):
        closing = re.compile(rf"</{opened.group(1)}\s*>", re.IGNORECASE)
        if not closing.search(raw, opened.end()):
            end = opened.start()
            break
    return end


def _showable(raw: str) -> str:
    """The sanitised text of the part of `raw` that more text cannot change: blocks still
    open wait, and so does a tag still open once the closed blocks are out (their removal
    can join a `<` before them to a `>` after them)."""
    stripped = strip_blocks(raw[: _blocks_settled(raw)])
    # A tag start just before a held-back one waits too ("<b<": the second may begin a
    # script whose removal joins the first to a later ">").
    while (tail := _OPEN_TAG.search(stripped)) is not None:
        stripped = stripped[: tail.start()]
    return tidy_text(stripped, max_chars=len(stripped) + 1).rstrip()


class StreamText:
    """The narrative fed piece by piece; `take()` the newly showable text."""

    def __init__(self, *, max_chars: int = REPLY_MAX_CHARS) -> None:
        self.max_chars = max_chars
        self._pieces: list[str] = []
        self._raw = ""
        self.sent = ""

    def feed(self, piece: str) -> None:
        if piece:
            self._pieces.append(piece)

    def _text(self) -> str:
        if self._pieces:
            self._raw += "".join(self._pieces)
            self._pieces.clear()
        return self._raw

    def take(self) -> str:
        """What may be shown now beyond what was taken before ("" if nothing)."""
        limit = self.max_chars - len(TRUNCATED) - _CUT_MARGIN
        if len(self.sent) >= limit:
            return ""  # all a message may show before its end is known is shown
        raw = self._text()
        shown = _showable(raw)[:limit]
        if len(shown) <= len(self.sent) or not shown.startswith(self.sent):
            return ""
        new, self.sent = shown[len(self.sent) :], shown
        return new

    def rest(self, final: str) -> str:
        """What completes the shown text into `final` (the stored text), or "" if the shown
        text is not a prefix of it: the stored message replaces the stream either way."""
        return final[len(self.sent) :] if final.startswith(self.sent) else ""


_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


class JsonNarrative:
    """The decoded `narrative` string of a top-level JSON object, as its pieces arrive.

    Anything before the object's `{` (a code fence) is skipped; a value that is not a string
    yields nothing. An answer that does not start like JSON is passed through as text (the
    stored reply then takes it as the narrative, as prompts.parse_reply does)."""

    def __init__(self, *, field: str = "narrative") -> None:
        self.field = field
        self._mode = "start"  # start, fence, json, text
        self._depth = 0
        self._in_string = False
        self._escape = ""  # a backslash sequence not complete yet ("\\", "\\u12", ...)
        self._string: list[str] = []  # the key being read, at depth 1
        self._is_key = True  # the next string at depth 1 is a key
        self._last_key = ""
        self._capturing = False  # inside the narrative's value
        self._done = False
        self._high = ""  # a high surrogate waiting for its low half

    def feed(self, piece: str) -> str:
        out: list[str] = []
        for char in piece:
            if self._mode == "start":
                if char.isspace():
                    continue
                if char == "`":
                    self._mode = "fence"
                    continue
                self._mode = "json" if char == "{" else "text"
            elif self._mode == "fence":
                if char == "{":
                    self._mode = "json"
                else:
                    continue
            if self._mode == "text":
                out.append(char)
            else:
                self._json_char(char, out)
        return "".join(out)

    def _json_char(self, char: str, out: list[str]) -> None:
        if self._done:
            return
        if not self._in_string:
            if char == '"':
                self._in_string = True
                self._capturing = (
                    self._depth == 1 and not self._is_key and self._last_key == self.field
                )
                self._string.clear()
            elif char in "{[":
                self._depth += 1
                if self._depth == 1:
                    self._is_key = True
            elif char in "}]":
                self._depth -= 1
            elif char == ":" and self._depth == 1:
                self._is_key = False
            elif char == "," and self._depth == 1:
                self._is_key = True
            return
        if self._escape:
            self._escape += char
            decoded = self._decode_escape()
            if decoded is not None:
                self._escape = ""
                self._string_char(decoded, out)
            return
        if char == "\\":
            self._escape = "\\"
        elif char == '"':
            self._in_string = False
            if self._depth == 1 and self._is_key:
                self._last_key = "".join(self._string)
            elif self._capturing:
                self._capturing = False
                self._done = True
        else:
            self._string_char(char, out)

    def _decode_escape(self) -> str | None:
        """The escape's character once complete, else None ("" for an invalid one)."""
        kind = self._escape[1]
        if kind != "u":
            return _ESCAPES.get(kind, "")
        if len(self._escape) < 6:
            return None
        try:
            return chr(int(self._escape[2:], 16))
        except ValueError:
            return ""

    def _string_char(self, char: str, out: list[str]) -> None:
        if self._depth == 1 and self._is_key:
            self._string.append(char)
            return
        if not self._capturing:
            return
        if "\ud800" <= char <= "\udbff":
            self._high = char
            return
        if self._high:
            high, self._high = self._high, ""
            if "\udc00" <= char <= "\udfff":
                char = chr(0x10000 + ((ord(high) - 0xD800) << 10) + (ord(char) - 0xDC00))
        out.append(char)
