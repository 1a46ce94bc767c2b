"""OpenAI's chat API as self-hosted servers speak it (vLLM, TGI, llama.cpp running the open
weights): OpenAI names, no Mistral-only fields (`random_seed`, `safe_prompt`, `prompt_mode`),
which such servers reject. Thinking arrives as `reasoning_content` (or vLLM's newer
`reasoning`), which is the internal shape already; a server that passes Mistral's content chunks through
is folded as the mistral dialect does.
"""

from __future__ import annotations

from typing import Any

from proxy.dialects import copy_fields, fold_choices, mistral

PARAMETERS = frozenset({
    "temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty", "n",
    "logprobs", "top_logprobs", "logit_bias", "reasoning_effort",
})
_FIELDS = {name: name for name in PARAMETERS} | {
    "messages": "messages", "stream": "stream", "tools": "tools", "tool_choice": "tool_choice",
    "parallel_tool_calls": "parallel_tool_calls", "response_format": "response_format",
}


def body(request: dict[str, Any], model: str) -> dict[str, Any]:
    out = copy_fields(request, model, _FIELDS)
    if out.get("stream"):
        # Such servers report usage in a stream only when asked; the ledger needs it.
        out["stream_options"] = {"include_usage": True}
    return out


def _fold(message: Any) -> None:
    mistral.fold(message)  # a server relaying Mistral's content chunks as they are
    if isinstance(message, dict) and "reasoning" in message:
        reasoning = message.pop("reasoning")
        if reasoning is not None and message.get("reasoning_content") is None:
            message["reasoning_content"] = reasoning


def answer(completion: dict[str, Any]) -> dict[str, Any]:
    return fold_choices(completion, "message", _fold)


def chunk(event: dict[str, Any]) -> dict[str, Any]:
    return fold_choices(event, "delta", _fold)
