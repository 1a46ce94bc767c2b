"""The chat request whitelist (proxy/dialect.py) and the route dialects (proxy/dialects/):
what is translated, dropped, refused, and what each upstream receives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import yaml

from proxy import dialect, dialects
from proxy.errors import BadRequest
from proxy.policy.schema import Catalog, Route
from tests.conftest import Proxy
from tests.fake_mistral import FakeMistral
from tests.fake_openai import FakeOpenAI

CATALOG = Catalog.model_validate(yaml.safe_load(
    (Path(__file__).resolve().parent.parent / "policies" / "routes.yaml").read_text()))
MISTRAL = next(r for r in CATALOG.routes if r.id == "mistral-eu-magistral-small")
SELFHOSTED = next(r for r in CATALOG.routes if r.id == "selfhosted-eu-magistral-small")
HELLO = [{"role": "user", "content": "Hello"}]


def refused(request: dict[str, Any], route: Route | None = None) -> BadRequest:
    with pytest.raises(BadRequest) as caught:
        internal = dialect.chat({"model": "m", **request})
        if route is not None:
            dialects.chat_body(internal, route)
    return caught.value


def test_the_catalog_declares_dialects_and_parameters() -> None:
    assert MISTRAL.dialect == "mistral" and SELFHOSTED.dialect == "openai"
    assert "reasoning_effort" not in MISTRAL.parameters  # Magistral always reasons
    assert {"logprobs", "n", "seed"} <= MISTRAL.parameters


def test_legacy_functions_become_tools_and_reach_the_model() -> None:
    weather = {"name": "weather", "parameters": {"type": "object", "properties": {}}}
    internal = dialect.chat({"model": "m", "functions": [weather],
                             "function_call": {"name": "weather"}, "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None,
         "function_call": {"name": "weather", "arguments": "{}"}},
        {"role": "function", "name": "weather", "content": "sunny"}]})
    assert internal["tools"] == [{"type": "function", "function": weather}]
    assert internal["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    call, result = internal["messages"][1], internal["messages"][2]
    assert call["tool_calls"][0]["function"] == {"name": "weather", "arguments": "{}"}
    assert "function_call" not in call
    assert result == {"role": "tool", "tool_call_id": call["tool_calls"][0]["id"],
                      "name": "weather", "content": "sunny"}
    assert dialect.needs(internal, "chat") >= {"tools"}
    body = dialects.chat_body(internal, MISTRAL)
    assert body["tools"] == internal["tools"] and "functions" not in body
    assert dialect.chat({"model": "m", "messages": HELLO, "function_call": "none"}
                        )["tool_choice"] == "none"


def test_tools_and_functions_together_are_refused() -> None:
    exc = refused({"messages": HELLO, "tools": [], "functions": []})
    assert exc.param == "functions"


def test_store_true_is_refused_and_fields_that_change_nothing_are_dropped() -> None:
    exc = refused({"messages": HELLO, "store": True})
    assert (exc.status, exc.param, exc.code) == (400, "store", "unsupported_parameter")
    internal = dialect.chat({"model": "m", "messages": HELLO, "store": False, "user": "u1",
                             "metadata": {"a": "b"}, "n": 1, "logprobs": False,
                             "stream_options": {"include_usage": True}})
    body = dialects.chat_body(internal, MISTRAL)
    assert set(body) == {"model", "messages"}


def test_unknown_fields_are_refused_by_name() -> None:
    exc = refused({"messages": HELLO, "temprature": 1})
    assert (exc.param, exc.code) == ("temprature", "unknown_parameter")
    exc = refused({"messages": [{"role": "user", "content": "x", "weight": 2}]})
    assert exc.param == "messages[0].weight"


@pytest.mark.parametrize(("field", "value"), [
    ("reasoning_effort", "high"), ("logit_bias", {"1": 2}), ("verbosity", "low"),
    ("web_search_options", {}), ("modalities", ["text", "audio"]),
])
def test_answer_changing_fields_a_route_lacks_are_refused_by_name(field: str, value: Any) -> None:
    exc = refused({"messages": HELLO, field: value}, MISTRAL)
    assert (exc.status, exc.param, exc.code) == (400, field, "unsupported_parameter")
    assert field in exc.message and MISTRAL.id in exc.message


def test_mistral_dialect_forwards_what_the_route_supports_in_mistral_names() -> None:
    internal = dialect.chat({"model": "m", "messages": HELLO, "seed": 7, "logprobs": True,
                             "top_logprobs": 3, "n": 2, "temperature": 0.2,
                             "max_completion_tokens": 50, "safe_prompt": True,
                             "stream": True, "stream_options": {"include_usage": True}})
    body = dialects.chat_body(internal, MISTRAL)
    assert body == {"model": MISTRAL.upstream_model, "messages": HELLO, "random_seed": 7,
                    "logprobs": True, "top_logprobs": 3, "n": 2, "temperature": 0.2,
                    "max_tokens": 50, "safe_prompt": True, "stream": True}
    # The mistralai SDK's own name for the seed is accepted too.
    assert dialect.chat({"model": "m", "messages": HELLO, "random_seed": 3})["seed"] == 3


def test_openai_dialect_sends_openai_names_and_no_mistral_only_fields() -> None:
    internal = dialect.chat({"model": "m", "messages": HELLO, "seed": 7, "logit_bias": {"5": 1},
                             "stream": True, "max_tokens": 20})
    body = dialects.chat_body(internal, SELFHOSTED)
    assert body == {"model": SELFHOSTED.upstream_model, "messages": HELLO, "seed": 7,
                    "logit_bias": {"5": 1}, "stream": True, "max_tokens": 20,
                    "stream_options": {"include_usage": True}}
    for field, value in (("safe_prompt", True), ("prompt_mode", "reasoning"),
                         ("prediction", {"type": "content", "content": "x"})):
        exc = refused({"messages": HELLO, field: value}, SELFHOSTED)
        assert (exc.param, exc.code) == (field, "unsupported_parameter")


def test_openai_dialect_folds_vllms_reasoning_field() -> None:
    answer = dialects.of(SELFHOSTED).answer(
        {"choices": [{"message": {"content": "4", "reasoning": "2+2"}}]})
    assert answer["choices"][0]["message"] == {"content": "4", "reasoning_content": "2+2"}


@pytest.fixture(scope="module")
def fake_openai() -> Any:
    with FakeOpenAI() as fake:
        yield fake


def test_an_openai_dialect_upstream_takes_the_body_and_rejects_mistral_names(
        fake_openai: FakeOpenAI) -> None:
    internal = dialect.chat({"model": "m", "messages": HELLO, "seed": 7, "stream": True})
    with httpx.Client(base_url=fake_openai.url, timeout=10) as http:
        good = http.post("/chat/completions", content=orjson.dumps(
            dialects.chat_body(internal, SELFHOSTED)))
        assert good.status_code == 200
        chunks = [orjson.loads(line[6:]) for line in good.text.splitlines()
                  if line.startswith("data: {")]
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
        # The fake is strict: Mistral's body (random_seed) is refused, as vLLM refuses it.
        bad = http.post("/chat/completions", content=orjson.dumps(
            dialects.chat_body(internal, MISTRAL)))
        assert bad.status_code == 400 and "random_seed" in bad.json()["message"]


def test_through_the_proxy_supported_fields_are_forwarded_and_others_refused(
        proxy: Proxy, app_key: str, fake: FakeMistral) -> None:
    client = openai.OpenAI(base_url=proxy.url, api_key=app_key)
    weather = {"name": "weather", "parameters": {"type": "object", "properties": {}}}
    client.chat.completions.create(model="magistral-small-2509", messages=HELLO,  # type: ignore[call-overload]
                                   logprobs=True, top_logprobs=2, n=2, seed=4,
                                   functions=[weather], function_call="auto")
    sent = fake.last.json
    assert (sent["logprobs"], sent["top_logprobs"], sent["n"], sent["random_seed"]) == (
        True, 2, 2, 4)
    assert sent["tools"] == [{"type": "function", "function": weather}]
    assert sent["tool_choice"] == "auto" and "functions" not in sent
    raw = client.chat.completions.with_raw_response
    with pytest.raises(openai.BadRequestError) as caught:
        raw.create(model="magistral-small-2509", messages=HELLO, reasoning_effort="high")
    assert caught.value.body["code"] == "unsupported_parameter"  # type: ignore[index]
    assert caught.value.body["param"] == "reasoning_effort"  # type: ignore[index]
    row = proxy.row(caught.value.response.headers["x-request-id"])
    assert (row["outcome"], row["status"]) == ("invalid_request", 400)
    assert len(fake.received) == 1
