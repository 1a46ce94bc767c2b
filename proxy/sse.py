"""Server-sent events, parsed as the WHATWG HTML specification says (section 9.2.6).

Lines end with CRLF, LF or CR; a blank line ends an event; `data:` lines join with LF; a line
starting with `:` is a comment; one space after the colon is dropped; a UTF-8 BOM at the start
is skipped. Each event keeps its bytes as received, so a relay passes it on without re-encoding.

One deliberate departure: at a clean end of stream a pending event without its blank line is
still delivered (the specification drops it), because some upstreams end with `data: [DONE]\\n`.

httpx-sse fits httpx's own response objects but decodes every line to text and keeps no raw
bytes, so each relayed event would be re-encoded; it also has no event size limit.
"""

from __future__ import annotations

import re

_LINE_END = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"


class EventTooLarge(Exception):
    """One event grew past the configured size before its blank line arrived."""


class Event:
    __slots__ = ("data", "name", "raw")

    def __init__(self, raw: bytes, data: bytes | None, name: bytes | None) -> None:
        self.raw = raw  # the bytes as received, blank line included
        self.data = data  # the joined `data` field; None when the event had no data line
        self.name = name  # the `event` field, when given


class Parser:
    """Feed bytes as they arrive; get back the events they complete."""

    __slots__ = ("_buf", "_data", "_max", "_name", "_pos", "_skip_lf", "_start")

    def __init__(self, max_event_bytes: int) -> None:
        self._max = max_event_bytes
        self._buf = b""
        self._start = 0  # where the pending event begins in _buf
        self._pos = 0  # where the next unread line begins
        self._data: list[bytes] = []
        self._name: bytes | None = None
        self._skip_lf: bool | None = None  # None until the BOM check ran

    def feed(self, chunk: bytes) -> list[Event]:
        if self._skip_lf is None:
            if len(self._buf) + len(chunk) < len(_BOM) and _BOM.startswith(self._buf + chunk):
                self._buf += chunk  # too short to tell whether a BOM starts the stream
                return []
            chunk = self._buf + chunk
            self._buf = b""
            if chunk.startswith(_BOM):
                chunk = chunk[len(_BOM):]
            self._skip_lf = False
        if self._skip_lf and chunk[:1] == b"\n":
            # the LF of a CRLF whose CR ended the previous chunk
            chunk = chunk[1:]
        self._skip_lf = False
        buf = (self._buf[self._start:] if self._start else self._buf) + chunk
        self._pos -= self._start
        self._start = 0
        self._buf = buf
        events: list[Event] = []
        pos, start, limit = self._pos, 0, self._max
        if b"\r" in buf:  # CR or CRLF line ends: the general (slower) path
            search = _LINE_END.search
            while (end := search(buf, pos)) is not None:
                line = buf[pos:end.start()]
                pos = end.end()
                if pos == len(buf) and end.group() == b"\r":
                    self._skip_lf = True
                if line:
                    self._field(line)
                    continue
                if pos - start > limit:
                    raise EventTooLarge(f"an upstream event exceeds {limit} bytes")
                events.append(self._dispatch(buf[start:pos]))
                start = pos
        else:  # LF only, as nearly every upstream sends
            find = buf.find
            while (nl := find(b"\n", pos)) >= 0:
                if nl != pos:
                    self._field(buf[pos:nl])
                    pos = nl + 1
                    continue
                pos += 1
                if pos - start > limit:
                    raise EventTooLarge(f"an upstream event exceeds {limit} bytes")
                events.append(self._dispatch(buf[start:pos]))
                start = pos
        self._pos, self._start = pos, start
        if len(buf) - start > limit:
            raise EventTooLarge(f"an upstream event exceeds {limit} bytes")
        return events

    def close(self) -> Event | None:
        """The pending event at a clean end of stream, completed with its blank line."""
        rest = self._buf[self._pos:]
        if rest:
            self._field(rest)
        pending = self._buf[self._start:]
        self._buf, self._start, self._pos = b"", 0, 0
        if not pending.strip(b"\r\n"):
            return None
        ending = b"\n" if rest else b""
        return self._dispatch(pending + ending + b"\n")

    def _field(self, line: bytes) -> None:
        if line.startswith(b"data: "):  # the common case first
            self._data.append(line[6:])
            return
        if line[0] == 0x3A:  # ":" starts a comment
            return
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._name = value
        # `id` and `retry` concern the client's reconnection; they are relayed as received

    def _dispatch(self, raw: bytes) -> Event:
        data = self._data
        event = Event(raw, (data[0] if len(data) == 1 else b"\n".join(data)) if data else None,
                      self._name)
        self._data, self._name = [], None
        return event
