"""The compliant request path end to end: real SDKs -> euroute (uvicorn) -> fake Mistral."""

from __future__ import annotations

import dataclasses
import datetime as dt
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import orjson
import pytest
from mistralai.client import Mistral

from tests.conftest import Proxy, copy_policies, proxy_settings
from tests.fake_mistral import UPSTREAM_KEY, FakeMistral

MODEL = "magistral-small-2509"
HELLO = [{"role": "user", "content": "Hello from the test suite"}]


def cost(prompt: int, completion: int) -> Decimal:
    """USD 0.50 / 1.50 per 1M tokens, the seed route's prices."""
    return (Decimal(prompt) * Decimal("0.50") + Decimal(completion) * Decimal("1.50")) / 10**6


def test_openai_sdk_sync_gets_answer_and_ledger_row(proxy: Proxy, app_key: str,
                                                    fake: FakeMistral) -> None:
    client = openai.OpenAI(base_url=proxy.url, api_key=app_key)
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO,
                                                            max_completion_tokens=200, seed=7,
                                                            user="alice@example.com")
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert raw.headers["x-euroute-route"] == "mistral-eu-magistral-small"
    sent = fake.last
    # Translated to the Mistral dialect, with euroute's upstream key, never the client's.
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert app_key not in str(sent.headers)
    assert sent.json["max_tokens"] == 200 and sent.json["random_seed"] == 7
    assert "user" not in sent.json and "seed" not in sent.json
    assert "alice@example.com" not in sent.raw.decode()

    row = proxy.row(raw.headers["x-request-id"])
    usage = completion.usage
    assert usage is not None
    assert row["outcome"] == "ok" and row["status"] == 200
    assert (row["prompt_tokens"], row["completion_tokens"]) == (usage.prompt_tokens,
                                                                usage.completion_tokens)
    assert Decimal(row["cost_nanos"]) / 10**9 == cost(usage.prompt_tokens, usage.completion_tokens)
    assert row["currency"] == "USD"
    assert row["route"] == "mistral-eu-magistral-small" and row["provider"] == "mistral"
    assert (row["inference_location"], row["storage_location"]) == ("FR", "FR")
    assert row["policy"] == "eu-standard" and len(row["policy_version"]) == 64
    assert row["decision_id"] == raw.headers["x-euroute-decision-id"]
    today = dt.datetime.now(dt.UTC).date()
    assert row["created_at"].tzinfo is not None
    assert row["provider_retention_days"] == 30
    assert row["provider_copy_gone_on"] == row["created_at"].date() + dt.timedelta(days=30)
    assert row["retain_until"] == row["created_at"].date() + dt.timedelta(days=400)
    assert row["retain_until"] > today
    assert row["content_stored"] is False
    assert row["dpa_reference"] and row["zdr_reference"] is None
    # The end user is a pseudonym, never the raw id.
    assert row["end_user"] and "alice" not in str(row.values())
    assert row["latency_us"] > 0


async def test_openai_sdk_async_and_streaming_with_usage(proxy: Proxy, app_key: str,
                                                         fake: FakeMistral) -> None:
    client = openai.AsyncOpenAI(base_url=proxy.url, api_key=app_key)
    completion = await client.chat.completions.create(model=MODEL, messages=HELLO)
    assert completion.usage is not None and completion.usage.total_tokens > 0

    stream = await client.chat.completions.create(
        model=MODEL, messages=HELLO, stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    await client.close()
    assert "stream_options" not in fake.last.json
    # OpenAI's extra usage chunk: empty choices, usage, right before [DONE].
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == completion.usage.prompt_tokens
    assert sum(1 for c in chunks if c.choices) == 5  # the fake's five events, relayed intact


def test_stream_without_include_usage_has_no_extra_chunk(proxy: Proxy, app_key: str,
                                                         fake: FakeMistral) -> None:
    client = openai.OpenAI(base_url=proxy.url, api_key=app_key)
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO,
                                                           stream=True)
    request_id = raw.headers["x-request-id"]
    chunks = list(raw.parse())
    assert all(c.choices for c in chunks)
    row = proxy.row(request_id)
    # Mistral's final chunk carries usage: recorded, though the client did not ask for it.
    assert row["outcome"] == "ok" and row["completion_tokens"] > 0 and not row["usage_missing"]


