"""Anthropic's Messages API (`POST /v1/messages`) over chat completions.

Content blocks become chat content parts (images as image_url, PDFs as files, tool_use as
tool calls, tool_result as tool messages); the answer comes back as blocks: `thinking` (the
model's reasoning, with an empty signature: nothing to replay), `text`, `tool_use`. Errors take
Anthropic's shape, `{"type": "error", "error": {"type": ..., "message": ...}}`, with euroute's
decision id and reasons beside the message when a policy denied the request.
"""

from __future__ import annotations

import os
from typing import Any

import orjson

from proxy import dialect
from proxy.errors import BadRequest, EurouteError, PolicyViolation
from proxy.surfaces import ChunkStream, first_choice, sse, tool_call_deltas, usage_pair

PATH = "/v1/messages"
ENDPOINT = "messages"
_RENAMED = {"model": "model", "max_tokens": "max_tokens", "temperature": "temperature",
            "top_p": "top_p", "stream": "stream", "stop_sequences": "stop"}
# `thinking` is accepted and not forwarded: a reasoning model always reasons, and its
# thinking always comes back as thinking blocks.
_DROPPED = frozenset({"metadata", "service_tier", "thinking", "cache_control"})
_STOP = {"stop": "end_turn", "length": "max_tokens", "model_length": "max_tokens",
         "tool_calls": "tool_use", "function_call": "tool_use"}
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                429: "rate_limit_error", 503: "overloaded_error", 504: "timeout_error"}


def error_body(exc: EurouteError) -> dict[str, Any]:
    body: dict[str, Any] = {"type": _ERROR_TYPES.get(exc.status, "api_error"),
                            "message": exc.message}
    if exc.code:
        body["code"] = exc.code
    if isinstance(exc, PolicyViolation):
        body.update(decision_id=exc.decision_id, reasons=exc.reasons)
    return {"type": "error", "error": body}


def error(exc: EurouteError) -> bytes:
    return orjson.dumps(error_body(exc))


def parse(data: dict[str, Any], headers: dict[bytes, bytes]) -> MessagesExchange:
    if not isinstance(data.get("max_tokens"), int) or isinstance(data["max_tokens"], bool):
        raise BadRequest("max_tokens: Field required (a positive integer)", param="max_tokens",
                         code="missing_required_parameter")
    chat: dict[str, Any] = {}
    for name, value in data.items():
        if value is None or name in _DROPPED or name in ("messages", "system"):
            continue
        if name in _RENAMED:
            chat[_RENAMED[name]] = value
        elif name == "tools":
            chat["tools"] = _tools(value)
        elif name == "tool_choice":
            _tool_choice(value, chat)
        elif name == "top_k":
            raise BadRequest("top_k is not supported by euroute's routes", param="top_k",
                             code="unsupported_parameter")
        else:
            raise BadRequest(f"{name}: Extra inputs are not permitted", param=name,
                             code="unknown_parameter")
    messages = _system(data.get("system"))
    turns = data.get("messages")
    if not isinstance(turns, list) or not turns:
        raise BadRequest("messages: a non-empty array is required", param="messages",
                         code="missing_required_parameter")
    for i, turn in enumerate(turns):
        messages += _turn(turn, f"messages[{i}]")
    chat["messages"] = messages
    return MessagesExchange(dialect.chat(chat))


def _system(system: Any) -> list[dict[str, Any]]:
    if system is None:
        return []
    if isinstance(system, list):
        system = "\n\n".join(b.get("text", "") for b in system
                             if isinstance(b, dict) and b.get("type") == "text")
    if not isinstance(system, str):
        raise BadRequest("system must be a string or text blocks", param="system",
                         code="invalid_type")
    return [{"role": "system", "content": system}]


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise BadRequest("tools must be an array", param="tools", code="invalid_type")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or "input_schema" not in tool:
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise BadRequest(f"tools.{i}: only client tools (name, input_schema) are "
                             f"supported, not {kind!r}", param=f"tools.{i}",
                             code="unsupported_parameter")
        function = {"name": tool.get("name"), "parameters": tool["input_schema"]}
        if tool.get("description"):
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any, chat: dict[str, Any]) -> None:
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "auto":
        chat["tool_choice"] = "auto"
    elif kind == "any":
        chat["tool_choice"] = "required"
    elif kind == "none":
        chat["tool_choice"] = "none"
    elif kind == "tool" and isinstance(choice.get("name"), str):
        chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        raise BadRequest("tool_choice.type must be auto, any, tool or none",
                         param="tool_choice", code="invalid_value")
    if choice.get("disable_parallel_tool_use") is True:
        chat["parallel_tool_calls"] = False


