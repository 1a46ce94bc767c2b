"""OpenAI's Responses API (`POST /v1/responses`) over chat completions. Nothing is stored:
`store` must be false or absent, and what needs a stored response (`previous_response_id`,
`conversation`, `background`, stored prompts) is refused.

Input items become chat messages; the answer comes back as output items: a `reasoning` item
(the thinking, as `reasoning_text`), a `message` item (the text), `function_call` items.
"""

from __future__ import annotations

import os
import time
from typing import Any

import orjson

from proxy import dialect
from proxy.errors import BadRequest, EurouteError
from proxy.surfaces import ChunkStream, first_choice, sse, tool_call_deltas, usage_pair

PATH = "/v1/responses"
ENDPOINT = "responses"
_STORED = ("previous_response_id", "conversation", "prompt")
# Responses field -> chat field, for the ones that only change name.
_RENAMED = {"model": "model", "max_output_tokens": "max_tokens", "temperature": "temperature",
            "top_p": "top_p", "parallel_tool_calls": "parallel_tool_calls", "stream": "stream",
            "top_logprobs": "top_logprobs"}
_DROPPED = frozenset({"metadata", "user", "safety_identifier", "prompt_cache_key",
                      "service_tier", "stream_options", "include", "store", "truncation",
                      "background", "max_tool_calls", "prompt_cache_retention"})
# Echoed back in the response object, as OpenAI does.
_ECHO = ("instructions", "max_output_tokens", "temperature", "top_p", "reasoning", "text",
         "metadata", "parallel_tool_calls", "tool_choice", "tools", "top_logprobs", "user")


def error(exc: EurouteError) -> bytes:
    return exc.render()


def _refuse(message: str, param: str) -> BadRequest:
    return BadRequest(message, param=param, code="unsupported_parameter")


def parse(data: dict[str, Any], headers: dict[bytes, bytes]) -> ResponsesExchange:
    if data.get("store") not in (None, False):
        raise _refuse("'store' must be false: euroute never stores responses", "store")
    if data.get("background") not in (None, False):
        raise _refuse("background responses need stored responses, which euroute never keeps",
                      "background")
    if data.get("truncation") not in (None, "disabled"):
        raise _refuse("only truncation 'disabled' is supported", "truncation")
    chat: dict[str, Any] = {}
    for name, value in data.items():
        if value is None or name in _DROPPED or name in ("input", "instructions"):
            continue
        if name in _STORED:
            raise _refuse(f"'{name}' needs a stored response or conversation; euroute stores "
                          "nothing: send the whole conversation in 'input'", name)
        if name in _RENAMED:
            chat[_RENAMED[name]] = value
        elif name == "reasoning":
            effort = value.get("effort") if isinstance(value, dict) else None
            if effort is not None:
                chat["reasoning_effort"] = effort
        elif name == "text":
            _text(value, chat)
        elif name == "tools":
            chat["tools"] = _tools(value)
        elif name == "tool_choice":
            chat["tool_choice"] = _tool_choice(value)
        else:
            raise BadRequest(f"Unrecognized request argument supplied: {name}", param=name,
                             code="unknown_parameter")
    if "top_logprobs" in chat:
        chat["logprobs"] = True
    messages = []
    if isinstance(data.get("instructions"), str):
        messages.append({"role": "system", "content": data["instructions"]})
    messages += _input(data.get("input"))
    chat["messages"] = messages
    request = dialect.chat(chat)
    echo = {k: data.get(k) for k in _ECHO}
    return ResponsesExchange(request, echo)


def _text(value: Any, chat: dict[str, Any]) -> None:
    if not isinstance(value, dict):
        raise BadRequest("'text' must be an object", param="text", code="invalid_type")
    fmt = value.get("format")
    if isinstance(fmt, dict):
        kind = fmt.get("type")
        if kind == "json_schema":
            schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
            chat["response_format"] = {"type": "json_schema", "json_schema": schema}
        elif kind == "json_object":
            chat["response_format"] = {"type": "json_object"}
        elif kind != "text":
            raise BadRequest(f"unknown text.format type {kind!r}", param="text.format",
                             code="invalid_value")
    if value.get("verbosity") is not None:
        chat["verbosity"] = value["verbosity"]


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise BadRequest("'tools' must be an array", param="tools", code="invalid_type")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise _refuse(f"tools[{i}]: only function tools are supported, not {kind!r} "
                          "(hosted tools run at OpenAI)", f"tools[{i}]")
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict")
                    if tool.get(k) is not None}
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        return {"type": "function", "function": {"name": choice["name"]}}
    raise BadRequest("tool_choice must be 'auto', 'none', 'required' or a function",
                     param="tool_choice", code="invalid_value")