def test_stream_is_relayed_event_by_event(proxy: Proxy, app_key: str, fake: FakeMistral) -> None:
    """The first event reaches the client while the upstream is still producing the rest."""
    fake.delay_next(0)  # no-op; the per-event delay below comes from a slow upstream
    slow = FakeMistral(stream_chunks=4, delay_s=0.4).start()
    try:
        import os

        os.environ["MISTRAL_BASE_URL"] = slow.url
        proxy.gateway.policies.reload()
        with httpx.Client(timeout=30) as http, http.stream(
            "POST", f"{proxy.url}/chat/completions",
            headers={"authorization": f"Bearer {app_key}"},
            json={"model": MODEL, "messages": HELLO, "stream": True},
        ) as response:
            import time

            start = time.monotonic()
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: {"))
            first_at = time.monotonic() - start
            rest = [line for line in lines if line.startswith("data:")]
            total = time.monotonic() - start
        assert first and rest[-1] == "data: [DONE]"
        # Four events 0.4 s apart: a buffering proxy would deliver the first after ~1.2 s.
        assert first_at < 0.3 < total - first_at
    finally:
        os.environ["MISTRAL_BASE_URL"] = fake.url
        proxy.gateway.policies.reload()
        slow.stop()


def test_mistral_sdk(proxy: Proxy, app_key: str) -> None:
    with Mistral(api_key=app_key, server_url=proxy.origin) as client:
        answer = client.chat.complete(model=MODEL, messages=HELLO)
        assert answer.choices[0].message.content
        events = list(client.chat.stream(model=MODEL, messages=HELLO))
        assert events and events[-1].data.usage is not None
        embedded = client.embeddings.create(model="mistral-embed", inputs=["a", "b"])
        assert len(embedded.data) == 2


def test_openai_embeddings_base64_default(proxy: Proxy, app_key: str, fake: FakeMistral) -> None:
    client = openai.OpenAI(base_url=proxy.url, api_key=app_key)
    result = client.embeddings.create(model="mistral-embed", input=["one", "two"])
    assert len(result.data) == 2 and len(result.data[0].embedding) == 8
    assert "encoding_format" not in fake.last.json
    floats = client.embeddings.create(model="mistral-embed", input="one", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(result.data[0].embedding, abs=1e-6)


def test_models_lists_only_what_the_policy_allows(proxy: Proxy, app_key: str) -> None:
    standard = {m.id for m in openai.OpenAI(base_url=proxy.url, api_key=app_key).models.list()}
    assert {"magistral-small-2509", "mistral/magistral-small-2509", "mistral-embed"} <= standard
    assert "selfhosted/magistral-small-2509" not in standard  # disabled: no base URL
    strict_key = proxy.key("hr-assistant", "eu-strict")
    strict = openai.OpenAI(base_url=proxy.url, api_key=strict_key).models.list()
    assert list(strict) == []


def test_denial_is_403_with_reasons_and_nothing_sent_upstream(proxy: Proxy,
                                                              fake: FakeMistral) -> None:
    strict_key = proxy.key("hr-assistant", "eu-strict")
    r = httpx.post(f"{proxy.url}/chat/completions", json={"model": MODEL, "messages": HELLO},
                   headers={"authorization": f"Bearer {strict_key}"})
    assert r.status_code == 403
    error = r.json()["error"]
    assert error["type"] == "policy_violation" and error["code"] == "no_compliant_route"
    assert error["decision_id"] == r.headers["x-euroute-decision-id"]
    failed = {(x["route"], x["requirement"]) for x in error["reasons"]}
    assert ("mistral-eu-magistral-small", "zero_data_retention") in failed
    assert ("mistral-eu-magistral-small", "max_provider_retention_days") in failed
    assert fake.received == []
    row = proxy.row(r.headers["x-request-id"])
    assert row["outcome"] == "denied" and row["status"] == 403 and row["route"] is None
    assert row["cost_nanos"] == 0
    assert "zero_data_retention" in row["failed_requirements"]


def test_openai_sdk_raises_on_denial(proxy: Proxy) -> None:
    client = openai.OpenAI(base_url=proxy.url, api_key=proxy.key("hr-assistant", "eu-strict"))
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client.chat.completions.create(model=MODEL, messages=HELLO)
    assert caught.value.code == "no_compliant_route"


@pytest.mark.parametrize(("body", "status", "code"), [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b'{"messages": []}', 400, "missing_required_parameter"),
    (b'{"model": "magistral-small-2509"}', 400, "missing_required_parameter"),
    (b'{"model": "magistral-small-2509", "messages": "hi"}', 400, "invalid_type"),
    (b'{"model": "magistral-small-2509", "messages": [{"role": "user", "content": "x"}],'
     b' "max_tokens": "many"}', 400, "invalid_type"),
    (b'{"model": "magistral-small-2509", "messages": [{"role": "user", "content": "x"}],'
     b' "temperature": "hot"}', 400, "invalid_type"),
    (b'{"model": "magistral-small-2509", "messages": [{"role": "user", "content": "x"}],'
     b' "frobnicate": 1}', 400, "unknown_parameter"),
    (b'{"model": 42, "messages": []}', 400, "invalid_type"),
    (b'{"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}', 404,
     "model_not_found"),
])
def test_bad_input_is_openai_shaped_4xx_and_recorded(http: httpx.Client, proxy: Proxy,
                                                     fake: FakeMistral, body: bytes, status: int,
                                                     code: str | None) -> None:
    r = http.post("/chat/completions", content=body,
                  headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    if code:
        assert error["code"] == code
    assert fake.received == []
    row = proxy.row(r.headers["x-request-id"])
    assert row["status"] == status and row["outcome"] in ("invalid_request", "model_not_found")


def test_body_over_the_limit_is_413(http: httpx.Client, proxy: Proxy) -> None:
    limit = proxy.settings.max_body_bytes
    big = b'{"model": "magistral-small-2509", "messages": [{"role": "user", "content": "' + \
        b"x" * (limit + 1) + b'"}]}'
    r = http.post("/chat/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_no_or_unknown_key_is_401(proxy: Proxy) -> None:
    r = httpx.post(f"{proxy.url}/chat/completions", json={"model": MODEL, "messages": HELLO})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=proxy.url, api_key="eur_wrong").models.list()


def test_unknown_path_and_method_are_openai_shaped(http: httpx.Client) -> None:
    r = http.get("/nope")
    assert r.status_code == 404 and r.json()["error"]["message"]
    r = http.get("/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["message"]


def test_upstream_errors_come_back_openai_shaped(http: httpx.Client, proxy: Proxy,
                                                 fake: FakeMistral) -> None:
    fake.fail_next(400, {"object": "error", "message": "Prompt is too long", "type":
                         "invalid_request_error", "param": None, "code": "3051"})
    r = http.post("/chat/completions", json={"model": MODEL, "messages": HELLO})
    assert r.status_code == 400
    assert r.json()["error"] == {"message": "Prompt is too long", "type": "invalid_request_error",
                                 "param": None, "code": "3051"}
    assert proxy.row(r.headers["x-request-id"])["outcome"] == "upstream_error"

    fake.fail_next(503)
    r = http.post("/chat/completions", json={"model": MODEL, "messages": HELLO})
    assert r.status_code == 503 and r.json()["error"]["message"]

    fake.fail_next(401)  # the upstream refusing euroute's own key is not the caller's fault
    r = http.post("/chat/completions", json={"model": MODEL, "messages": HELLO})
    assert r.status_code == 502 and UPSTREAM_KEY not in r.text


def test_upstream_timeout_is_504(proxy: Proxy, app_key: str, fake: FakeMistral) -> None:
    upstream = proxy.gateway.upstream
    saved = upstream.defaults
    upstream.defaults = dataclasses.replace(saved, first_byte_timeout_s=0.3)
    try:
        fake.delay_next(1.5)
        r = httpx.post(f"{proxy.url}/chat/completions", json={"model": MODEL, "messages": HELLO},
                       headers={"authorization": f"Bearer {app_key}"}, timeout=10)
    finally:
        upstream.defaults = saved
    assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
    assert proxy.row(r.headers["x-request-id"])["outcome"] == "upstream_timeout"


def test_missing_usage_is_flagged_not_zeroed(http: httpx.Client, proxy: Proxy,
                                             fake: FakeMistral) -> None:
    fake.omit_usage_next()
    r = http.post("/chat/completions", json={"model": MODEL, "messages": HELLO})
    assert r.status_code == 200
    row = proxy.row(r.headers["x-request-id"])
    assert row["usage_missing"] is True and row["cost_nanos"] == 0


def test_cut_stream_is_recorded(http: httpx.Client, proxy: Proxy, fake: FakeMistral) -> None:
    fake.cut_stream_after(2)
    with http.stream("POST", "/chat/completions",
                     json={"model": MODEL, "messages": HELLO, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data:")]
        request_id = r.headers["x-request-id"]
    # Two events, then an error event in OpenAI's stream shape, never [DONE].
    assert len(lines) == 3 and "data: [DONE]" not in lines
    assert orjson.loads(lines[2][6:])["error"]["code"] == "stream_cut"
    row = proxy.row(request_id)
    assert row["outcome"] == "stream_cut" and row["usage_missing"] is True


def test_health_and_metrics(proxy: Proxy) -> None:
    assert httpx.get(f"{proxy.origin}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{proxy.origin}/readyz")
    assert ready.status_code == 200 and ready.json()["ledger"]["healthy"] is True
    metrics = httpx.get(f"{proxy.origin}/metrics").text
    assert "euroute_ledger_written_total" in metrics


def test_httpx_transport_relays_answers_streams_errors_and_timeouts(
        db_url: str, fake: FakeMistral, tmp_path: Path) -> None:
    # The selectable pure-httpx transport goes through the same code as the default.
    settings = proxy_settings(db_url, copy_policies(tmp_path / "p"), upstream_transport="httpx")
    with Proxy(settings) as server:
        key = server.key()
        client = openai.OpenAI(base_url=server.url, api_key=key, max_retries=0)
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO)
        usage = raw.parse().usage
        assert usage is not None
        assert server.row(raw.headers["x-request-id"])["prompt_tokens"] == usage.prompt_tokens
        chunks = list(client.chat.completions.create(
            model=MODEL, messages=HELLO, stream=True, stream_options={"include_usage": True}))
        assert sum(1 for c in chunks if c.choices) == 5 and chunks[-1].usage is not None

        fake.fail_next(503)
        with pytest.raises(openai.InternalServerError) as failed:
            client.chat.completions.create(model=MODEL, messages=HELLO)
        assert failed.value.status_code == 503

        upstream = server.gateway.upstream
        upstream.defaults = dataclasses.replace(upstream.defaults, first_byte_timeout_s=0.3)
        fake.delay_next(1.5)
        r = httpx.post(f"{server.url}/chat/completions", json={"model": MODEL, "messages": HELLO},
                       headers={"authorization": f"Bearer {key}"}, timeout=10)
        assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"


@pytest.mark.parametrize("model", ["m" * 201, "magistral\x00small"])
def test_model_the_ledger_cannot_hold_is_400_and_recorded(proxy: Proxy, http: httpx.Client,
                                                         model: str) -> None:
    r = http.post("/chat/completions", json={"model": model, "messages": [
        {"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    row = proxy.row(r.headers["x-request-id"])
    assert (row["outcome"], row["model"]) == ("invalid_request", "")
