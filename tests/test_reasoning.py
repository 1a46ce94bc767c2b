"""Magistral's thinking on the OpenAI surface: `content` is the answer text, the thinking is
`reasoning_content` (JSON and stream deltas); `x-euroute-reasoning: native` gives Mistral's
chunks back."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import orjson
from mistralai.client import Mistral
from pydantic import BaseModel

from proxy.dialects import mistral
from proxy.scrub import Scrubber
from proxy.surfaces import Relay, chat
from tests.conftest import Proxy
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


class Event:
    def __init__(self, data: bytes | None, raw: bytes | None = None) -> None:
        self.data = data
        self.raw = raw if raw is not None else b"data:" + (data or b"") + b"\r\n\r\n"


def test_relay_keeps_plain_events_byte_for_byte_and_folds_thinking() -> None:
    relay = Relay(chat.parse({"model": "m", "messages": HELLO, "stream": True}, {}).stream(),
                  mistral.chunk, Scrubber(["sk-secret"]))
    plain = Event(b'{"id": "sk-secret", "choices": [{"index": 0, "delta": {"content": "Hi"}}]}')
    thinking = Event(orjson.dumps(chunk({"content": [THINKING]})))
    last = Event(orjson.dumps(chunk({"content": "!"}, usage={"prompt_tokens": 2,
                                                            "completion_tokens": 3})))
    out = relay.relay([Event(None, b": keep-alive\n\n"), plain, thinking, last,
                       Event(b"[DONE]"), Event(b'{"after": "done"}')])
    # Unchanged events go on as they came (their framing too), scrubbed.
    assert out.startswith(b": keep-alive\n\n" + plain.raw.replace(b"sk-secret", b"[redacted]"))
    assert b'"reasoning_content":"Think first."' in out and b'"thinking"' not in out
    assert relay.usage == (2, 3) and relay.done and b'"after"' not in out
    assert out.endswith(b"data: [DONE]\n\n")


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


# -- end to end: real SDKs -> euroute -> the fake answering as Magistral ------------------------

MODEL = "magistral-small-2509"


def test_openai_sdk_gets_text_and_reasoning_content(proxy: Proxy, app_key: str,
                                                     fake: FakeMistral) -> None:
    client = openai.OpenAI(base_url=proxy.url, api_key=app_key)
    fake.answer_next("Paris.", thinking="The capital of France.")
    reply = client.chat.completions.create(model=MODEL, messages=HELLO)
    message = reply.choices[0].message
    assert message.content == "Paris."
    assert message.reasoning_content == "The capital of France."  # type: ignore[attr-defined]
    assert reply.usage is not None and reply.usage.completion_tokens == 13


def test_openai_sdk_stream_accumulates_with_plus_equals(proxy: Proxy, app_key: str,
                                                        fake: FakeMistral) -> None:
    client = openai.OpenAI(base_url=proxy.url, api_key=app_key)
    fake.answer_next("A streamed answer.", thinking="Think it through first.")
    text, thinking = "", ""
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=HELLO, stream=True, stream_options={"include_usage": True})
    request_id = raw.headers["x-request-id"]
    chunks = list(raw.parse())
    for chunk in chunks:
        if chunk.choices:
            text += chunk.choices[0].delta.content  # a string on every delta: no TypeError
            thinking += getattr(chunk.choices[0].delta, "reasoning_content", None) or ""
    assert text == "A streamed answer." and thinking == "Think it through first."
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 13
    row = proxy.row(request_id)
    assert (row["outcome"], row["endpoint"], row["completion_tokens"]) == ("ok", "chat", 13)


class City(BaseModel):
    name: str
    country: str


def test_openai_sdk_parse_reads_json_after_a_thinking_chunk(proxy: Proxy, app_key: str,
                                                           fake: FakeMistral) -> None:
    client = openai.OpenAI(base_url=proxy.url, api_key=app_key)
    fake.answer_next('{"name": "Paris", "country": "France"}',
                     thinking="They want JSON with name and country.")
    parsed = client.chat.completions.parse(model=MODEL, messages=HELLO, response_format=City)
    assert parsed.choices[0].message.parsed == City(name="Paris", country="France")
    assert fake.last.json["response_format"]["type"] == "json_schema"


def test_native_header_returns_mistrals_chunks_and_the_mistralai_sdk_reads_both(
        proxy: Proxy, app_key: str, fake: FakeMistral) -> None:
    fake.answer_next("Bonjour.", thinking="French greeting.")
    with httpx.Client(timeout=30, headers={"x-euroute-reasoning": "native"}) as http:
        native = Mistral(api_key=app_key, server_url=proxy.origin, client=http)
        reply = native.chat.complete(model=MODEL, messages=HELLO)
    content = reply.choices[0].message.content
    assert isinstance(content, list) and [c.type for c in content] == ["thinking", "text"]
    assert content[1].text == "Bonjour."  # type: ignore[union-attr]
    fake.answer_next("Salut.", thinking="Informal.")
    plain = Mistral(api_key=app_key, server_url=proxy.origin)
    assert plain.chat.complete(model=MODEL, messages=HELLO).choices[0].message.content == "Salut."
    fake.answer_next("Streamed.", thinking="Hmm.")
    events = list(plain.chat.stream(model=MODEL, messages=HELLO))
    assert "".join(e.data.choices[0].delta.content or "" for e in events
                   if e.data.choices) == "Streamed."