def _input(items: Any) -> list[dict[str, Any]]:
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise BadRequest("'input' must be a string or a non-empty array of items",
                         param="input", code="missing_required_parameter" if items is None
                         else "invalid_value")
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise BadRequest(f"{where} must be an object", param=where, code="invalid_type")
        kind = item.get("type", "message")
        if kind == "message":
            content = item.get("content")
            if isinstance(content, list):
                content = [_part(p, f"{where}.content[{j}]") for j, p in enumerate(content)]
            messages.append({"role": item.get("role"), "content": content})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
            last = messages[-1] if messages else None
            if last and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if isinstance(output, list):
                output = "".join(p.get("text", "") for p in output if isinstance(p, dict))
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output})
        elif kind == "reasoning":
            continue  # earlier thinking: the model does not take it back
        else:
            raise BadRequest(f"{where}: input items of type {kind!r} are not supported",
                             param=where, code="unsupported_content")
    return messages


def _part(part: Any, where: str) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text"):
        return {"type": "text", "text": part.get("text")}
    if kind == "refusal":
        return {"type": "text", "text": part.get("refusal")}
    if kind == "input_image" and isinstance(part.get("image_url"), str):
        image = {"url": part["image_url"]}
        if part.get("detail"):
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    if kind == "input_file" and isinstance(part.get("file_data"), str):
        file = {"file_data": part["file_data"]}
        if isinstance(part.get("filename"), str):
            file["filename"] = part["filename"]
        return {"type": "file", "file": file}
    raise BadRequest(f"{where}: content of type {kind!r} is not supported (images and files "
                     "must be inline: image_url or file_data; euroute stores no files)",
                     param=where, code="unsupported_content")


def _id(prefix: str) -> str:
    return f"{prefix}_{os.urandom(12).hex()}"


def _usage(usage: Any) -> dict[str, Any]:
    prompt, completion = usage_pair(usage)
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion}


def _reasoning(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id, "summary": [], "status": status,
            "content": [{"type": "reasoning_text", "text": text}]}


def _message(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"type": "message", "id": item_id, "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [],
                         "logprobs": []}]}


def _call(item_id: str, call_id: str, name: str, arguments: str, status: str
          ) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


class ResponsesExchange:
    __slots__ = ("created", "echo", "id", "request")

    passthrough = False

    def __init__(self, request: dict[str, Any], echo: dict[str, Any]) -> None:
        self.request, self.echo = request, echo
        self.id = _id("resp")
        self.created = int(time.time())

    def response(self, status: str, output: list[dict[str, Any]], usage: Any = None,
                 finish: str | None = None, error: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
        e = self.echo
        incomplete = status == "incomplete"
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "model": self.request["model"], "output": output,
            "usage": None if usage is None else _usage(usage),
            "error": error, "incomplete_details": {"reason": "max_output_tokens"}
            if incomplete else None,
            "instructions": e["instructions"], "max_output_tokens": e["max_output_tokens"],
            "temperature": e["temperature"], "top_p": e["top_p"],
            "parallel_tool_calls": e["parallel_tool_calls"] is not False,
            "tool_choice": e["tool_choice"] or "auto", "tools": e["tools"] or [],
            "reasoning": e["reasoning"], "text": e["text"] or {"format": {"type": "text"}},
            "metadata": e["metadata"] or {}, "top_logprobs": e["top_logprobs"],
            "store": False, "truncation": "disabled", "user": e["user"],
        }

    def answer(self, completion: dict[str, Any]) -> bytes:
        choice = first_choice(completion) or {}
        message = choice.get("message") or {}
        output: list[dict[str, Any]] = []
        if isinstance(message.get("reasoning_content"), str):
            output.append(_reasoning(_id("rs"), message["reasoning_content"], "completed"))
        calls = tool_call_deltas(message)
        text = message.get("content")
        if text or not calls:
            output.append(_message(_id("msg"), text or "", "completed"))
        for call in calls:
            function = call.get("function") or {}
            output.append(_call(_id("fc"), call.get("id") or _id("call"),
                                function.get("name") or "", function.get("arguments") or "",
                                "completed"))
        status = "incomplete" if choice.get("finish_reason") == "length" else "completed"
        return orjson.dumps(self.response(status, output, completion.get("usage")))

    def stream(self) -> ResponsesStream:
        return ResponsesStream(self)


