"""OpenAI's Responses API over chat completions: requests in, answers and event streams out,
checked against the openai SDK's own types."""

from __future__ import annotations

from typing import Any

import openai
import orjson
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from proxy.dialects import mistral
from proxy.errors import BadRequest, UpstreamUnavailable
from proxy.surfaces import responses
from tests.conftest import Proxy
from tests.fake_mistral import FakeMistral

MODEL = "magistral-small-2509"
USAGE = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
EVENT = TypeAdapter(ResponseStreamEvent)


def events_of(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each server-sent event."""
    out = []
    for block in raw.split(b"\n\n"):
        fields = dict(line.split(b": ", 1) for line in block.split(b"\n") if b": " in line)
        if b"data" in fields:
            out.append((fields.get(b"event", b"").decode(), orjson.loads(fields[b"data"])))
    return out


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}


def magistral_tool_answer() -> dict[str, Any]:
    """Magistral's JSON answer: thinking, text, then a tool call."""
    message = {"role": "assistant", "content": [
        {"type": "thinking", "thinking": [{"type": "text", "text": "Look it up."}]},
        {"type": "text", "text": "Checking."}], "tool_calls": [
        {"id": "call_9", "type": "function",
         "function": {"name": "weather", "arguments": '{"c": "Paris"}'}}]}
    return {"id": "c", "usage": USAGE,
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": message}]}


def test_input_items_become_chat_messages() -> None:
    exchange = responses.parse({
        "model": MODEL, "instructions": "Be brief.", "max_output_tokens": 300, "store": False,
        "reasoning": {"effort": "low"}, "metadata": {"team": "a"},
        "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}}},
        "tools": [{"type": "function", "name": "weather", "parameters": {"type": "object"}}],
        "input": [
            {"role": "user", "content": [
                {"type": "input_text", "text": "Weather here?"},
                {"type": "input_image", "image_url": "https://example.com/sky.jpg",
                 "detail": "low"}]},
            {"type": "function_call", "call_id": "call_1", "name": "weather",
             "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        ]}, {})
    request = exchange.request
    assert request["max_tokens"] == 300 and request["reasoning_effort"] == "low"
    assert request["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "w", "schema": {"type": "object"}}}
    assert request["tools"] == [{"type": "function", "function": {
        "name": "weather", "parameters": {"type": "object"}}}]
    assert request["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "text", "text": "Weather here?"},
            {"type": "image_url", "image_url": {"url": "https://example.com/sky.jpg",
                                                "detail": "low"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]


@pytest.mark.parametrize(("field", "value"), [
    ("store", True), ("previous_response_id", "resp_1"), ("conversation", "conv_1"),
    ("background", True), ("tools", [{"type": "web_search"}]),
])
def test_what_needs_storage_or_hosted_tools_is_refused(field: str, value: Any) -> None:
    with pytest.raises(BadRequest) as caught:
        responses.parse({"model": MODEL, "input": "hi", field: value}, {})
    assert caught.value.status == 400 and caught.value.param.startswith(field)
    assert caught.value.code == "unsupported_parameter"


def test_answer_is_a_response_with_reasoning_message_and_calls() -> None:
    exchange = responses.parse({"model": MODEL, "input": "hi"}, {})
    internal = mistral.answer(magistral_tool_answer())
    response = Response.model_validate(orjson.loads(exchange.answer(internal)))
    assert [o.type for o in response.output] == ["reasoning", "message", "function_call"]
    assert response.output[0].content[0].text == "Look it up."  # type: ignore[union-attr,index]
    assert response.output_text == "Checking."
    assert response.output[2].call_id == "call_9"  # type: ignore[union-attr]
    assert response.status == "completed" and response.store is False
    assert response.usage is not None and response.usage.total_tokens == 13


def test_stream_follows_the_documented_event_sequence() -> None:
    stream = responses.parse({"model": MODEL, "input": "hi", "stream": True}, {}).stream()
    raw = b"".join([
        stream.feed(mistral.chunk(chunk({"role": "assistant", "content": ""}))),
        stream.feed(mistral.chunk(chunk({"content": [
            {"type": "thinking", "thinking": [{"type": "text", "text": "Hmm. "}]}]}))),
        stream.feed(mistral.chunk(chunk({"content": [
            {"type": "thinking", "thinking": [{"type": "text", "text": "Yes."}]}]}))),
        stream.feed(chunk({"content": "Hel"})),
        stream.feed(chunk({"content": "lo"}, "stop", usage=USAGE)),
        stream.close()])
    events = events_of(raw)
    for name, data in events:
        assert EVENT.validate_python(data).type == name
    assert [n for n, _ in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.reasoning_text.delta", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    final = Response.model_validate(events[-1][1]["response"])
    assert final.output_text == "Hello" and final.usage and final.usage.output_tokens == 4
    assert final.output[0].content[0].text == "Hmm. Yes."  # type: ignore[union-attr,index]


def test_stream_of_tool_calls_and_a_cut() -> None:
    stream = responses.parse({"model": MODEL, "input": "hi", "stream": True}, {}).stream()
    raw = stream.feed(chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                            "function": {"name": "f", "arguments": '{"a"'}}]}))
    raw += stream.feed(chunk({"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]},
                             "tool_calls"))
    raw += stream.close()
    events = events_of(raw)
    names = [n for n, _ in events]
    assert names[2:] == ["response.output_item.added", "response.function_call_arguments.delta",
                         "response.function_call_arguments.delta",
                         "response.function_call_arguments.done", "response.output_item.done",
                         "response.completed"]
    final = Response.model_validate(events[-1][1]["response"])
    assert final.output[0].arguments == '{"a": 1}'  # type: ignore[union-attr]

    cut = responses.parse({"model": MODEL, "input": "hi", "stream": True}, {}).stream()
    cut.feed(chunk({"content": "Hel"}))
    name, data = events_of(cut.fail(UpstreamUnavailable("upstream stream ended")))[-1]
    assert name == "response.failed" and data["response"]["status"] == "failed"
    assert EVENT.validate_python(data).type == "response.failed"


# -- end to end: the openai SDK's Responses client -> euroute -> the fake --------------------


def test_responses_create_with_reasoning_usage_and_ledger(proxy: Proxy, app_key: str,
                                                          fake: FakeMistral) -> None:
    client = openai.OpenAI(base_url=proxy.url, api_key=app_key)
    fake.answer_next("Forty-two.", thinking="Recall the answer.", usage=(30, 7))
    raw = client.responses.with_raw_response.create(
        model=MODEL, instructions="Be brief.", input="The answer?", max_output_tokens=64)
    response = raw.parse()
    assert response.output_text == "Forty-two."
    assert [o.type for o in response.output] == ["reasoning", "message"]
    assert response.usage is not None and response.usage.input_tokens == 30
    sent = fake.last.json
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    assert sent["max_tokens"] == 64 and "store" not in sent
    row = proxy.row(raw.headers["x-request-id"])
    assert (row["endpoint"], row["outcome"], row["prompt_tokens"]) == ("responses", "ok", 30)
    assert row["decision_id"] == raw.headers["x-euroute-decision-id"]
    assert raw.headers["x-euroute-route"] == "mistral-eu-magistral-small"


def test_responses_stream_and_function_call_round_trip(proxy: Proxy, app_key: str,
                                                       fake: FakeMistral) -> None:
    client = openai.OpenAI(base_url=proxy.url, api_key=app_key)
    fake.answer_next("Streaming along.", thinking="Let me think.")
    with client.responses.stream(model=MODEL, input="Go") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == "Streaming along." == final.output_text
    assert final.usage is not None and final.usage.output_tokens == 13

    tool = {"type": "function", "name": "weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    fake.answer_next("", tool_calls=[{"id": "call_7", "name": "weather",
                                      "arguments": '{"city": "Lyon"}'}])
    first = client.responses.create(model=MODEL, input="Weather in Lyon?", tools=[tool])
    call = next(o for o in first.output if o.type == "function_call")
    assert (call.call_id, call.arguments) == ("call_7", '{"city": "Lyon"}')
    fake.answer_next("Sunny in Lyon.")
    second = client.responses.create(model=MODEL, tools=[tool], input=[
        {"role": "user", "content": "Weather in Lyon?"},
        {"type": "function_call", "call_id": "call_7", "name": "weather",
         "arguments": '{"city": "Lyon"}'},
        {"type": "function_call_output", "call_id": "call_7", "output": "sunny"}])
    assert second.output_text == "Sunny in Lyon."
    assert fake.last.json["messages"][-1] == {"role": "tool", "tool_call_id": "call_7",
                                              "content": "sunny"}


def test_responses_refuses_stored_state(proxy: Proxy, app_key: str, fake: FakeMistral) -> None:
    client = openai.OpenAI(base_url=proxy.url, api_key=app_key)
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=MODEL, input="hi", previous_response_id="resp_123")
    assert caught.value.body["param"] == "previous_response_id"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=MODEL, input="hi", store=True)
    assert fake.received == []
