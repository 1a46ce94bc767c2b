"""OpenAI <-> Mistral: what a request may carry, what it needs, and how answers come back.

Requests are rebuilt from a whitelist, never passed through blindly: Mistral rejects unknown
fields with 422, and OpenAI-only fields (`user`, `store`, `metadata`, ...) must not leak.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterable
from typing import Any

import orjson

from proxy import sse
from proxy.errors import BadRequest, EurouteError, UpstreamUnavailable

# Above any model's output; keeps the number an int64 everywhere it goes (budget, ledger).
MAX_OUTPUT_TOKENS = 10_000_000
# JSON nesting a request may have: far more than any message or tool schema needs, well below
# the 255 levels orjson encodes.
MAX_DEPTH = 64

# OpenAI chat field -> Mistral field; the value is checked by the type named.
_CHAT = {
    "messages": ("messages", list),
    "temperature": ("temperature", (int, float)),
    "top_p": ("top_p", (int, float)),
    "max_tokens": ("max_tokens", int),
    "max_completion_tokens": ("max_tokens", int),
    "stream": ("stream", bool),
    "stop": ("stop", (str, list)),
    "seed": ("random_seed", int),
    "random_seed": ("random_seed", int),
    "response_format": ("response_format", dict),
    "tools": ("tools", list),
    "tool_choice": ("tool_choice", (str, dict)),
    "presence_penalty": ("presence_penalty", (int, float)),
    "frequency_penalty": ("frequency_penalty", (int, float)),
    "n": ("n", int),
    "parallel_tool_calls": ("parallel_tool_calls", bool),
    "prediction": ("prediction", dict),
    "prompt_mode": ("prompt_mode", str),
    "safe_prompt": ("safe_prompt", bool),
}
_EMBEDDINGS = {
    "input": ("input", (str, list)),
    "dimensions": ("output_dimension", int),
    "output_dimension": ("output_dimension", int),
    "output_dtype": ("output_dtype", str),
}
# OpenAI fields Mistral has no use for; accepted and dropped. `user` is pseudonymised.
_DROPPED = frozenset({
    "model", "user", "stream_options", "logprobs", "top_logprobs", "store", "metadata",
    "logit_bias", "service_tier", "modalities", "audio", "reasoning_effort", "verbosity",
    "web_search_options", "prompt_cache_key", "safety_identifier", "functions",
    "function_call", "encoding_format",
})


def parse(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    # Brackets bound the depth from above: most bodies are cleared without a walk.
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH and _too_deep(data):
        raise BadRequest(f"request body nests deeper than {MAX_DEPTH} levels",
                         code="invalid_value")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("you must provide a model parameter", param="model",
                         code="missing_required_parameter" if model is None else "invalid_type")
    return data


def _too_deep(data: dict[str, Any]) -> bool:
    # Iterative: the point is to refuse what recursion (orjson's encoder stops at 255 levels)
    # cannot handle.
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def _rebuild(request: dict[str, Any], fields: dict[str, tuple[str, Any]], upstream_model: str
             ) -> dict[str, Any]:
    out: dict[str, Any] = {"model": upstream_model}
    for name, value in request.items():
        target = fields.get(name)
        if target is None:
            if name in _DROPPED:
                continue
            raise BadRequest(f"Unrecognized request argument supplied: {name}", param=name,
                             code="unknown_parameter")
        if value is None:
            continue
        mistral_name, kind = target
        # bool is an int in Python; an int field must not take true/false.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise BadRequest(f"invalid type for {name!r}", param=name, code="invalid_type")
        out[mistral_name] = value
    return out


def chat_request(request: dict[str, Any], upstream_model: str) -> dict[str, Any]:
    out = _rebuild(request, _CHAT, upstream_model)
    limit = output_limit(request)
    if limit is not None:
        out["max_tokens"] = limit
    messages = out.get("messages")
    if not messages:
        raise BadRequest("'messages' must be a non-empty array", param="messages",
                         code="missing_required_parameter" if messages is None else "invalid_value")
    fixed = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a 'role'",
                             param=f"messages[{i}]", code="invalid_type")
        if message["role"] == "developer":  # OpenAI's newer name for the system role
            message = {**message, "role": "system"}
        fixed.append(message)
    out["messages"] = fixed
    return out


def embeddings_request(request: dict[str, Any], upstream_model: str) -> dict[str, Any]:
    out = _rebuild(request, _EMBEDDINGS, upstream_model)
    if "input" not in out:
        raise BadRequest("you must provide an input parameter", param="input",
                         code="missing_required_parameter")
    return out


def check_types(request: dict[str, Any]) -> None:
    """Types of the fields the policy step reads, checked before it reads them."""
    for name in ("max_tokens", "max_completion_tokens"):
        value = request.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or not 1 <= value <= MAX_OUTPUT_TOKENS):
            raise BadRequest(f"{name!r} must be an integer from 1 to {MAX_OUTPUT_TOKENS}",
                             param=name, code="invalid_type")
    if not isinstance(request.get("stream", False), bool | None):
        raise BadRequest("'stream' must be a boolean", param="stream", code="invalid_type")
    output_limit(request)


def output_limit(request: dict[str, Any]) -> int | None:
    """The one output-token limit of a request, which the policy check, the budget estimate and
    the translation all read: `max_completion_tokens` and `max_tokens` are two names for it, so
    both given and different is refused rather than one of them silently winning."""
    newer, older = request.get("max_completion_tokens"), request.get("max_tokens")
    if newer is not None and older is not None and newer != older:
        raise BadRequest("max_completion_tokens and max_tokens are both given and differ; send "
                         "one of them", param="max_completion_tokens", code="invalid_value")
    return newer if newer is not None else older


def needs(request: dict[str, Any], endpoint: str) -> frozenset[str]:
    """The route capabilities this request cannot do without."""
    if endpoint == "embeddings":
        return frozenset({"embeddings"})
    need = {"chat"}
    if request.get("stream"):
        need.add("streaming")
    if request.get("tools"):
        need.add("tools")
    fmt = request.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
        need.add("json_mode")
    for message in request.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(
            isinstance(part, dict) and part.get("type") in ("image_url", "input_image")
            for part in content
        ):
            need.add("vision")
            break
    return frozenset(need)


# The ledger's token columns are 32-bit integers; a count outside them is no real count.
MAX_TOKENS = 2**31 - 1


def usage_of(answer: dict[str, Any]) -> tuple[int, int] | None:
    """(prompt, completion) tokens; None when the answer reports none. Numbers that cannot be
    true (negative, not integers, past the ledger's range) make the answer an upstream error:
    they must never be booked, nor credit a budget."""
    usage = answer.get("usage")
    if usage is None:
        return None
    if not isinstance(usage, dict):
        raise broken_usage(usage)
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens", 0)
    if prompt is None:
        return None
    for n in (prompt, completion):
        if type(n) is not int or not 0 <= n <= MAX_TOKENS:
            raise broken_usage(usage)
    return prompt, completion


def broken_usage(usage: object) -> UpstreamUnavailable:
    kind = type(usage).__name__ if not isinstance(usage, dict) else "counts"
    return UpstreamUnavailable(f"upstream reported impossible token usage ({kind})",
                               code="upstream_error")


def embeddings_answer(answer: dict[str, Any], encoding: str | None) -> dict[str, Any]:
    """OpenAI's SDK asks for base64 by default; Mistral answers floats, so encode here."""
    if encoding == "base64":
        for item in answer.get("data") or ():
            vector = item.get("embedding")
            if isinstance(vector, list):
                item["embedding"] = base64.b64encode(
                    struct.pack(f"<{len(vector)}f", *vector)).decode()
    return answer


def error_from_upstream(status: int, body: bytes) -> tuple[str, str | None, str | None, str | None]:
    """(message, type, param, code) out of a Mistral (or OpenAI-shaped) error body."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return f"upstream answered HTTP {status}", None, None, None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        data = data["error"]
    if not isinstance(data, dict):
        return f"upstream answered HTTP {status}", None, None, None
    message = data.get("message") or data.get("detail") or f"upstream answered HTTP {status}"
    if isinstance(message, dict):
        message = message.get("detail", message)
    if isinstance(message, list):  # FastAPI-style validation details
        message = "; ".join(
            f"{'.'.join(str(p) for p in d.get('loc', ()))}: {d.get('msg')}" if isinstance(d, dict)
            else str(d) for d in message)
    code = data.get("code")
    return (str(message), data.get("type") or None, data.get("param"),
            None if code is None else str(code))


class Scrubber:
    """Replaces every configured provider credential in what goes back to a client.

    An upstream may echo euroute's `Authorization` header (in an answer, an error message, a
    stream event); the app must never see euroute's provider key. The JSON-escaped form is
    replaced too. Keys shorter than 8 characters are not real provider keys and would blank
    out ordinary text, so they are left alone.
    """

    __slots__ = ("_secrets",)
    MARK = b"[redacted]"

    def __init__(self, secrets: Iterable[str | None]) -> None:
        forms = set()
        for secret in secrets:
            if secret and len(secret) >= 8:
                forms.add(secret.encode())
                forms.add(orjson.dumps(secret)[1:-1])
        self._secrets = tuple(sorted(forms, key=len, reverse=True))

    def __call__(self, raw: bytes) -> bytes:
        for secret in self._secrets:
            if secret in raw:
                raw = raw.replace(secret, self.MARK)
        return raw

    def text(self, value: str | None) -> str | None:
        if value is None or not self._secrets:
            return value
        return self(value.encode()).decode()

    def error(self, exc: EurouteError) -> None:
        """An upstream's error, as relayed and recorded (its code becomes the outcome)."""
        exc.message = self.text(exc.message) or ""
        exc.param, exc.code = self.text(exc.param), self.text(exc.code)