class ResponsesStream(ChunkStream):
    """Chat chunks in, the Responses event sequence out: response.created, in_progress, then
    per output item `output_item.added`, its content or argument deltas and `.done` events,
    and response.completed (or incomplete) with usage."""

    def __init__(self, exchange: ResponsesExchange) -> None:
        super().__init__()
        self.exchange = exchange
        self.seq = 0
        self.added = 0  # output items added so far: the next one's output_index
        self.output: dict[int, dict[str, Any]] = {}  # finished items by output_index
        self.open: dict[str, Any] | None = None  # the item being streamed
        self.calls: dict[int, dict[str, Any]] = {}  # chat tool-call index -> open item

    def _event(self, kind: str, **fields: Any) -> bytes:
        self.seq += 1
        return sse(kind, {"type": kind, "sequence_number": self.seq - 1, **fields})

    def begin(self) -> bytes:
        snapshot = self.exchange.response("in_progress", [])
        return (self._event("response.created", response=snapshot)
                + self._event("response.in_progress", response=snapshot))

    def thinking(self, text: str) -> bytes:
        return self._open("reasoning") + self._delta(text)

    def text(self, text: str) -> bytes:
        return self._open("message") + self._delta(text)

    def _open(self, kind: str) -> bytes:
        if self.open is not None and self.open["type"] == kind:
            return b""
        out = self._close_open()
        index = self._add()
        item_id = _id("rs" if kind == "reasoning" else "msg")
        self.open = {"type": kind, "id": item_id, "index": index, "text": ""}
        if kind == "reasoning":
            item = {**_reasoning(item_id, "", "in_progress"), "content": []}
            part = {"type": "reasoning_text", "text": ""}
        else:
            item = {**_message(item_id, "", "in_progress"), "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return (out + self._event("response.output_item.added", output_index=index, item=item)
                + self._event("response.content_part.added", item_id=item_id,
                              output_index=index, content_index=0, part=part))

    def _delta(self, text: str) -> bytes:
        item = self.open
        if item is None:
            raise RuntimeError("a delta with no open output item")
        item["text"] += text
        kind = ("response.reasoning_text.delta" if item["type"] == "reasoning"
                else "response.output_text.delta")
        extra = {} if item["type"] == "reasoning" else {"logprobs": []}
        return self._event(kind, item_id=item["id"], output_index=item["index"],
                           content_index=0, delta=text, **extra)

    def _close_open(self) -> bytes:
        item, self.open = self.open, None
        if item is None:
            return b""
        where = {"item_id": item["id"], "output_index": item["index"], "content_index": 0}
        if item["type"] == "reasoning":
            done = _reasoning(item["id"], item["text"], "completed")
            out = self._event("response.reasoning_text.done", **where, text=item["text"])
        else:
            done = _message(item["id"], item["text"], "completed")
            out = self._event("response.output_text.done", **where, text=item["text"],
                              logprobs=[])
        out += self._event("response.content_part.done", **where, part=done["content"][0])
        self.output[item["index"]] = done
        return out + self._event("response.output_item.done", output_index=item["index"],
                                 item=done)

    def tool_call(self, call: dict[str, Any]) -> bytes:
        index = call.get("index", len(self.calls))
        function = call.get("function") or {}
        out = b""
        item = self.calls.get(index)
        if item is None:
            out += self._close_open()
            item = _call(_id("fc"), call.get("id") or _id("call"), function.get("name") or "",
                         "", "in_progress")
            item["output_index"] = self._add()
            self.calls[index] = item
            added = {k: v for k, v in item.items() if k != "output_index"}
            out += self._event("response.output_item.added", output_index=item["output_index"],
                               item=added)
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            item["arguments"] += arguments
            out += self._event("response.function_call_arguments.delta", item_id=item["id"],
                               output_index=item["output_index"], delta=arguments)
        return out

    def _close_calls(self) -> bytes:
        out = b""
        for item in self.calls.values():
            index = item.pop("output_index")
            done = {**item, "status": "completed"}
            out += self._event("response.function_call_arguments.done", item_id=item["id"],
                               output_index=index, name=item["name"],
                               arguments=item["arguments"])
            out += self._event("response.output_item.done", output_index=index, item=done)
            self.output[index] = done
        self.calls = {}
        return out

    def _add(self) -> int:
        self.added += 1
        return self.added - 1

    def _finished(self) -> list[dict[str, Any]]:
        return [self.output[index] for index in sorted(self.output)]

    def close(self) -> bytes:
        out = self.opened() + self._close_open() + self._close_calls()
        if self.finish == "length":
            final = self.exchange.response("incomplete", self._finished(), self.usage)
            return out + self._event("response.incomplete", response=final)
        final = self.exchange.response("completed", self._finished(), self.usage)
        return out + self._event("response.completed", response=final)

    def fail(self, exc: EurouteError) -> bytes:
        out = self.opened()
        failed = self.exchange.response("failed", self._finished(), self.usage,
                                        error={"code": "server_error", "message": exc.message})
        return out + self._event("response.failed", response=failed)
