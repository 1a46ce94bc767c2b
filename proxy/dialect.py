"""OpenAI <-> Mistral: what a request may carry, what it needs, and how answers come back.

Requests are rebuilt from a whitelist, never passed through blindly: Mistral rejects unknown
fields with 422, and OpenAI-only fields (`user`, `store`, `metadata`, ...) must not leak.
"""

from __future__ import annotations

import base64
import struct
from typing import Any

import orjson

from proxy.errors import BadRequest, UpstreamUnavailable

# Above any model's output; keeps the number an int64 everywhere it goes (budget, ledger).
MAX_OUTPUT_TOKENS = 10_000_000
# JSON nesting a request may have: far more than any message or tool schema needs, well below
# the 255 levels orjson encodes.
MAX_DEPTH = 64

# The internal chat request is OpenAI's chat request, rebuilt from this whitelist: field -> the
# type its value must have. Each route dialect (proxy/dialects/) translates it out.
_CHAT: dict[str, Any] = {
    "messages": list, "stream": bool, "max_tokens": int, "max_completion_tokens": int,
    "tools": list, "tool_choice": (str, dict), "parallel_tool_calls": bool,
    "response_format": dict, "stream_options": dict,
    # Answer-changing parameters: forwarded only to routes that list them (routes.yaml).
    "temperature": (int, float), "top_p": (int, float), "stop": (str, list), "seed": int,
    "presence_penalty": (int, float), "frequency_penalty": (int, float), "n": int,
    "logprobs": bool, "top_logprobs": int, "logit_bias": dict, "reasoning_effort": str,
    "prediction": dict, "verbosity": str, "prompt_mode": str, "safe_prompt": bool,
    "modalities": list, "audio": dict, "web_search_options": dict,
}
_ALIASES = {"random_seed": "seed"}  # Mistral's own name, as the mistralai SDK sends it
# A parameter at its default changes nothing, so it needs no route support.
_NEUTRAL: dict[str, Any] = {"n": 1, "logprobs": False, "safe_prompt": False,
                            "modalities": ["text"]}
_EMBEDDINGS = {
    "input": ("input", (str, list)),
    "dimensions": ("output_dimension", int),
    "output_dimension": ("output_dimension", int),
    "output_dtype": ("output_dtype", str),
}
# Fields that change nothing upstream; accepted and dropped. `user` is pseudonymised into the
# ledger; `store: true` is refused (euroute never stores content). `stream_options` stays in
# the internal request for euroute itself; no dialect sends it on.
_DROPPED = frozenset({"model", "user", "metadata", "store", "service_tier", "prompt_cache_key",
                      "safety_identifier"})
_EMBEDDINGS_DROPPED = frozenset({"model", "user", "encoding_format"})
# Per role, the message keys kept; the others listed are accepted and dropped (a participant
# name, a refusal or earlier reasoning echoed back). Anything else is an unknown parameter.
_MESSAGE_KEYS = {
    "system": ({"content"}, {"name"}),
    "user": ({"content"}, {"name"}),
    "assistant": ({"content", "tool_calls", "prefix"},
                  {"name", "refusal", "reasoning_content", "audio", "function_call"}),
    "tool": ({"content", "tool_call_id", "name"}, set()),
}
_PARTS = {  # per role, the content part types it may carry
    "system": {"text"}, "tool": {"text"}, "assistant": {"text", "refusal"},
    "user": {"text", "image_url", "file", "input_audio"},
}


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


def chat(data: dict[str, Any]) -> dict[str, Any]:
    """The internal chat request out of an OpenAI (or mistralai SDK) chat request."""
    out: dict[str, Any] = {"model": data["model"]}
    for name, value in data.items():
        if value is None:
            continue
        if name == "store":
            if value is not False:
                raise BadRequest("'store' must be false: euroute never stores content",
                                 param="store", code="unsupported_parameter")
            continue
        if name in ("functions", "function_call"):
            continue  # translated below
        if name in _DROPPED:
            continue
        name = _ALIASES.get(name, name)
        kind = _CHAT.get(name)
        if kind is None:
            raise BadRequest(f"Unrecognized request argument supplied: {name}", param=name,
                             code="unknown_parameter")
        _check(name, value, kind)
        if name in _NEUTRAL and type(value) is type(_NEUTRAL[name]) and value == _NEUTRAL[name]:
            continue
        out[name] = value
    _functions(data, out)
    out["messages"] = _messages(out.get("messages"))
    return out


def _check(name: str, value: Any, kind: Any) -> None:
    # bool is an int in Python; an int field must not take true/false.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadRequest(f"invalid type for {name!r}", param=name, code="invalid_type")


def _functions(data: dict[str, Any], out: dict[str, Any]) -> None:
    """OpenAI's legacy `functions`/`function_call` as `tools`/`tool_choice`."""
    functions, call = data.get("functions"), data.get("function_call")
    if functions is not None:
        if "tools" in out:
            raise BadRequest("send 'tools' or the legacy 'functions', not both",
                             param="functions", code="invalid_value")
        if not isinstance(functions, list) or not all(isinstance(f, dict) for f in functions):
            raise BadRequest("'functions' must be an array of objects", param="functions",
                             code="invalid_type")
        out["tools"] = [{"type": "function", "function": f} for f in functions]
    if call is not None:
        if "tool_choice" in out:
            raise BadRequest("send 'tool_choice' or the legacy 'function_call', not both",
                             param="function_call", code="invalid_value")
        if call in ("auto", "none"):
            out["tool_choice"] = call
        elif isinstance(call, dict) and isinstance(call.get("name"), str):
            out["tool_choice"] = {"type": "function", "function": {"name": call["name"]}}
        else:
            raise BadRequest("'function_call' must be 'auto', 'none' or {\"name\": ...}",
                             param="function_call", code="invalid_value")


