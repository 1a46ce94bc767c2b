"""Anthropic's Messages API over chat completions: requests in, answers, errors and event
streams out, checked against the anthropic SDK's own types."""

from __future__ import annotations

from typing import Any

import anthropic
import httpx
import orjson
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from pydantic import TypeAdapter

from proxy.dialects import mistral
from proxy.errors import BadRequest, PolicyViolation, RateLimited
from proxy.surfaces import messages
from tests.conftest import Proxy
from tests.fake_mistral import FakeMistral
from tests.test_responses import USAGE, chunk, events_of, magistral_tool_answer
from tests.test_vision import PDF, PNG

MODEL = "magistral-small-2509"
EVENT = TypeAdapter(RawMessageStreamEvent)


def test_blocks_become_chat_messages() -> None:
    exchange = messages.parse({
        "model": MODEL, "max_tokens": 256, "stop_sequences": ["END"], "metadata": {"user_id": "u"},
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "tools": [{"name": "weather", "description": "Weather", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": PNG.split(",", 1)[1]}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}},
                {"type": "document", "title": "t.pdf",
                 "source": {"type": "base64", "media_type": "application/pdf", "data": PDF}}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hm", "signature": ""},
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"c": "Paris"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                {"type": "text", "text": "And tomorrow?"}]},
        ]}, {})
    r = exchange.request
    assert (r["max_tokens"], r["stop"], r["tool_choice"], r["parallel_tool_calls"]) == (
        256, ["END"], "required", False)
    assert r["tools"] == [{"type": "function", "function": {
        "name": "weather", "description": "Weather", "parameters": {"type": "object"}}}]
    system, user, assistant, tool, user2 = r["messages"]
    assert system == {"role": "system", "content": "Be brief."}
    assert user["content"][1] == {"type": "image_url", "image_url": {"url": PNG}}
    assert user["content"][2]["image_url"]["url"] == "https://example.com/a.jpg"
    assert user["content"][3] == {"type": "file", "file": {
        "file_data": f"data:application/pdf;base64,{PDF}", "filename": "t.pdf"}}
    assert assistant == {"role": "assistant", "content": "Let me check.", "tool_calls": [
        {"id": "toolu_1", "type": "function",
         "function": {"name": "weather", "arguments": '{"c":"Paris"}'}}]}
    assert tool == {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"}
    assert user2 == {"role": "user", "content": [{"type": "text", "text": "And tomorrow?"}]}


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
    ({"max_tokens": 10, "messages": [{"role": "user", "content": "hi"}], "top_k": 5}, "top_k"),
    ({"max_tokens": 10, "messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "file", "file_id": "f"}}]}]},
     "messages[0].content.0"),
    ({"max_tokens": 10, "messages": [{"role": "user", "content": "hi"}],
      "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0"),
])
def test_bad_requests_are_refused_by_name(body: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as caught:
        messages.parse({"model": MODEL, **body}, {})
    assert caught.value.status == 400 and caught.value.param == param


def test_errors_take_anthropics_shape_with_the_decision() -> None:
    denial = PolicyViolation("no route", decision_id="dec_1", reasons=[
        {"route": "r", "requirement": "zero_data_retention", "message": "no ZDR"}])
    body = orjson.loads(messages.error(denial))
    assert body["type"] == "error" and body["error"]["type"] == "permission_error"
    assert body["error"]["decision_id"] == "dec_1"
    assert body["error"]["reasons"][0]["requirement"] == "zero_data_retention"
    limited = orjson.loads(messages.error(RateLimited("slow down", retry_after_s=3)))
    assert limited["error"]["type"] == "rate_limit_error"


def test_answer_is_a_message_with_thinking_text_and_tool_use() -> None:
    exchange = messages.parse({"model": MODEL, "max_tokens": 10,
                               "messages": [{"role": "user", "content": "hi"}]}, {})
    internal = mistral.answer(magistral_tool_answer())
    message = Message.model_validate(orjson.loads(exchange.answer(internal)))
    assert [b.type for b in message.content] == ["thinking", "text", "tool_use"]
    assert message.content[0].thinking == "Look it up."  # type: ignore[union-attr]
    assert message.content[2].input == {"c": "Paris"}  # type: ignore[union-attr]
    assert message.stop_reason == "tool_use"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (9, 4)


def test_stream_follows_anthropics_event_sequence() -> None:
    stream = messages.parse({"model": MODEL, "max_tokens": 10, "stream": True,
                             "messages": [{"role": "user", "content": "hi"}]}, {}).stream()
    raw = b"".join([
        stream.feed(mistral.chunk(chunk({"role": "assistant", "content": ""}))),
        stream.feed(mistral.chunk(chunk({"content": [
            {"type": "thinking", "thinking": [{"type": "text", "text": "Hmm."}]}]}))),
        stream.feed(chunk({"content": "Hel"})),
        stream.feed(chunk({"content": "lo"})),
        stream.feed(chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                           "function": {"name": "f", "arguments": "{}"}}]},
                          "tool_calls", usage=USAGE)),
        stream.close()])
    events = events_of(raw)
    for name, data in events:
        assert EVENT.validate_python(data).type == name
    assert [n for n, _ in events] == [
        "message_start",
        "content_block_start", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop"]
    assert [d["index"] for n, d in events if n == "content_block_start"] == [0, 1, 2]
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == "tool_use"
    assert delta["usage"] == {"input_tokens": 9, "output_tokens": 4}


# -- end to end: the anthropic SDK -> euroute -> the fake -----------------------------------


def test_messages_create_with_thinking_tools_and_ledger(proxy: Proxy, app_key: str,
                                                        fake: FakeMistral) -> None:
    claude = anthropic.Anthropic(base_url=proxy.origin, api_key=app_key)  # sends x-api-key
    fake.answer_next("Hello there.", thinking="Greet back.", usage=(12, 5))
    raw = claude.messages.with_raw_response.create(
        model=MODEL, max_tokens=100, system="Be kind.", stop_sequences=["###"],
        messages=[{"role": "user", "content": "Hi"}])
    message = raw.parse()
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[1].text == "Hello there."  # type: ignore[union-attr]
    assert (message.usage.input_tokens, message.usage.output_tokens) == (12, 5)
    assert message.stop_reason == "end_turn"
    assert fake.last.json["stop"] == ["###"] and fake.last.json["max_tokens"] == 100
    row = proxy.row(raw.headers["x-request-id"])
    assert (row["endpoint"], row["outcome"], row["completion_tokens"]) == ("messages", "ok", 5)

    tool = {"name": "weather", "description": "Weather", "input_schema": {
        "type": "object", "properties": {"city": {"type": "string"}}}}
    fake.answer_next("", tool_calls=[{"id": "call_3", "name": "weather",
                                      "arguments": '{"city": "Nice"}'}])
    used = claude.messages.create(model=MODEL, max_tokens=100, tools=[tool],  # type: ignore[list-item]
                                  messages=[{"role": "user", "content": "Weather in Nice?"}])
    call = used.content[-1]
    assert used.stop_reason == "tool_use" and call.type == "tool_use"
    assert call.input == {"city": "Nice"}
    fake.answer_next("Sunny in Nice.")
    # The key in Authorization works too.
    bearer = anthropic.Anthropic(base_url=proxy.origin, auth_token=app_key)
    done = bearer.messages.create(model=MODEL, max_tokens=100, tools=[tool],  # type: ignore[list-item]
                                  messages=[
        {"role": "user", "content": "Weather in Nice?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": call.id,
                                           "name": "weather", "input": {"city": "Nice"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                      "content": "sunny"}]}])
    assert done.content[-1].text == "Sunny in Nice."  # type: ignore[union-attr]
    assert fake.last.json["messages"][-1]["role"] == "tool"
    claude.close()
    bearer.close()


def test_messages_stream(proxy: Proxy, app_key: str, fake: FakeMistral) -> None:
    claude = anthropic.Anthropic(base_url=proxy.origin, api_key=app_key)
    fake.answer_next("Streamed reply.", thinking="Think, then answer.")
    with claude.messages.stream(model=MODEL, max_tokens=100,
                                messages=[{"role": "user", "content": "Hi"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Streamed reply."
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "Think, then answer."  # type: ignore[union-attr]
    assert final.usage.output_tokens == 13 and final.usage.input_tokens == 21
    claude.close()


def test_messages_without_max_tokens_is_refused_in_anthropics_shape(
        proxy: Proxy, app_key: str, fake: FakeMistral) -> None:
    r = httpx.post(f"{proxy.url}/messages", headers={"x-api-key": app_key}, timeout=30,
                   json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 400
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"
    assert fake.received == []
    row = proxy.row(r.headers["x-request-id"])
    assert (row["endpoint"], row["model"], row["outcome"]) == ("messages", MODEL,
                                                               "invalid_request")