def _turn(turn: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(turn, dict) or turn.get("role") not in ("user", "assistant"):
        raise BadRequest(f"{where}.role must be 'user' or 'assistant'", param=where,
                         code="invalid_value")
    role, content = turn["role"], turn.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise BadRequest(f"{where}.content must be a string or an array of blocks",
                         param=f"{where}.content", code="invalid_type")
    if role == "assistant":
        return [_assistant(content, where)]
    tools: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        if isinstance(block, dict) and block.get("type") == "tool_result":
            tools.append({"role": "tool", "tool_call_id": block.get("tool_use_id"),
                          "content": _result_text(block, f"{where}.content.{j}")})
        else:
            parts.append(_block(block, f"{where}.content.{j}"))
    # Tool results answer the assistant turn before them, so they come first.
    return tools + ([{"role": "user", "content": parts}] if parts else [])


def _assistant(content: list[Any], where: str) -> dict[str, Any]:
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            text.append(block.get("text", ""))
        elif kind == "tool_use":
            calls.append({"id": block.get("id"), "type": "function", "function": {
                "name": block.get("name"), "arguments": orjson.dumps(block.get("input")).decode()}})
        elif kind not in ("thinking", "redacted_thinking"):  # earlier thinking is not replayed
            raise BadRequest(f"{where}.content.{j}: {kind!r} blocks are not supported in an "
                             "assistant turn", param=f"{where}.content.{j}",
                             code="unsupported_content")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) or None}
    if calls:
        message["tool_calls"] = calls
    return message


def _result_text(block: dict[str, Any], where: str) -> str:
    content = block.get("content")
    if isinstance(content, list):
        if any(isinstance(b, dict) and b.get("type") != "text" for b in content):
            raise BadRequest(f"{where}: tool results may carry text only", param=where,
                             code="unsupported_content")
        content = "".join(b.get("text", "") for b in content)
    text = content if isinstance(content, str) else ""
    return f"Error: {text}" if block.get("is_error") else text


def _block(block: Any, where: str) -> dict[str, Any]:
    kind = block.get("type") if isinstance(block, dict) else None
    source = block.get("source") if isinstance(block, dict) else None
    source_kind = source.get("type") if isinstance(source, dict) else None
    if kind == "text":
        return {"type": "text", "text": block.get("text")}
    if kind == "image" and source_kind == "base64":
        url = f"data:{source.get('media_type')};base64,{source.get('data')}"
        return {"type": "image_url", "image_url": {"url": url}}
    if kind == "image" and source_kind == "url":
        return {"type": "image_url", "image_url": {"url": source.get("url")}}
    if kind == "document" and source_kind == "base64" \
            and source.get("media_type") == "application/pdf":
        file = {"file_data": f"data:application/pdf;base64,{source.get('data')}"}
        if isinstance(block.get("title"), str):
            file["filename"] = block["title"]
        return {"type": "file", "file": file}
    if kind == "document" and source_kind == "text":
        return {"type": "text", "text": source.get("data")}
    raise BadRequest(f"{where}: {kind!r} blocks (source {source_kind!r}) are not supported; "
                     "images and PDFs must be inline (base64) or image URLs",
                     param=where, code="unsupported_content")


def _usage(usage: Any) -> dict[str, int]:
    prompt, completion = usage_pair(usage)
    return {"input_tokens": prompt, "output_tokens": completion}


def _input(arguments: Any) -> Any:
    try:
        return orjson.loads(arguments) if isinstance(arguments, str) and arguments else {}
    except orjson.JSONDecodeError:
        return {}


