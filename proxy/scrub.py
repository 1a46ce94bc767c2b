"""Provider credentials out of everything euroute relays to a client.

An upstream may echo euroute's `Authorization` header (in an answer, an error message, a stream
event); the app must never see euroute's provider key. `Scrubber` replaces every configured key,
in the forms JSON may give it, in the bytes that go back. Keys shorter than 8 characters are not
real provider keys and would blank out ordinary text, so they are left alone.

A stream spreads its texts (`content`, `reasoning_content`, and each tool call's
`function.arguments`, by its `index`) over many events and the client joins them, so a key cut
across events (`"... sk-ab"`, then `"c123 ..."`) passes a scrub of each event on its own.
`TextScrub` follows each text of one stream across its events:

- a text that ends in the first HOLD or more characters of a key keeps them back and puts them
  before its next piece; a key found in the joined text becomes the mark;
- a text that ends in fewer goes on as it is, and its next piece is checked against that end: a
  key completed there is marked from where the client's copy stops, so at most HOLD - 1 of its
  characters ever reach the client;
- what is still held when the stream ends or fails is a key cut short, and goes out as the mark.

Texts are scrubbed as the client reads them, decoded, so no JSON escape hides a key. Nearly
every event's texts hold no part of a key: such an event goes on as it came, not re-encoded.

Whole keys are looked for in the bytes that go out, in any field: as written, JSON-escaped, and
spelt with JSON's `\\u00XX` (or `\\/`) escapes for any of their characters, which a client
decodes back into the key. Bytes with such an escape are searched decoded that far; only when
a key is found there do they go out so, with the mark (still the same JSON: only printable
characters other than `"` and `\\` are decoded).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import orjson

from proxy.errors import EurouteError

MARK = "[redacted]"
HOLD = 4  # the shortest start of a key held back; a shorter one may reach the client
_TEXTS = ("content", "reasoning_content")
_NOTHING = ("", 0)
# An escaped backslash (kept, so that what follows it is not read as an escape), `\/`, or a
# printable ASCII character as `\u00XX`.
_ESCAPE = re.compile(rb"\\(?:u00([2-7][0-9a-fA-F])|[/\\])")


def _decoded(match: re.Match[bytes]) -> bytes:
    code = match.group(1)
    if code is None:
        return b"/" if match.group() == b"\\/" else match.group()
    char = int(code, 16)
    return match.group() if char in (0x22, 0x5C) else bytes((char,))


class Scrubber:
    """Replaces every configured provider credential in what goes back to a client."""

    __slots__ = ("_firsts", "_secrets", "keys")
    MARK = MARK.encode()

    def __init__(self, secrets: Iterable[str | None]) -> None:
        self.keys = tuple(sorted({s for s in secrets if s and len(s) >= 8}, key=len, reverse=True))
        self._firsts = tuple((key, key[0], 1 - len(key)) for key in self.keys)
        # Each key as is and JSON-escaped, longest first.
        forms = {f for k in self.keys for f in (k.encode(), orjson.dumps(k)[1:-1])}
        self._secrets = tuple(sorted(forms, key=len, reverse=True))

    def __call__(self, raw: bytes) -> bytes:
        raw = self._replaced(raw)
        if self._secrets and b"\\" in raw and _ESCAPE.search(raw) is not None:
            decoded = _ESCAPE.sub(_decoded, raw)
            marked = self._replaced(decoded)
            if marked is not decoded:
                return marked
        return raw

    def _replaced(self, raw: bytes) -> bytes:
        for secret in self._secrets:
            if secret in raw:
                raw = raw.replace(secret, self.MARK)
        return raw

    def text(self, value: str | None) -> str | None:
        if value is None or not self.keys:
            return value
        return self(value.encode()).decode()

    def error(self, exc: EurouteError) -> None:
        """An upstream's error, as relayed and recorded (its code becomes the outcome)."""
        exc.message = self.text(exc.message) or ""
        exc.param, exc.code = self.text(exc.param), self.text(exc.code)

    def stream(self) -> TextScrub:
        return TextScrub(self)

    def touches(self, text: str) -> bool:
        """Whether `text` may hold a key, or end in the start of one (cheap, and nearly always
        false)."""
        for key, first, tail in self._firsts:
            if first in text[tail:] or key in text:
                return True
        return False

    def opened(self, text: str) -> int:
        """The length of the longest end of `text` that begins a key (and is not all of it)."""
        longest = 0
        for key in self.keys:
            start = text.find(key[0], max(0, len(text) - len(key) + 1))
            while 0 <= start < len(text) - longest:
                if key.startswith(text[start:]):
                    longest = len(text) - start
                    break
                start = text.find(key[0], start + 1)
        return longest


