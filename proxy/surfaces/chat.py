"""OpenAI chat completions, the internal shape itself: `content` is the answer text (a string),
the thinking is `reasoning_content`, as LiteLLM, vLLM and DeepSeek send it.

A client that wants Mistral's native content chunks (`[{"type": "thinking", ...},
{"type": "text", ...}]`) sends `x-euroute-reasoning: native`.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy import dialect
from proxy.errors import BadRequest, EurouteError

PATH = "/v1/chat/completions"
ENDPOINT = "chat"


def parse(data: dict[str, Any], headers: dict[bytes, bytes]) -> ChatExchange:
    mode = headers.get(b"x-euroute-reasoning", b"openai").lower()
    if mode not in (b"openai", b"native"):
        raise BadRequest("x-euroute-reasoning must be 'openai' or 'native'",
                         param="x-euroute-reasoning", code="invalid_value")
    request = dialect.chat(data)
    options = request.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    return ChatExchange(request, mode == b"native", include_usage)


def error(exc: EurouteError) -> bytes:
    return exc.render()


def _thinking(text: str) -> dict[str, Any]:
    return {"type": "thinking", "thinking": [{"type": "text", "text": text}]}


def native(message: dict[str, Any]) -> None:
    """Mistral's content chunks back out of `content` and `reasoning_content` (in place)."""
    thinking = message.pop("reasoning_content", None)
    if thinking is None:
        return
    text = message.get("content")
    message["content"] = [_thinking(thinking)] + (
        [{"type": "text", "text": text}] if text else [])


class ChatExchange:
    __slots__ = ("include_usage", "native", "passthrough", "request")

    def __init__(self, request: dict[str, Any], native: bool, include_usage: bool) -> None:
        self.request, self.native, self.include_usage = request, native, include_usage
        self.passthrough = not native

    def answer(self, completion: dict[str, Any]) -> bytes:
        if self.native:
            for choice in completion.get("choices") or ():
                if isinstance(choice, dict) and isinstance(choice.get("message"), dict):
                    native(choice["message"])
        return orjson.dumps(completion)

    def stream(self) -> ChatStream:
        return ChatStream(self.native, self.include_usage)


class ChatStream:
    """Chat chunks out as OpenAI's SSE. Usage is held back from a usage-only chunk and, when
    the client sent `stream_options.include_usage`, sent in OpenAI's extra chunk (no choices)
    before `data: [DONE]`."""

    __slots__ = ("include_usage", "last", "native", "passthrough")

    def __init__(self, native: bool, include_usage: bool) -> None:
        self.native, self.include_usage = native, include_usage
        self.passthrough = not native
        self.last: dict[str, Any] | None = None  # the last chunk that carried usage

    def feed(self, chunk: dict[str, Any]) -> bytes:
        if isinstance(chunk.get("usage"), dict):
            self.last = chunk
            if not chunk.get("choices"):
                return b""
        if self.native:
            for choice in chunk.get("choices") or ():
                if isinstance(choice, dict) and isinstance(choice.get("delta"), dict):
                    native(choice["delta"])
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def close(self) -> bytes:
        if not self.include_usage or self.last is None:
            return b"data: [DONE]\n\n"
        c = self.last
        extra = {"id": c.get("id"), "object": "chat.completion.chunk", "created": c.get("created"),
                 "model": c.get("model"), "choices": [], "usage": c["usage"]}
        return b"data: " + orjson.dumps(extra) + b"\n\ndata: [DONE]\n\n"

    def fail(self, exc: EurouteError) -> bytes:
        # OpenAI's SDKs raise on an event carrying `error`, instead of ending quietly.
        return b"data: " + exc.render() + b"\n\n"
