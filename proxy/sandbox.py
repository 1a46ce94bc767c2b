"""A local Mistral-compatible upstream, for `euroute demo`, the benchmark and the tests.

It speaks Mistral's wire format (422 `extra_forbidden` on unknown fields, usage on the last
SSE chunk, Magistral's thinking chunks) with deterministic answers and no model behind it.
Raw ASGI and orjson keep it cheap, so the benchmark measures euroute rather than the sandbox.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Issue = dict[str, Any]
Reply = tuple[int, Any] | None  # (status, JSON payload), or None when a stream was sent

# Mistral's request schemas forbid extra fields; these are the top-level names it accepts.
CHAT_FIELDS = frozenset({
    "model", "messages", "temperature", "top_p", "max_tokens", "stream", "stop", "random_seed",
    "response_format", "tools", "tool_choice", "presence_penalty", "frequency_penalty", "n",
    "prediction", "parallel_tool_calls", "prompt_mode", "safe_prompt", "logprobs", "top_logprobs",
    "reasoning_effort",
})
EMBEDDING_FIELDS = frozenset({"model", "input", "encoding_format", "output_dimension",
                              "output_dtype"})
MODELS = {  # id -> (capabilities, context window)
    "magistral-small-2509": ({"completion_chat": True, "function_calling": True,
                              "reasoning": True, "vision": True}, 131072),
    "mistral-embed": ({}, 8192),
}
EMBEDDING_DIM = 8


def mistral_error(message: Any, type_: str = "invalid_request_error",
                  code: str | None = None) -> dict[str, Any]:
    return {"object": "error", "message": message, "type": type_, "param": None, "code": code}


async def send_json(send: Send, status: int, payload: Any) -> None:
    body = orjson.dumps(payload)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client went away first."""
    chunks = []
    while (message := await receive())["type"] == "http.request":
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)
    return None


def _issue(type_: str, loc: tuple[Any, ...], msg: str, value: Any) -> Issue:
    # One pydantic error item, as Mistral returns them under message.detail.
    return {"type": type_, "loc": ["body", *loc], "msg": msg, "input": value}


def _validate(body: Any, allowed: frozenset[str], required: dict[str, Any]) -> list[Issue]:
    if not isinstance(body, dict):
        return [_issue("model_attributes_type", (), "Input should be a valid dictionary", body)]
    issues = [_issue("extra_forbidden", (k,), "Extra inputs are not permitted", v)
              for k, v in body.items() if k not in allowed]
    for name, kind in required.items():
        if name not in body:
            issues.append(_issue("missing", (name,), "Field required", body))
        elif not isinstance(body[name], kind):
            expected = getattr(kind, "__name__", kind)
            issues.append(_issue("type_error", (name,), f"Input should be {expected}", body[name]))
    return issues


def _validate_chat(body: Any) -> list[Issue]:
    if issues := _validate(body, CHAT_FIELDS, {"model": str, "messages": list}):
        return issues
    if not body["messages"]:
        issues.append(_issue("too_short", ("messages",), "List should have at least 1 item", []))
    issues += [_issue("union_tag_invalid", ("messages", i), "Input should be a message", m)
               for i, m in enumerate(body["messages"])
               if not isinstance(m, dict) or not isinstance(m.get("role"), str)]
    limit = body.get("max_tokens")
    if limit is not None and (type(limit) is not int or limit < 0):
        issues.append(_issue("int_type", ("max_tokens",), "Input should be an int >= 0", limit))
    if not isinstance(body.get("stream"), bool | None):
        issues.append(_issue("bool_type", ("stream",), "Input should be a bool", body["stream"]))
    return issues


def _validate_embeddings(body: Any) -> list[Issue]:
    issues = _validate(body, EMBEDDING_FIELDS, {"model": str, "input": str | list})
    inputs = body.get("input", "-") if isinstance(body, dict) else "-"
    if not inputs or (isinstance(inputs, list) and not all(isinstance(t, str) for t in inputs)):
        issues.append(_issue("type_error", ("input",),
                             "Input should be a string or a non-empty list of strings", inputs))
    return issues


def _text_of(content: Any) -> str:
    # Content is a string or a list of chunks; only text counts toward the token estimate.
    if isinstance(content, list):
        return "".join(c["text"] for c in content
                       if isinstance(c, dict) and isinstance(c.get("text"), str))
    return content if isinstance(content, str) else ""


def _completion(body: dict[str, Any]) -> tuple[str, list[str], str, dict[str, int]]:
    """Return (thinking, answer words as tokens, finish_reason, usage), all deterministic."""
    messages, model = body["messages"], body["model"]
    last_user = next((m for m in reversed(messages) if m["role"] == "user"), messages[-1])
    n = len(_text_of(last_user.get("content")))
    words = (f"This is the euroute sandbox, a local stand-in for Mistral serving {model}. "
             f"Your last message was {n} characters long, so this reply is deterministic.")
    tokens = [w + " " for w in words.split(" ")]
    tokens[-1] = tokens[-1].rstrip()
    # Magistral reasons before answering; other models answer with plain text only.
    thinking = (f"The user sent {n} characters; answer briefly.".split(" ")
                if model.startswith("magistral") else [])
    finish, limit = "stop", body.get("max_tokens")
    if limit is not None and len(thinking) + len(tokens) > limit:
        finish, thinking = "length", thinking[:limit]
        tokens = tokens[: limit - len(thinking)]
    prompt = sum(len(_text_of(m.get("content"))) for m in messages) // 4 + 1
    completion = len(thinking) + len(tokens)
    usage = {"prompt_tokens": prompt, "completion_tokens": completion,
             "total_tokens": prompt + completion}
    return " ".join(thinking), tokens, finish, usage