class TextScrub:
    """The texts of one stream's chat chunks, followed across its events (see the module
    docstring)."""

    __slots__ = ("_head", "_open", "_scrubber")

    def __init__(self, scrubber: Scrubber) -> None:
        self._scrubber = scrubber
        # (choice index, field or tool-call index) -> (the end of that text that begins a key,
        # how much of it the client has); only texts that end so are here, so an empty dict is
        # the common case.
        self._open: dict[tuple[int, str | int], tuple[str, int]] = {}
        self._head: dict[str, Any] = {}  # the last chunk that left a text open

    def chunk(self, chunk: dict[str, Any]) -> bool:
        """Scrubs the chunk's texts in place; whether it changed them."""
        choices = chunk.get("choices")  # a list of objects, or None (dialect.check_choices)
        if not choices:
            return False
        touches = self._scrubber.touches
        changed = False
        for choice in choices:
            delta = choice.get("delta")
            if type(delta) is not dict:
                continue
            for field in _TEXTS:
                text = delta.get(field)
                if type(text) is str and text and (self._open or touches(text)):
                    changed |= self._put(choice, field, delta, field)
            calls = delta.get("tool_calls")
            if type(calls) is not list:
                continue
            for call in calls:
                # A call without an index is a call of its own to every surface: nothing to join.
                function = call.get("function") if type(call) is dict else None
                text = function.get("arguments") if type(function) is dict else None
                if (type(text) is str and text and (self._open or touches(text))
                        and type(call.get("index")) is int):
                    changed |= self._put(choice, call["index"], function, "arguments")
        if self._open:
            self._head = chunk
        return changed

    def _put(self, choice: dict[str, Any], part: str | int, holder: dict[str, Any],
             name: str) -> bool:
        """Scrubs `holder[name]`, a piece of the choice's text `part`; whether it changed."""
        index = choice.get("index")
        text = holder[name]
        out = self._piece((index if type(index) is int else 0, part), text)
        if out == text:
            return False
        holder[name] = out
        return True

    def _piece(self, slot: tuple[int, str | int], text: str) -> str:
        """What the client gets of this piece of a text."""
        scrubber = self._scrubber
        tail, sent = self._open.pop(slot, _NOTHING) if self._open else _NOTHING
        joined = tail + text  # its first `sent` characters are the client's already
        for key in scrubber.keys:
            if (at := joined.find(key)) >= 0:
                if at < sent:
                    joined = joined[:sent] + MARK + joined[at + len(key):]
                joined = joined.replace(key, MARK)
        n = scrubber.opened(joined)
        end = len(joined) if n < HOLD else max(sent, len(joined) - n)
        if n:
            self._open[slot] = (joined[-n:], max(0, end - len(joined) + n))
        return joined[sent:end]

    def flush(self) -> dict[str, Any] | None:
        """At the end of the stream: a chunk with the mark for each text whose end is held back;
        None when none is."""
        held: dict[int, dict[str, Any]] = {}
        for (index, part), (tail, sent) in self._open.items():
            if sent >= len(tail):
                continue
            delta = held.setdefault(index, {})
            if type(part) is str:
                delta[part] = MARK
            else:
                delta.setdefault("tool_calls", []).append(
                    {"index": part, "function": {"arguments": MARK}})
        self._open.clear()
        if not held:
            return None
        head = self._head
        return {"id": head.get("id"), "object": "chat.completion.chunk",
                "created": head.get("created"), "model": head.get("model"),
                "choices": [{"index": i, "delta": d, "finish_reason": None}
                            for i, d in held.items()]}
