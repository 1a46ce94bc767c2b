"""Magistral's thinking on the OpenAI surface: `content` is the answer text, the thinking is
`reasoning_content` (JSON and stream deltas); `x-euroute-reasoning: native` gives Mistral's
chunks back."""

from __future__ import annotations

from typing import Any

import httpx
import orjson

from proxy.dialects import mistral
from proxy.surfaces import chat
from tests.fake_mistral import FakeMistral

HELLO = [{"role": "user", "content": "Hello"}]
THINKING = {"type": "thinking", "thinking": [{"type": "text", "text": "Think first."}]}


def completion(content: Any) -> dict[str, Any]:
    return {"id": "c", "object": "chat.completion", "created": 1, "model": "m", "choices": [
        {"index": 0, "finish_reason": "stop",
         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}}


def chunk(delta: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": None}], **extra}


def test_mistral_chunks_fold_into_text_and_reasoning_content() -> None:
    answer = mistral.answer(completion([THINKING, {"type": "text", "text": "Hi"},
                                        {"type": "text", "text": " there"}]))
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": "Hi there",
                                               "reasoning_content": "Think first."}
    # Plain string answers (other models) are left as they are.
    assert mistral.answer(completion("Plain"))["choices"][0]["message"]["content"] == "Plain"
    # A stream delta carrying only thinking still has a string content, so `+=` works.
    delta = mistral.chunk(chunk({"content": [THINKING]}))["choices"][0]["delta"]
    assert delta == {"content": "", "reasoning_content": "Think first."}
    assert mistral.chunk(chunk({"content": "ok"}))["choices"][0]["delta"] == {"content": "ok"}


def test_native_mode_gives_mistrals_chunks_back() -> None:
    exchange = chat.parse({"model": "m", "messages": HELLO}, {b"x-euroute-reasoning": b"native"})
    internal = mistral.answer(completion([THINKING, {"type": "text", "text": "Hi"}]))
    body = orjson.loads(exchange.answer(internal))
    assert body["choices"][0]["message"]["content"] == [THINKING, {"type": "text", "text": "Hi"}]
    assert "reasoning_content" not in body["choices"][0]["message"]
    stream = exchange.stream()
    out = stream.feed(mistral.chunk(chunk({"content": [THINKING]})))
    assert orjson.loads(out[6:])["choices"][0]["delta"]["content"] == [THINKING]


def test_chat_stream_sends_usage_once_when_asked() -> None:
    exchange = chat.parse({"model": "m", "messages": HELLO, "stream": True,
                           "stream_options": {"include_usage": True}}, {})
    stream = exchange.stream()
    usage = {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    assert stream.feed(chunk({"content": "Hi"})).startswith(b"data: {")
    # An OpenAI-dialect upstream reports usage in a chunk of its own: held for the end.
    assert stream.feed({"id": "c", "choices": [], "usage": usage}) == b""
    tail = stream.close().split(b"\n\n")
    assert orjson.loads(tail[0][6:])["usage"] == usage and tail[1] == b"data: [DONE]"
    quiet = chat.parse({"model": "m", "messages": HELLO, "stream": True}, {}).stream()
    quiet.feed({"id": "c", "choices": [], "usage": usage})
    assert quiet.close() == b"data: [DONE]\n\n"


def test_fake_mistral_answers_scripts_in_magistrals_shape(fake: FakeMistral) -> None:
    body = {"model": "magistral-small-2509", "messages": HELLO}
    with httpx.Client(base_url=fake.url, timeout=10,
                      headers={"authorization": "Bearer sk-upstream-test"}) as http:
        fake.answer_next('{"a": 1}', thinking="JSON it is.")
        message = http.post("/chat/completions", json=body).json()["choices"][0]["message"]
        assert message["content"] == [
            {"type": "thinking", "thinking": [{"type": "text", "text": "JSON it is."}]},
            {"type": "text", "text": '{"a": 1}'}]
        fake.answer_next("Streamed answer", thinking="Step by step")
        lines = http.post("/chat/completions", json={**body, "stream": True}).text.splitlines()
        deltas = [orjson.loads(x[6:])["choices"][0]["delta"] for x in lines if x[:7] == "data: {"]
        assert all(isinstance(d["content"], list) for d in deltas[1:4])  # thinking, in pieces
        assert "".join(d["content"] for d in deltas[4:]) == "Streamed answer"
        assert [x for x in lines if x][-1] == "data: [DONE]"
        # The script still needs a valid request: Mistral's 422 comes back unchanged.
        fake.answer_next("never")
        assert http.post("/chat/completions", json={**body, "seed": 1}).status_code == 422