def _thinking_chunk(text: str) -> dict[str, Any]:
    return {"type": "thinking", "thinking": [{"type": "text", "text": text}]}


def create_sandbox(*, api_key: str | None = None, stream_chunks: int = 20,
                   delay_s: float = 0.0) -> ASGIApp:
    """`stream_chunks` data events per stream before [DONE], `delay_s` seconds apart."""
    if stream_chunks < 2:
        raise ValueError("stream_chunks must be >= 2: a role event plus a final event")
    if delay_s < 0:
        raise ValueError("delay_s must be >= 0")
    expected_auth = None if api_key is None else f"Bearer {api_key}".encode()
    models = {"object": "list", "data": [
        {"id": mid, "object": "model", "created": 1757030400, "owned_by": "mistralai",
         "capabilities": caps, "name": mid, "description": None, "max_context_length": ctx,
         "aliases": [], "deprecation": None, "type": "base"}
        for mid, (caps, ctx) in MODELS.items()]}

    async def chat(body: dict[str, Any], send: Send) -> Reply:
        thinking, tokens, finish, usage = _completion(body)
        head = {"id": uuid.uuid4().hex, "created": int(time.time()), "model": body["model"]}
        if not body.get("stream"):
            text = "".join(tokens)
            content = [_thinking_chunk(thinking), {"type": "text", "text": text}] if thinking \
                else text
            message = {"role": "assistant", "content": content, "tool_calls": None}
            return 200, {**head, "object": "chat.completion", "choices": [
                {"index": 0, "message": message, "finish_reason": finish}], "usage": usage}
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
        parts, size = stream_chunks - 1, len(tokens)
        deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}] + [
            {"content": "".join(tokens[size * i // parts: size * (i + 1) // parts])}
            for i in range(parts)]  # with more events than tokens, some deltas carry ""
        if thinking:
            deltas[1]["content"] = [_thinking_chunk(thinking),
                                    {"type": "text", "text": deltas[1]["content"]}]
        for i, delta in enumerate(deltas):
            if i and delay_s:
                await asyncio.sleep(delay_s)
            last = i == parts
            event = {**head, "object": "chat.completion.chunk", "choices": [
                {"index": 0, "delta": delta, "finish_reason": finish if last else None}]}
            if last:  # Mistral reports usage on the final chunk only
                event["usage"] = usage
            # One ASGI message per event, so a relay can be tested chunk by chunk.
            await send({"type": "http.response.body", "more_body": True,
                        "body": b"data: " + orjson.dumps(event) + b"\n\n"})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        return None

    async def embeddings(body: dict[str, Any], send: Send) -> Reply:
        texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
        tokens = sum(len(t) for t in texts) // 4 + len(texts)
        digests = [hashlib.sha256(t.encode()).digest()[:EMBEDDING_DIM] for t in texts]
        return 200, {"id": uuid.uuid4().hex, "object": "list", "model": body["model"], "data": [
            {"object": "embedding", "embedding": [round(b / 127.5 - 1, 6) for b in d], "index": i}
            for i, d in enumerate(digests)],
                     "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    posts = {"/v1/chat/completions": (_validate_chat, chat),
             "/v1/embeddings": (_validate_embeddings, embeddings)}

    async def respond(scope: Scope, receive: Receive, send: Send) -> Reply:
        # Like the real gateway, authentication comes before routing and validation.
        if expected_auth is not None and \
                dict(scope["headers"]).get(b"authorization") != expected_auth:
            return 401, mistral_error("Unauthorized")
        path, method = scope["path"], scope["method"]
        if path == "/v1/models" and method == "GET":
            return 200, models
        if path not in posts:
            return 404, mistral_error("Not Found")
        if method != "POST":
            return 405, mistral_error("Method Not Allowed")
        if (raw := await read_body(receive)) is None:
            return None
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return 400, mistral_error(f"Invalid JSON body: {exc}")
        validate, handle = posts[path]
        if issues := validate(body):
            return 422, mistral_error({"detail": issues})
        return await handle(body, send)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        # Nothing to set up, so lifespan and other non-http scopes are simply ignored.
        if scope["type"] == "http" and (reply := await respond(scope, receive, send)):
            await send_json(send, *reply)

    return app


def serve(host: str = "127.0.0.1", port: int = 8900, **kwargs: Any) -> None:
    import uvicorn  # only the command line needs a server

    config = uvicorn.Config(create_sandbox(**kwargs), host=host, port=port,
                            log_level="warning", lifespan="off")
    uvicorn.Server(config).run()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Local Mistral-compatible sandbox upstream.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8900)
    parser.add_argument("--chunks", type=int, default=20, help="SSE events per stream")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds between SSE events")
    parser.add_argument("--api-key", default=None, help="require this Bearer key")
    args = parser.parse_args()
    serve(args.host, args.port, api_key=args.api_key, stream_chunks=args.chunks,
          delay_s=args.delay)
