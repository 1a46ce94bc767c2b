"""The inbound APIs, one module each: chat (OpenAI chat completions), responses (OpenAI
Responses), messages (Anthropic Messages).

A surface parses its request into the internal chat request (OpenAI's chat request, rebuilt by
proxy/dialect.py) and renders the internal answer (a chat completion, or a stream of chat
chunks, with the thinking in `reasoning_content`) and euroute's errors in its own shape. The
gateway runs the same pipeline for every surface. Each module has:

    ENDPOINT                    the endpoint name the ledger records
    parse(data, headers)        an Exchange for one request (raises BadRequest)
    error(exc)                  the body of an error, in the surface's shape

and each Exchange has `request` (the internal request), `answer(completion) -> bytes` and
`stream() -> Stream`, whose `feed(chunk)`, `close()` and `fail(exc)` return the bytes to send.
Adding a surface is one module here and its path in proxy/app.py.
"""

from __future__ import annotations

from typing import Any, Protocol

import orjson

from proxy.errors import EurouteError


class Stream(Protocol):
    def feed(self, chunk: dict[str, Any]) -> bytes: ...
    def close(self) -> bytes: ...
    def fail(self, exc: EurouteError) -> bytes: ...


class Exchange(Protocol):
    request: dict[str, Any]

    def answer(self, completion: dict[str, Any]) -> bytes: ...
    def stream(self) -> Stream: ...


class ChunkStream:
    """A stream rendered from chat chunks: keeps usage and the finish reason, and hands the
    pieces of each delta on in order (thinking, text, tool calls) to the subclass."""

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