def _messages(messages: Any) -> list[dict[str, Any]]:
    if not messages:
        raise BadRequest("'messages' must be a non-empty array", param="messages",
                         code="missing_required_parameter" if messages is None else "invalid_value")
    out: list[dict[str, Any]] = []
    legacy_call: str | None = None  # the id given to the last legacy function_call
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"{where} must be an object with a 'role'", param=where,
                             code="invalid_type")
        role = message["role"]
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        elif role == "function":  # a legacy function result answers the legacy call before it
            if legacy_call is None or not isinstance(message.get("name"), str):
                raise BadRequest(f"{where}: a 'function' message must follow a function_call",
                                 param=where, code="invalid_value")
            message = {"role": "tool", "tool_call_id": legacy_call, "name": message["name"],
                       "content": message.get("content")}
            role = "tool"
        if role not in _MESSAGE_KEYS:
            raise BadRequest(f"{where}: unknown role {role!r}", param=f"{where}.role",
                             code="invalid_value")
        kept, dropped = _MESSAGE_KEYS[role]
        fixed: dict[str, Any] = {"role": role}
        for key, value in message.items():
            if key == "role" or key in dropped:
                continue
            if key not in kept:
                raise BadRequest(f"Unrecognized argument supplied: {where}.{key}",
                                 param=f"{where}.{key}", code="unknown_parameter")
            fixed[key] = value
        call = message.get("function_call") if role == "assistant" else None
        if isinstance(call, dict) and "tool_calls" not in fixed:
            legacy_call = f"call_legacy_{i}"
            fixed["tool_calls"] = [{"id": legacy_call, "type": "function", "function": call}]
        content = fixed.get("content")
        if isinstance(content, list):
            fixed["content"] = [_part(part, role, f"{where}.content[{j}]")
                                for j, part in enumerate(content)]
        elif content is not None and not isinstance(content, str):
            raise BadRequest(f"{where}.content must be a string or an array of parts",
                             param=f"{where}.content", code="invalid_type")
        out.append(fixed)
    return out


def _part(part: Any, role: str, where: str) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind not in _PARTS[role]:
        raise BadRequest(f"{where}: content parts of type {kind!r} are not supported in a "
                         f"{role} message", param=where, code="unsupported_content")
    if kind == "refusal":
        return {"type": "text", "text": part.get("refusal", "")}
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str) or not url.startswith(("https://", "http://", "data:image/")):
            raise BadRequest(f"{where}: image_url needs an http(s) URL or a data:image/ URL",
                             param=where, code="invalid_value")
    elif kind == "file":
        file = part.get("file")
        if not isinstance(file, dict) or not isinstance(file.get("file_data"), str):
            raise BadRequest(f"{where}: only inline files (file.file_data, base64) are "
                             "supported; euroute stores no files, so file_id cannot be resolved",
                             param=where, code="unsupported_content")
    elif kind == "input_audio":
        audio = part.get("input_audio")
        if not isinstance(audio, dict) or not isinstance(audio.get("data"), str):
            raise BadRequest(f"{where}: input_audio needs {{\"data\": base64, \"format\": ...}}",
                             param=where, code="invalid_value")
    return part


def embeddings_request(request: dict[str, Any], upstream_model: str) -> dict[str, Any]:
    out: dict[str, Any] = {"model": upstream_model}
    for name, value in request.items():
        target = _EMBEDDINGS.get(name)
        if target is None:
            if name in _EMBEDDINGS_DROPPED:
                continue
            raise BadRequest(f"Unrecognized request argument supplied: {name}", param=name,
                             code="unknown_parameter")
        if value is None:
            continue
        mistral_name, kind = target
        _check(name, value, kind)
        out[mistral_name] = value
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


_PART_NEEDS = {"image_url": "vision", "input_image": "vision", "file": "documents",
               "input_audio": "audio"}


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
        if isinstance(content, list):
            need.update(_PART_NEEDS[part["type"]] for part in content
                        if isinstance(part, dict) and part.get("type") in _PART_NEEDS)
    return frozenset(need)


# The ledger's token columns are 32-bit integers; a count outside them is no real count.
MAX_TOKENS = 2**31 - 1


def check_choices(answer: dict[str, Any]) -> dict[str, Any]:
    """An upstream answer or chunk as it entered; its `choices`, when present, must be a list
    of objects (every surface and dialect reads them so), else it is an upstream error."""
    choices = answer.get("choices")
    if choices is not None and not (isinstance(choices, list)
                                    and all(isinstance(c, dict) for c in choices)):
        raise UpstreamUnavailable("upstream sent choices that are not a list of objects",
                                  code="upstream_error")
    return answer


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

