"""The inbound APIs, one module each: chat (OpenAI chat completions), responses (OpenAI
Responses), messages (Anthropic Messages).

A surface parses its request into the internal chat request (OpenAI's chat request, rebuilt by
proxy/dialect.py) and renders the internal answer (a chat completion, or a stream of chat
chunks, with the thinking in `reasoning_content`) and euroute's errors in its own shape. The
gateway runs the same pipeline for every surface. Each module has:

    PATH                        where it is served (POST)
    ENDPOINT                    the endpoint name the ledger records
    parse(data, headers)        an Exchange for one request (raises BadRequest)
    error(exc)                  the body of an error, in the surface's shape

and each Exchange has `request` (the internal request), `answer(completion) -> bytes` and
`stream() -> Stream`, whose `feed(chunk)`, `close()` and `fail(exc)` return the bytes to send.
Adding a surface is one module here, named in proxy/gateway.py's SURFACES.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

import orjson

from proxy import dialect
from proxy.errors import EurouteError, UpstreamUnavailable
from proxy.scrub import Scrubber


class Stream(Protocol):
    passthrough: bool  # events already in the surface's shape may go on as they came

    def feed(self, chunk: dict[str, Any]) -> bytes: ...
    def close(self) -> bytes: ...
    def fail(self, exc: EurouteError) -> bytes: ...


class Exchange(Protocol):
    request: dict[str, Any]
    passthrough: bool  # an answer already in the internal shape may go on as it came

    def answer(self, completion: dict[str, Any]) -> bytes: ...
    def stream(self) -> Stream: ...


class SSEEvent(Protocol):
    raw: bytes  # the event as it came, framing included
    data: bytes | None  # None for a comment


class Relay:
    """An upstream's SSE events through its dialect (folded into internal chunks) and the
    surface's stream (rendered in the client's API); keeps the usage the ledger records.

    Provider keys are scrubbed from the bytes that go out, and from the texts across events
    (proxy/scrub.py): a chunk that passes as it came passes only when its texts need nothing."""

    __slots__ = ("done", "events", "fold", "scrub", "stream", "texts", "usage")

    def __init__(self, stream: Stream, fold: Callable[[dict[str, Any]], dict[str, Any]],
                 scrub: Scrubber) -> None:
        self.stream, self.fold, self.scrub = stream, fold, scrub
        self.texts = scrub.stream()
        self.usage: tuple[int, int] | None = None
        self.done = False
        self.events = 0

    def relay(self, events: Iterable[SSEEvent]) -> bytes:
        """The bytes to send for these events; raises on an event that is not a chunk."""
        out = []
        for event in events:
            if self.done:
                break  # nothing follows [DONE]
            data = event.data
            if data is None:  # comments and keep-alives pass as they came
                out.append(event.raw)
                continue
            self.events += 1
            if data == b"[DONE]":
                self.done = True
                out.append(self._flush() + self.stream.close())
            else:
                out.append(self._event(_chunk(data), event.raw))
        return self.scrub(b"".join(out))

    def _event(self, chunk: dict[str, Any], raw: bytes) -> bytes:
        if (self.stream.passthrough and chunk.get("usage") is None
                and not needs_fold(chunk, "delta")):
            # In the surface's shape already: as it came, unless its texts are scrubbed.
            return self.stream.feed(chunk) if self.texts.chunk(chunk) else raw
        if (usage := dialect.usage_of(chunk)) is not None:
            self.usage = usage
        chunk = self.fold(chunk)
        self.texts.chunk(chunk)
        return self.stream.feed(chunk)

    def _flush(self) -> bytes:
        held = self.texts.flush()
        return b"" if held is None else self.stream.feed(held)

    def fail(self, exc: EurouteError) -> bytes:
        """What ends a stream cut short: its status has gone out, so the surface's error event."""
        return self.scrub(self._flush() + self.stream.fail(exc))


def needs_fold(answer: dict[str, Any], key: str) -> bool:
    """Whether a dialect has to fold an answer (`key` "message") or chunk ("delta"): a content
    chunk list or vLLM's `reasoning` field. Without either it is in the internal shape already,
    and the chat surface relays its bytes as they came. Read from the parsed JSON, so that
    escaped field names (`"re\\u0061soning"`) are what they mean."""
    for choice in answer.get("choices") or ():
        part = choice.get(key)
        if isinstance(part, dict) and ("reasoning" in part or isinstance(part.get("content"), list)):
            return True
    return False


def _chunk(data: bytes) -> dict[str, Any]:
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise UpstreamUnavailable("upstream sent a stream event that is not JSON",
                                  code="upstream_error") from None
    if not isinstance(chunk, dict):
        raise UpstreamUnavailable("upstream sent a stream event that is not a chunk",
                                  code="upstream_error")
    return dialect.check_choices(chunk)


class ChunkStream:
    """A stream rendered from chat chunks: keeps usage and the finish reason, and hands the
    pieces of each delta on in order (thinking, text, tool calls) to the subclass."""

    passthrough = False

    def __init__(self) -> None:
        self.started = False
        self.usage: Any = None
        self.finish: str | None = None

    def begin(self) -> bytes:
        """The events that open the stream, once."""
        raise NotImplementedError

    def thinking(self, text: str) -> bytes:
        raise NotImplementedError

    def text(self, text: str) -> bytes:
        raise NotImplementedError

    def tool_call(self, call: dict[str, Any]) -> bytes:
        raise NotImplementedError

    def opened(self) -> bytes:
        if self.started:
            return b""
        self.started = True
        return self.begin()

    def feed(self, chunk: dict[str, Any]) -> bytes:
        out = self.opened()
        if chunk.get("usage") is not None:
            self.usage = chunk["usage"]
        choice = first_choice(chunk)
        if choice is None:
            return out
        if choice.get("finish_reason"):
            self.finish = choice["finish_reason"]
        delta = choice.get("delta") or {}
        thinking, text = delta.get("reasoning_content"), delta.get("content")
        if isinstance(thinking, str) and thinking:
            out += self.thinking(thinking)
        if isinstance(text, str) and text:
            out += self.text(text)
        for call in tool_call_deltas(delta):
            out += self.tool_call(call)
        return out


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One named server-sent event (Responses and Messages name theirs)."""
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def first_choice(chunk: dict[str, Any]) -> dict[str, Any] | None:
    choices = chunk.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return choices[0]
    return None


def tool_call_deltas(delta: dict[str, Any]) -> list[dict[str, Any]]:
    calls = delta.get("tool_calls")
    return [c for c in calls if isinstance(c, dict)] if isinstance(calls, list) else []


def usage_pair(usage: Any) -> tuple[int, int]:
    """(prompt, completion) tokens, 0 where the upstream did not say."""
    if not isinstance(usage, dict):
        return 0, 0
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return (prompt if isinstance(prompt, int) else 0,
            completion if isinstance(completion, int) else 0)