class MessagesExchange:
    __slots__ = ("id", "request")
    passthrough = False

    def __init__(self, request: dict[str, Any]) -> None:
        self.request = request
        self.id = f"msg_{os.urandom(12).hex()}"

    def answer(self, completion: dict[str, Any]) -> bytes:
        choice = first_choice(completion) or {}
        message = choice.get("message") or {}
        blocks: list[dict[str, Any]] = []
        if isinstance(message.get("reasoning_content"), str):
            blocks.append({"type": "thinking", "thinking": message["reasoning_content"],
                           "signature": ""})
        calls = tool_call_deltas(message)
        if message.get("content") or not calls:
            blocks.append({"type": "text", "text": message.get("content") or ""})
        for call in calls:
            function = call.get("function") or {}
            blocks.append({"type": "tool_use", "id": call.get("id") or f"toolu_{self.id[4:]}",
                           "name": function.get("name") or "",
                           "input": _input(function.get("arguments"))})
        return orjson.dumps({
            "id": self.id, "type": "message", "role": "assistant",
            "model": self.request["model"], "content": blocks,
            "stop_reason": _STOP.get(choice.get("finish_reason"), "end_turn"),
            "stop_sequence": None, "usage": _usage(completion.get("usage"))})

    def stream(self) -> MessagesStream:
        return MessagesStream(self)


class MessagesStream(ChunkStream):
    """Chat chunks in, Anthropic's event sequence out: message_start, per block
    content_block_start / content_block_delta / content_block_stop, then message_delta (stop
    reason and usage) and message_stop."""

    def __init__(self, exchange: MessagesExchange) -> None:
        super().__init__()
        self.exchange = exchange
        self.block: str | None = None  # the open block's type
        self.index = -1
        self.calls: dict[int, int] = {}  # chat tool-call index -> its tool_use block's index

    def begin(self) -> bytes:
        message = {"id": self.exchange.id, "type": "message", "role": "assistant",
                   "model": self.exchange.request["model"], "content": [],
                   "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": 0, "output_tokens": 0}}
        return sse("message_start", {"type": "message_start", "message": message})

    def _open(self, kind: str, block: dict[str, Any]) -> bytes:
        out = self._stop()
        self.index += 1
        self.block = kind
        return out + sse("content_block_start", {"type": "content_block_start",
                                                 "index": self.index, "content_block": block})

    def _stop(self) -> bytes:
        if self.block is None:
            return b""
        self.block = None
        return sse("content_block_stop", {"type": "content_block_stop", "index": self.index})

    def _delta(self, delta: dict[str, Any], index: int | None = None) -> bytes:
        return sse("content_block_delta", {
            "type": "content_block_delta", "index": self.index if index is None else index,
            "delta": delta})

    def thinking(self, text: str) -> bytes:
        out = b""
        if self.block != "thinking":
            out = self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
        return out + self._delta({"type": "thinking_delta", "thinking": text})

    def text(self, text: str) -> bytes:
        out = b"" if self.block == "text" else self._open("text", {"type": "text", "text": ""})
        return out + self._delta({"type": "text_delta", "text": text})

    def tool_call(self, call: dict[str, Any]) -> bytes:
        index = call.get("index", len(self.calls))
        function = call.get("function") or {}
        out = b""
        block = self.calls.get(index)
        if block is None:
            out = self._open("tool_use", {"type": "tool_use", "id": call.get("id") or f"toolu_{index}",
                                          "name": function.get("name") or "", "input": {}})
            block = self.calls[index] = self.index
        if isinstance(function.get("arguments"), str) and function["arguments"]:
            # A call's arguments go to its own block, also when the upstream interleaves calls
            # (never seen from a provider; a block is not reopened, so the delta follows its stop).
            out += self._delta({"type": "input_json_delta", "partial_json": function["arguments"]},
                               block)
        return out

    def close(self) -> bytes:
        out = self.opened()
        if self.index < 0:  # an empty answer still has one text block
            out += self._open("text", {"type": "text", "text": ""})
        out += self._stop()
        out += sse("message_delta", {
            "type": "message_delta", "usage": _usage(self.usage),
            "delta": {"stop_reason": _STOP.get(self.finish or "stop", "end_turn"),
                      "stop_sequence": None}})
        return out + sse("message_stop", {"type": "message_stop"})

    def fail(self, exc: EurouteError) -> bytes:
        return self.opened() + sse("error", error_body(exc))
