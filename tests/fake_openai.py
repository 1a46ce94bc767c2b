"""An upstream speaking OpenAI's chat dialect as vLLM serves open weights: unknown fields are
rejected (400), thinking comes as `reasoning_content`, and a stream reports usage only when
`stream_options.include_usage` asks for it (in an extra chunk with no choices).

It reuses FakeMistral's server, recording and `answer_next` scripting; only the wire format
differs.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson

from proxy import sandbox
from tests.fake_mistral import FakeMistral, Script

# The top-level fields of OpenAI's chat request that such a server takes.
CHAT_FIELDS = frozenset({
    "model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens",
    "stream", "stream_options", "stop", "seed", "response_format", "tools", "tool_choice",
    "parallel_tool_calls", "presence_penalty", "frequency_penalty", "n", "logprobs",
    "top_logprobs", "logit_bias", "reasoning_effort", "user",
})
DEFAULT = Script("Served from the open weights.", thinking="The user wants a short answer.")


def _error(message: str) -> dict[str, Any]:
    return {"object": "error", "message": message, "type": "BadRequestError", "param": None,
            "code": 400}


class FakeOpenAI(FakeMistral):
    def __init__(self, *, api_key: str | None = None) -> None:
        super().__init__(api_key=api_key)
        self._app = self._serve

    def scripted_json(self, script: Script, head: dict[str, Any]) -> dict[str, Any]:
        message = {"role": "assistant", "content": script.text,
                   "reasoning_content": script.thinking,
                   "tool_calls": script.tool_calls_json() or None}
        return {**head, "object": "chat.completion", "usage": script.usage_json(), "choices": [
            {"index": 0, "message": message, "finish_reason": script.finish_reason}]}

    def scripted_events(self, script: Script, head: dict[str, Any], request: Any
                        ) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
        if script.thinking is not None:
            deltas += [{"reasoning_content": p} for p in script.pieces(script.thinking)]
        deltas += [{"content": p} for p in script.pieces(script.text)]
        if script.tool_calls:
            deltas.append({"tool_calls": script.tool_calls_json()})
        events = [{**head, "object": "chat.completion.chunk",
                   "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
        events[-1]["choices"][0]["finish_reason"] = script.finish_reason
        options = request.get("stream_options") or {}
        if options.get("include_usage"):
            events.append({**head, "object": "chat.completion.chunk", "choices": [],
                           "usage": script.usage_json()})
        return events

    async def _serve(self, scope: sandbox.Scope, receive: sandbox.Receive,
                     send: sandbox.Send) -> None:
        if scope["type"] != "http":
            return
        if self.api_key is not None and dict(scope["headers"]).get(b"authorization") \
                != f"Bearer {self.api_key}".encode():
            await sandbox.send_json(send, 401, _error("Unauthorized"))
            return
        if scope["path"] != "/v1/chat/completions":
            await sandbox.send_json(send, 404, _error("Not Found"))
            return
        if (raw := await sandbox.read_body(receive)) is None:
            return
        body = orjson.loads(raw)
        extra = sorted(set(body) - CHAT_FIELDS)
        if extra:
            await sandbox.send_json(send, 400, _error(
                f"1 validation error: extra fields not permitted: {', '.join(extra)}"))
            return
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            await sandbox.send_json(send, 400, _error("messages: Field required"))
            return
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": body.get("model")}
        if not body.get("stream"):
            await sandbox.send_json(send, 200, self.scripted_json(DEFAULT, head))
            return
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
        for event in self.scripted_events(DEFAULT, head, body):
            await send({"type": "http.response.body", "more_body": True,
                        "body": b"data: " + orjson.dumps(event) + b"\n\n"})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
