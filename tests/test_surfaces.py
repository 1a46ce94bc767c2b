"""One pipeline for every surface: the same key, decision, admission, ledger row and headers
whether a request comes in as chat completions, Responses or Messages; and the self-hosted
route, which speaks OpenAI's dialect, end to end."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest

from proxy.cli import main
from tests.conftest import Proxy, copy_policies, proxy_settings
from tests.fake_mistral import FakeMistral
from tests.fake_openai import FakeOpenAI
from tests.scripted import Request, ScriptedUpstream, chunk, sse_head
from tests.test_vision import PNG

MODEL = "magistral-small-2509"
SELFHOSTED = "selfhosted/magistral-small-2509"
HELLO = [{"role": "user", "content": "Hello"}]


def call_each(proxy: Proxy, key: str, model: str = MODEL) -> dict[str, httpx.Response]:
    """One request per surface, with the same key and model."""
    with httpx.Client(base_url=proxy.url, timeout=30) as http:
        return {
            "chat": http.post("/chat/completions", headers={"authorization": f"Bearer {key}"},
                              json={"model": model, "messages": HELLO}),
            "responses": http.post("/responses", headers={"authorization": f"Bearer {key}"},
                                   json={"model": model, "input": "Hello"}),
            "messages": http.post("/messages", headers={"x-api-key": key},
                                  json={"model": model, "max_tokens": 50, "messages": HELLO}),
        }


def test_each_surface_takes_the_same_path_and_audit_counts_them_all(
        proxy: Proxy, fake: FakeMistral, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    key = proxy.key("surfaces-app", "eu-standard")
    answers = call_each(proxy, key)
    rows = {}
    for endpoint, r in answers.items():
        assert r.status_code == 200, r.text
        assert r.headers["x-euroute-route"] == "mistral-eu-magistral-small"
        row = rows[endpoint] = proxy.row(r.headers["x-request-id"])
        assert row["decision_id"] == r.headers["x-euroute-decision-id"]
        assert (row["endpoint"], row["outcome"], row["app"]) == (endpoint, "ok", "surfaces-app")
    # The same decision and record for the same request, whichever API it came in through.
    same = {"route", "policy", "policy_version", "inference_location", "provider_retention_days",
            "prompt_tokens", "completion_tokens", "cost_nanos", "retain_until"}
    assert len({tuple(row[c] for c in sorted(same)) for row in rows.values()}) == 1
    assert [m.json["messages"] for m in fake.received] == [HELLO] * 3

    denied = call_each(proxy, proxy.key("surfaces-strict", "eu-strict"))
    for endpoint, r in denied.items():
        assert r.status_code == 403
        error = r.json()["error"]
        assert error["decision_id"] == r.headers["x-euroute-decision-id"]
        assert "zero_data_retention" in {x["requirement"] for x in error["reasons"]}
        row = proxy.row(r.headers["x-request-id"])
        assert (row["endpoint"], row["outcome"]) == (endpoint, "denied")
    assert denied["messages"].json()["error"]["type"] == "permission_error"
    assert denied["chat"].json()["error"]["type"] == "policy_violation"
    assert len(fake.received) == 3  # nothing denied went upstream

    monkeypatch.setenv("EUROUTE_DATABASE_URL", proxy.settings.database_url)
    capsys.readouterr()
    assert main(["audit", "usage", "--group-by", "endpoint", "--format", "json"]) == 0
    counted: dict[str, int] = {}
    for r in json.loads(capsys.readouterr().out):  # a row per endpoint and currency
        counted[r["endpoint"]] = counted.get(r["endpoint"], 0) + r["requests"]
    assert all(counted[e] >= 2 for e in ("chat", "responses", "messages"))


def test_a_denial_through_each_sdk(proxy: Proxy, fake: FakeMistral) -> None:
    key = proxy.key("surfaces-sdk-strict", "eu-strict")
    with openai.OpenAI(base_url=proxy.url, api_key=key) as client, \
            anthropic.Anthropic(base_url=proxy.origin, api_key=key) as claude:
        with pytest.raises(openai.PermissionDeniedError) as chat_denied:
            client.chat.completions.create(model=MODEL, messages=HELLO)
        with pytest.raises(openai.PermissionDeniedError) as responses_denied:
            client.responses.create(model=MODEL, input="Hello")
        with pytest.raises(anthropic.PermissionDeniedError) as messages_denied:
            claude.messages.create(model=MODEL, max_tokens=10, messages=HELLO)  # type: ignore[arg-type]
    for exc in (chat_denied.value, responses_denied.value):
        assert exc.body["code"] == "no_compliant_route" and exc.body["decision_id"]  # type: ignore[index]
    body = messages_denied.value.body
    assert body["error"]["type"] == "permission_error" and body["error"]["decision_id"]  # type: ignore[index]
    assert fake.received == []


@pytest.fixture(scope="module")
def selfhosted(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[Proxy, FakeOpenAI]]:
    """The self-hosted template enabled, served by an OpenAI-dialect upstream."""
    with FakeOpenAI(api_key="sk-selfhosted-test") as fake, pytest.MonkeyPatch.context() as env:
        env.setenv("SELFHOSTED_BASE_URL", fake.url)
        env.setenv("SELFHOSTED_API_KEY", "sk-selfhosted-test")
        policy_dir = copy_policies(Path(tmp_path_factory.mktemp("selfhosted")))
        with Proxy(proxy_settings(db_url, policy_dir)) as server:
            yield server, fake


def test_the_openai_dialect_route_end_to_end(selfhosted: tuple[Proxy, FakeOpenAI]) -> None:
    proxy, fake = selfhosted
    key = proxy.key("selfhosted-app", "eu-strict")
    with openai.OpenAI(base_url=proxy.url, api_key=key) as client:
        raw = client.chat.completions.with_raw_response.create(
            model=SELFHOSTED, messages=HELLO, seed=5, temperature=0.1)
        reply = raw.parse()
        assert raw.headers["x-euroute-route"] == "selfhosted-eu-magistral-small"
        assert reply.choices[0].message.content == "Served from the open weights."
        sent = fake.last.json
        assert sent["seed"] == 5 and "random_seed" not in sent  # the fake refuses unknown fields

        streamed = client.chat.completions.with_raw_response.create(
            model=SELFHOSTED, messages=HELLO, stream=True)
        request_id = streamed.headers["x-request-id"]
        chunks = list(streamed.parse())
        assert all(c.choices for c in chunks)  # usage was asked for euroute, not for this client
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == \
            "Served from the open weights."
        assert fake.last.json["stream_options"] == {"include_usage": True}
        row = proxy.row(request_id)
        assert row["completion_tokens"] == 13 and not row["usage_missing"]

        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=SELFHOSTED, messages=HELLO,
                                           extra_body={"safe_prompt": True})
        assert caught.value.body["code"] == "unsupported_parameter"  # type: ignore[index]
        assert caught.value.body["param"] == "safe_prompt"  # type: ignore[index]


def test_a_route_without_vision_is_not_chosen_for_images(
        selfhosted: tuple[Proxy, FakeOpenAI]) -> None:
    proxy, fake = selfhosted
    key = proxy.key("vision-app", "eu-strict")
    with openai.OpenAI(base_url=proxy.url, api_key=key) as client:
        before = len(fake.received)
        with pytest.raises(openai.PermissionDeniedError) as caught:
            client.chat.completions.create(model=SELFHOSTED, messages=[
                {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                             {"type": "image_url", "image_url": {"url": PNG}}]}])
        reasons = caught.value.body["reasons"]  # type: ignore[index]
        assert {"route": "selfhosted-eu-magistral-small", "requirement": "capabilities",
                "message": "route lacks vision"} in reasons
        assert len(fake.received) == before


def interleaved_calls() -> list[bytes]:
    """Two tool calls whose arguments arrive in turns (a chat client joins them by `index`),
    then text after both opened."""
    deltas: list[dict[str, Any]] = [
        {"role": "assistant", "content": ""},
        {"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                         "function": {"name": "weather", "arguments": '{"city": '}}]},
        {"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                         "function": {"name": "clock", "arguments": '{"zone": '}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]},
        {"tool_calls": [{"index": 1, "function": {"arguments": '"CET"}'}}]},
        {"content": "Asking both."}]
    events = [{"id": "c", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
               "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    events[-1]["choices"][0]["finish_reason"] = "tool_calls"
    events[-1]["usage"] = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    return [b"data: " + orjson.dumps(e) + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]


@pytest.fixture(scope="module")
def interleaving(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    async def script(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(sse_head() + b"".join(chunk(e) for e in interleaved_calls()) + b"0\r\n\r\n")
        await writer.drain()
        return True

    with ScriptedUpstream() as upstream, pytest.MonkeyPatch.context() as env:
        upstream.script = script
        env.setenv("MISTRAL_BASE_URL", upstream.url)
        for name in ("SELFHOSTED_BASE_URL", "SELFHOSTED_API_KEY"):  # only the Mistral route
            env.delenv(name, raising=False)
        policy_dir = copy_policies(Path(tmp_path_factory.mktemp("interleaving")))
        with Proxy(proxy_settings(db_url, policy_dir)) as server:
            yield server


def test_interleaved_tool_calls_reach_each_sdk_whole(interleaving: Proxy) -> None:
    """Each call's arguments end up in its own block (Messages) or item (Responses), as the
    SDKs' own stream accumulators read them; text opened while the calls are open takes an
    output index of its own."""
    key = interleaving.key("interleaving-app")
    with anthropic.Anthropic(base_url=interleaving.origin, api_key=key) as claude:
        with claude.messages.stream(model=MODEL, max_tokens=50, messages=HELLO) as stream:
            message = stream.get_final_message()
    assert [(b.type, getattr(b, "name", None), getattr(b, "input", None))
            for b in message.content] == [("tool_use", "weather", {"city": "Paris"}),
                                          ("tool_use", "clock", {"zone": "CET"}),
                                          ("text", None, None)]
    assert message.content[2].text == "Asking both."  # type: ignore[union-attr]
    assert message.stop_reason == "tool_use"

    with openai.OpenAI(base_url=interleaving.url, api_key=key) as client:
        with client.responses.stream(model=MODEL, input="Hello") as events:
            added = [e.output_index for e in events if e.type == "response.output_item.added"]
            response = events.get_final_response()
    assert added == [0, 1, 2]
    assert [(o.type, getattr(o, "name", None), getattr(o, "arguments", None))
            for o in response.output] == [("function_call", "weather", '{"city": "Paris"}'),
                                          ("function_call", "clock", '{"zone": "CET"}'),
                                          ("message", None, None)]
    assert response.output_text == "Asking both."