class StreamRelay:
    """Relays SSE events as they arrive, unchanged; parses only events that carry usage.

    It works on parsed events (proxy/sse.py), never on byte patterns: only an event whose data
    is exactly `[DONE]` ends the stream. With `include_usage`, OpenAI's extra usage chunk
    (empty choices) is sent as its own event before `[DONE]`, as OpenAI clients expect.
    """

    __slots__ = ("done", "events", "include_usage", "last_chunk", "scrub", "usage")

    def __init__(self, include_usage: bool, scrub: Scrubber) -> None:
        self.include_usage = include_usage
        self.scrub = scrub
        self.usage: tuple[int, int] | None = None
        self.last_chunk: dict[str, Any] | None = None
        self.done = False
        self.events = 0

    def relay(self, events: list[sse.Event]) -> bytes:
        """The bytes to send on for these events; raises on impossible usage."""
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
                out.append(self._usage_event())
            elif b'"usage"' in data:
                self._take_usage(data)
            out.append(self.scrub(event.raw))
        return out[0] if len(out) == 1 else b"".join(out)

    def _take_usage(self, data: bytes) -> None:
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if isinstance(chunk, dict) and (usage := usage_of(chunk)) is not None:
            self.usage = usage
            self.last_chunk = chunk

    def _usage_event(self) -> bytes:
        if not self.include_usage or self.last_chunk is None:
            return b""
        c = self.last_chunk
        extra = {"id": c.get("id"), "object": "chat.completion.chunk", "created": c.get("created"),
                 "model": c.get("model"), "choices": [], "usage": c["usage"]}
        return self.scrub(b"data: " + orjson.dumps(extra) + b"\n\n")
