"""Mistral La Plateforme's chat API (and the sandbox): Mistral names, Mistral content chunks.

Mistral rejects unknown fields (422 `extra_forbidden`), so the body is rebuilt from the table
below. Magistral answers with content chunks, `[{"type": "thinking", "thinking": [...]},
{"type": "text", "text": ...}]` (in a stream, `delta.content` is a string or such a list);
`answer` and `chunk` fold them into a string `content` and a `reasoning_content`.
"""

from __future__ import annotations

from typing import Any

from proxy.dialects import copy_fields, fold_choices

PARAMETERS = frozenset({
    "temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty", "n",
    "logprobs", "top_logprobs", "reasoning_effort", "prediction", "prompt_mode", "safe_prompt",
})
_FIELDS = {name: name for name in PARAMETERS} | {
    "seed": "random_seed", "stream": "stream", "tools": "tools", "tool_choice": "tool_choice",
    "parallel_tool_calls": "parallel_tool_calls", "response_format": "response_format",
}


def body(request: dict[str, Any], model: str) -> dict[str, Any]:
    out = copy_fields(request, model, _FIELDS)
    out["messages"] = [_message(m) for m in request["messages"]]
    return out


def _message(message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    if not isinstance(content, list):
        return message
    return {**message, "content": [_part(p) for p in content]}


def _part(part: dict[str, Any]) -> dict[str, Any]:
    kind = part["type"]
    if kind == "file":  # OpenAI's inline PDF -> Mistral's document chunk (data URLs accepted)
        file = part["file"]
        data = file["file_data"]
        url = data if data.startswith("data:") else f"data:application/pdf;base64,{data}"
        out = {"type": "document_url", "document_url": url}
        if isinstance(file.get("filename"), str):
            out["document_name"] = file["filename"]
        return out
    if kind == "input_audio":  # OpenAI's {data, format} -> Mistral's base64 string
        return {"type": "input_audio", "input_audio": part["input_audio"]["data"]}
    return part


def split(content: Any) -> tuple[str | None, str | None]:
    """(text, thinking) out of Mistral content: a string, null, or a list of chunks."""
    if not isinstance(content, list):
        return content if isinstance(content, str) else None, None
    text: list[str] = []
    thinking: list[str] = []
    for chunk in content:
        if not isinstance(chunk, dict):
            continue
        if chunk.get("type") == "text" and isinstance(chunk.get("text"), str):
            text.append(chunk["text"])
        elif chunk.get("type") == "thinking":
            inner = chunk.get("thinking")
            if isinstance(inner, str):
                thinking.append(inner)
            elif isinstance(inner, list):
                thinking += [c["text"] for c in inner
                             if isinstance(c, dict) and isinstance(c.get("text"), str)]
    return "".join(text), "".join(thinking) if thinking else None


def fold(message: Any) -> None:
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        return
    text, thinking = split(message["content"])
    message["content"] = text
    if thinking is not None:
        message["reasoning_content"] = thinking


def answer(completion: dict[str, Any]) -> dict[str, Any]:
    return fold_choices(completion, "message", fold)


def chunk(event: dict[str, Any]) -> dict[str, Any]:
    return fold_choices(event, "delta", fold)
