"""The fake upstream is itself under test: if it lied about Mistral, every proxy test would."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from tests.fake_mistral import UPSTREAM_KEY, FakeMistral

AUTH = {"Authorization": f"Bearer {UPSTREAM_KEY}"}
CHAT = {"model": "mistral-small-latest", "messages": [{"role": "user", "content": "Bonjour"}]}


@pytest.fixture(scope="module")
def server() -> Iterator[FakeMistral]:
    with FakeMistral(stream_chunks=5) as fake:
        yield fake


@pytest.fixture
def fake(server: FakeMistral) -> FakeMistral:
    server.reset()
    return server


@pytest.fixture
def client(fake: FakeMistral) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake.url, headers=AUTH, timeout=5) as c:
        yield c


def sse_events(lines: Iterator[str]) -> list[Any]:
    """Parse `data:` lines; [DONE] is kept as the string "[DONE]"."""
    events: list[Any] = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else orjson.loads(data))
    return events


def stream_chat(client: httpx.Client, **extra: Any) -> list[Any]:
    with client.stream("POST", "/chat/completions", json={**CHAT, "stream": True, **extra}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/event-stream"
        return sse_events(r.iter_lines())


def test_completion_has_mistral_shape_and_is_recorded(fake: FakeMistral,
                                                      client: httpx.Client) -> None:
    r = client.post("/chat/completions", json=CHAT, headers={"X-Trace": "abc"})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "mistral-small-latest"
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert isinstance(choice["message"]["content"], str)
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    assert client.post("/chat/completions", json=CHAT).json()["usage"] == usage  # deterministic

    seen = fake.received[0]
    assert (seen.method, seen.path) == ("POST", "/v1/chat/completions")
    assert seen.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert seen.headers["x-trace"] == "abc"
    assert seen.json == CHAT


def test_unknown_field_is_422_extra_forbidden(fake: FakeMistral, client: httpx.Client) -> None:
    r = client.post("/chat/completions", json={**CHAT, "seed": 123, "user": "u-1"})
    assert r.status_code == 422
    body = r.json()
    assert body["object"] == "error"
    assert body["type"] == "invalid_request_error"
    detail = body["message"]["detail"]
    assert [(d["type"], d["loc"], d["input"]) for d in detail] == [
        ("extra_forbidden", ["body", "seed"], 123), ("extra_forbidden", ["body", "user"], "u-1")]
    assert fake.last.json["seed"] == 123  # the rejected request is still recorded
    r = client.post("/chat/completions", json={**CHAT, "random_seed": 123})
    assert r.status_code == 200


@pytest.mark.parametrize("payload", [b"{not json", b"", b"[]", b'{"model": "m"}',
                                     b'{"model": "m", "messages": []}',
                                     b'{"model": 1, "messages": [1], "max_tokens": -1}'])
def test_bad_input_is_4xx_never_500(client: httpx.Client, payload: bytes) -> None:
    r = client.post("/chat/completions", content=payload)
    assert r.status_code in (400, 422)
    assert r.json()["object"] == "error"


def test_auth_enforced(fake: FakeMistral) -> None:
    with httpx.Client(base_url=fake.url, timeout=5) as anonymous:
        assert anonymous.post("/chat/completions", json=CHAT).status_code == 401
        wrong = anonymous.get("/models", headers={"Authorization": "Bearer sk-client-key"})
        assert wrong.status_code == 401
        assert wrong.json()["message"] == "Unauthorized"
        assert anonymous.get("/models", headers=AUTH).status_code == 200
    assert "authorization" not in fake.received[0].headers
    assert fake.received[1].headers["authorization"] == "Bearer sk-client-key"


def test_stream_ends_with_usage_then_done(client: httpx.Client) -> None:
    events = stream_chat(client)
    assert len(events) == 5 + 1 and events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(e["object"] == "chat.completion.chunk" for e in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(e["choices"][0]["finish_reason"] is None and "usage" not in e
               for e in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    text = "".join(e["choices"][0]["delta"]["content"] for e in chunks)
    whole = client.post("/chat/completions", json=CHAT).json()
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["usage"] == whole["usage"]


def test_stream_events_leave_one_by_one() -> None:
    # With a delay between events, arrival times prove nothing is buffered into one write.
    with FakeMistral(stream_chunks=4, delay_s=0.05) as fake, \
            httpx.Client(base_url=fake.url, headers=AUTH, timeout=5) as client, \
            client.stream("POST", "/chat/completions", json={**CHAT, "stream": True}) as r:
        arrivals = [time.monotonic() for line in r.iter_lines() if line.startswith("data: ")]
    assert len(arrivals) == 5
    assert arrivals[-1] - arrivals[0] >= 0.12


def test_magistral_returns_thinking_chunks_and_respects_max_tokens(client: httpx.Client) -> None:
    body = {**CHAT, "model": "magistral-small-2509"}
    content = client.post("/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    assert [c["type"] for c in content] == ["thinking", "text"]
    assert content[0]["thinking"][0]["type"] == "text"

    cut = client.post("/chat/completions", json={**body, "max_tokens": 9}).json()
    assert cut["choices"][0]["finish_reason"] == "length"
    assert cut["usage"]["completion_tokens"] == 9

    events = stream_chat(client, model="magistral-small-2509")
    assert events[1]["choices"][0]["delta"]["content"][0]["type"] == "thinking"


def test_embeddings_and_models(client: httpx.Client) -> None:
    r = client.post("/embeddings", json={"model": "mistral-embed", "input": ["a", "b"]})
    assert r.status_code == 200
    body = r.json()
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(len(d["embedding"]) == 8 for d in body["data"])
    again = client.post("/embeddings", json={"model": "mistral-embed", "input": "a"}).json()
    assert again["data"][0]["embedding"] == body["data"][0]["embedding"]
    assert client.post("/embeddings", json={"model": "mistral-embed", "input": "a",
                                            "user": "x"}).status_code == 422
    ids = [m["id"] for m in client.get("/models").json()["data"]]
    assert "magistral-small-2509" in ids and "mistral-embed" in ids
    assert client.get("/nowhere").status_code == 404


def test_fail_next_queues_errors_then_recovers(fake: FakeMistral, client: httpx.Client) -> None:
    fake.fail_next(503)
    fake.fail_next(429, {"object": "error", "message": "slow down", "type": "rate_limited",
                         "param": None, "code": "1300"})
    first = client.post("/chat/completions", json=CHAT)
    assert first.status_code == 503
    assert first.json()["object"] == "error"
    second = client.post("/chat/completions", json=CHAT)
    assert (second.status_code, second.json()["code"]) == (429, "1300")
    assert client.post("/chat/completions", json=CHAT).status_code == 200
    assert len(fake.received) == 3


def test_cut_stream_drops_connection_without_done(fake: FakeMistral,
                                                  client: httpx.Client) -> None:
    fake.cut_stream_after(2)
    lines: list[str] = []
    body = {**CHAT, "stream": True}
    with pytest.raises(httpx.RemoteProtocolError), \
            client.stream("POST", "/chat/completions", json=body) as r:
        lines.extend(r.iter_lines())
    events = sse_events(iter(lines))
    assert len(events) == 2 and "[DONE]" not in events
    assert stream_chat(client)[-1] == "[DONE]"  # one-shot: the next stream is whole


def test_omit_usage_next(fake: FakeMistral, client: httpx.Client) -> None:
    fake.omit_usage_next()
    r = client.post("/chat/completions", json=CHAT)
    assert "usage" not in r.json()
    assert int(r.headers["content-length"]) == len(r.content)
    assert "usage" in client.post("/chat/completions", json=CHAT).json()

    fake.omit_usage_next()
    assert "usage" not in stream_chat(client)[-2]
    assert "usage" in stream_chat(client)[-2]


def test_delay_next(fake: FakeMistral, client: httpx.Client) -> None:
    fake.delay_next(0.2)
    started = time.monotonic()
    assert client.post("/chat/completions", json=CHAT).status_code == 200
    assert time.monotonic() - started >= 0.2
    started = time.monotonic()
    client.post("/chat/completions", json=CHAT)
    assert time.monotonic() - started < 0.2


def test_mistral_sdk_reads_the_fake(fake: FakeMistral) -> None:
    from mistralai.client import Mistral

    with Mistral(api_key=UPSTREAM_KEY, server_url=fake.origin) as sdk:
        reply = sdk.chat.complete(model="magistral-small-2509", messages=CHAT["messages"])
        assert reply.usage.completion_tokens > 0
        assert reply.choices[0].message.content[0].type == "thinking"
        chunks = list(sdk.chat.stream(model="mistral-small-latest", messages=CHAT["messages"]))
        assert chunks[-1].data.usage is not None
        vectors = sdk.embeddings.create(model="mistral-embed", inputs=["a"])
        assert len(vectors.data[0].embedding) == 8
    assert fake.received[0].json == {**CHAT, "model": "magistral-small-2509", "stream": False}
