"""Hostile or broken upstream answers, one test each, from a scripted upstream on loopback.

Every one must give the client a clean OpenAI-shaped error (or a scrubbed answer), book the
right outcome, and leave euroute serving: each test ends with a normal request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import resource
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from proxy.ledger.tables import ledger
from tests.conftest import Proxy, copy_policies, ledger_rows, new_database, proxy_settings, run
from tests.fake_mistral import UPSTREAM_KEY
from tests.scripted import (
    ANSWER,
    Request,
    ScriptedUpstream,
    chunk,
    response,
    sse_events,
    sse_head,
)

MODEL = "magistral-small-2509"
HELLO = [{"role": "user", "content": "hi"}]
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def scripted() -> Iterator[ScriptedUpstream]:
    with ScriptedUpstream() as server:
        yield server


@pytest.fixture(scope="module", params=["aiohttp", "httpx"])
def hostile(scripted: ScriptedUpstream, tmp_path_factory: pytest.TempPathFactory,
            request: pytest.FixtureRequest) -> Iterator[Proxy]:
    """euroute on the default transport, then on httpx's own: both must hold."""
    tmp = tmp_path_factory.mktemp("hostile")
    url, drop = new_database("sqlite", tmp)
    saved = os.environ["MISTRAL_BASE_URL"]
    os.environ["MISTRAL_BASE_URL"] = scripted.url
    try:
        settings = proxy_settings(url, copy_policies(tmp / "policies"),
                                  upstream_transport=request.param)
        with Proxy(settings) as server:
            yield server
    finally:
        os.environ["MISTRAL_BASE_URL"] = saved
        drop()


@pytest.fixture(scope="module")
def key(hostile: Proxy) -> str:
    return hostile.key("hostile-app")


@pytest.fixture
def up(scripted: ScriptedUpstream, hostile: Proxy, key: str) -> Iterator[ScriptedUpstream]:
    scripted.reset()
    saved = hostile.gateway.upstream.defaults
    yield scripted
    hostile.gateway.upstream.defaults = saved
    # whatever happened, euroute still serves a normal request
    scripted.reset()
    r = post(hostile, key)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Bonjour"


def limits(proxy: Proxy, **changes: Any) -> None:
    upstream = proxy.gateway.upstream
    upstream.defaults = dataclasses.replace(upstream.defaults, **changes)


def post(proxy: Proxy, key: str, **extra: Any) -> httpx.Response:
    return httpx.post(f"{proxy.url}/chat/completions", timeout=60,
                      headers={"authorization": f"Bearer {key}"},
                      json={"model": MODEL, "messages": HELLO, **extra})


def assert_error(r: httpx.Response, status: int, proxy: Proxy, outcome: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["message"]
    row = proxy.row(r.headers["x-request-id"])
    assert row["outcome"] == outcome and row["status"] == status
    assert row["prompt_tokens"] == 0 and row["cost_nanos"] == 0
    return row


def answer(raw: bytes, keep: bool = False) -> Any:
    async def script(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(raw)
        await writer.drain()
        return keep
    return script


def test_interim_103_is_skipped(up: ScriptedUpstream, hostile: Proxy, key: str) -> None:
    up.script = answer(b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n"
                       + response(200, orjson.dumps(ANSWER)))
    r = post(hostile, key)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 7


@pytest.mark.parametrize("headers", [
    ["x-big: " + "a" * (100 * 1024)],  # one line past every limit
    [f"x-h{i}: " + "b" * 1000 for i in range(100)],  # many lines, 100 KiB together
], ids=["one-line", "many-lines"])
def test_oversized_headers_are_refused(up: ScriptedUpstream, hostile: Proxy, key: str,
                                       headers: list[str]) -> None:
    up.script = answer(response(200, orjson.dumps(ANSWER), *headers))
    assert_error(post(hostile, key), 502, hostile, "upstream_error")


def test_non_http_bytes(up: ScriptedUpstream, hostile: Proxy, key: str) -> None:
    up.script = answer(b"SSH-2.0-OpenSSH_9.6\r\n\x00\x01\x02 not http at all\r\n\r\n")
    assert_error(post(hostile, key), 502, hostile, "upstream_error")


def test_body_shorter_than_content_length(up: ScriptedUpstream, hostile: Proxy, key: str) -> None:
    body = orjson.dumps(ANSWER)
    up.script = answer(response(200, body).replace(
        f"content-length: {len(body)}".encode(), f"content-length: {len(body) + 100}".encode()))
    assert_error(post(hostile, key), 502, hostile, "upstream_error")


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a crashed or cut-off peer does."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@pytest.mark.parametrize("framing", ["until-close", "chunked"])
def test_reset_mid_body_is_an_upstream_error_never_complete(
        up: ScriptedUpstream, hostile: Proxy, key: str, framing: str) -> None:
    body = orjson.dumps(ANSWER)

    async def script(request: Request, writer: asyncio.StreamWriter) -> bool:
        if framing == "chunked":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                         b"transfer-encoding: chunked\r\n\r\n" + chunk(body[:40]))
        else:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                         b"connection: close\r\n\r\n" + body[:40])
        await writer.drain()
        await asyncio.sleep(0.05)
        _reset(writer)
        return False

    up.script = script
    assert_error(post(hostile, key), 502, hostile, "upstream_error")


@pytest.mark.parametrize("status", [600, 999])
def test_status_outside_the_http_range(up: ScriptedUpstream, hostile: Proxy, key: str,
                                       status: int) -> None:
    up.script = answer(response(status, orjson.dumps(ANSWER)))
    assert_error(post(hostile, key), 502, hostile, "upstream_error")


@pytest.mark.parametrize("body", [b"[1, 2]", b'"text"', b"42", b"null"])
def test_json_that_is_not_an_object(up: ScriptedUpstream, hostile: Proxy, key: str,
                                    body: bytes) -> None:
    up.script = answer(response(200, body))
    assert_error(post(hostile, key), 502, hostile, "upstream_error")


BAD_CHOICES = [5, "x", {"index": 0}, [1], ["x"]]
SURFACE_PATHS = ["chat/completions", "responses", "messages"]


def _surface_request(path: str, stream: bool) -> dict[str, Any]:
    if path == "responses":
        return {"model": MODEL, "input": "hi", "stream": stream}
    if path == "messages":
        return {"model": MODEL, "max_tokens": 50, "messages": HELLO, "stream": stream}
    return {"model": MODEL, "messages": HELLO, "stream": stream}


@pytest.mark.parametrize("path", SURFACE_PATHS)
@pytest.mark.parametrize("choices", BAD_CHOICES)
def test_an_answer_whose_choices_are_not_a_list_of_objects(
        up: ScriptedUpstream, hostile: Proxy, key: str, choices: Any, path: str) -> None:
    up.script = answer(response(200, orjson.dumps({**ANSWER, "choices": choices})))
    r = httpx.post(f"{hostile.url}/{path}", timeout=60, json=_surface_request(path, False),
                   headers={"authorization": f"Bearer {key}"})
    assert r.status_code == 502, r.text
    assert hostile.row(r.headers["x-request-id"])["outcome"] == "upstream_error"


@pytest.mark.parametrize("path", SURFACE_PATHS)
@pytest.mark.parametrize("choices", BAD_CHOICES)
def test_a_stream_event_whose_choices_are_not_a_list_of_objects(
        up: ScriptedUpstream, hostile: Proxy, key: str, choices: Any, path: str) -> None:
    async def script(request: Request, writer: asyncio.StreamWriter) -> bool:
        bad = {"id": "cmpl-1", "object": "chat.completion.chunk", "choices": choices}
        events = [b"data: " + orjson.dumps(bad) + b"\n\n", *sse_events()]
        writer.write(sse_head() + b"".join(chunk(e) for e in events) + b"0\r\n\r\n")
        await writer.drain()
        return True

    up.script = script
    r = httpx.post(f"{hostile.url}/{path}", timeout=60, json=_surface_request(path, True),
                   headers={"authorization": f"Bearer {key}"})
    # The first event is unusable before any byte reached the client: a clean 502.
    assert r.status_code == 502, r.text
    assert hostile.row(r.headers["x-request-id"])["outcome"] == "upstream_error"


@pytest.mark.parametrize("status", [301, 302, 307])
def test_redirects_are_never_followed(up: ScriptedUpstream, hostile: Proxy, key: str,
                                      status: int) -> None:
    with ScriptedUpstream() as thief:
        up.script = answer(response(status, b"", f"location: {thief.url}/chat/completions"))
        assert_error(post(hostile, key), 502, hostile, "upstream_error")
        assert thief.requests == []  # the provider key went nowhere else
    assert len(up.requests) == 1


def _echo(status: int, shape: str, spell: Any = None) -> Any:
    """An upstream that echoes the Authorization header it received (spelt by `spell`)."""
    async def script(request: Request, writer: asyncio.StreamWriter) -> bool:
        auth = next(line.split(b":", 1)[1].strip().decode() for line in request.head.split(b"\r\n")
                    if line.lower().startswith(b"authorization:"))
        if shape == "answer":
            body = {**ANSWER, "choices": [{"index": 0, "finish_reason": "stop", "message": {
                "role": "assistant", "content": f"you sent {auth}"}}]}
        elif shape == "message":
            body = {"object": "error", "message": f"bad header {auth}", "type": "invalid",
                    "param": auth, "code": auth}
        else:
            body = {"detail": [{"loc": ["header", auth], "msg": f"echo {auth}"}]}
        raw = orjson.dumps(body)
        writer.write(response(status, spell(raw) if spell else raw))
        await writer.drain()
        return True
    return script


@pytest.mark.parametrize(("status", "shape"), [(200, "answer"), (422, "message"), (400, "detail")])
def test_echoed_provider_key_never_reaches_the_client(
        up: ScriptedUpstream, hostile: Proxy, key: str, status: int, shape: str) -> None:
    up.script = _echo(status, shape)
    r = post(hostile, key)
    assert r.status_code == status
    assert UPSTREAM_KEY not in r.text and "[redacted]" in r.text
    row = hostile.row(r.headers["x-request-id"])
    assert UPSTREAM_KEY not in str(row.values())


def _spelt(key: str) -> bytes:
    """`key` as JSON may spell it: every other character a `\\u00XX` escape, upper-case hex."""
    return "".join(f"\\u{ord(c):04X}" if i % 2 else c for i, c in enumerate(key)).encode()


@pytest.mark.parametrize(("status", "shape"), [(200, "answer"), (422, "message")])
def test_echoed_provider_key_spelt_in_escapes_never_reaches_the_client(
        up: ScriptedUpstream, hostile: Proxy, key: str, status: int, shape: str) -> None:
    up.script = _echo(status, shape, lambda raw: raw.replace(UPSTREAM_KEY.encode(),
                                                             _spelt(UPSTREAM_KEY)))
    r = post(hostile, key)
    assert r.status_code == status
    assert UPSTREAM_KEY not in str(r.json()) and "[redacted]" in str(r.json())
    assert UPSTREAM_KEY not in str(hostile.row(r.headers["x-request-id"]).values())


def test_escaped_key_in_any_field_of_a_stream_event_is_scrubbed(
        up: ScriptedUpstream, hostile: Proxy, key: str) -> None:
    """Not a text the stream scrub follows (the chunk's `id`): the whole-key scrub of the bytes
    that go out finds it decoded. An escaped backslash before `u0073` is not an escape: that
    event goes on as it came."""
    literal = b'"id":"\\\\u0073' + UPSTREAM_KEY[1:].encode() + b'"'
    events = sse_events()
    events[0] = events[0].replace(b'"id":"cmpl-1"', b'"id":"' + _spelt(UPSTREAM_KEY) + b'"')
    events[1] = events[1].replace(b'"id":"cmpl-1"', literal)

    async def script(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(sse_head() + b"".join(chunk(e) for e in events) + b"0\r\n\r\n")
        await writer.drain()
        return True

    up.script = script
    r = post(hostile, key, stream=True)
    data = [orjson.loads(line[6:]) for line in r.text.splitlines()
            if line.startswith("data: {")]
    assert [d["id"] for d in data] == ["[redacted]", "\\u0073" + UPSTREAM_KEY[1:]]
    assert literal in r.content and r.text.rstrip().endswith("data: [DONE]")


def test_usage_under_an_escaped_field_name_is_booked(up: ScriptedUpstream, hostile: Proxy,
                                                     key: str) -> None:
    """JSON may spell a field name with escapes; euroute reads what the JSON means, so an
    upstream cannot keep its usage out of the ledger by writing "u\\u0073age"."""
    async def script(request: Request, writer: asyncio.StreamWriter) -> bool:
        events = [e.replace(b'"usage"', b'"u\\u0073age"') for e in sse_events()]
        writer.write(sse_head() + b"".join(chunk(e) for e in events) + b"0\r\n\r\n")
        await writer.drain()
        return True

    up.script = script
    r = post(hostile, key, stream=True)
    assert r.status_code == 200
    row = hostile.row(r.headers["x-request-id"])
    assert (row["prompt_tokens"], row["completion_tokens"], row["usage_missing"]) == (7, 3, False)


def test_echoed_provider_key_in_a_stream_event(up: ScriptedUpstream, hostile: Proxy,
                                               key: str) -> None:
    async def script(request: Request, writer: asyncio.StreamWriter) -> bool:
        events = sse_events(text=f"Authorization: Bearer {UPSTREAM_KEY}")
        writer.write(sse_head() + b"".join(chunk(e) for e in events) + b"0\r\n\r\n")
        await writer.drain()
        return True

    up.script = script
    r = post(hostile, key, stream=True)
    assert r.status_code == 200 and UPSTREAM_KEY not in r.text
    assert "Bearer [redacted]" in r.text and r.text.rstrip().endswith("data: [DONE]")


def _drip(head: bytes, body: bytes, every_s: float) -> Any:
    async def script(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(head)
        for i in range(len(body)):
            await writer.drain()
            writer.write(body[i:i + 1])
            await asyncio.sleep(every_s)
        return False
    return script


def test_dripping_json_is_cut_at_the_total_deadline(up: ScriptedUpstream, hostile: Proxy,
                                                    key: str) -> None:
    limits(hostile, total_timeout_s=1.0, idle_timeout_s=30.0)
    body = orjson.dumps(ANSWER)
    up.script = _drip(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                      + str(len(body)).encode() + b"\r\n\r\n", body, 0.1)
    started = time.monotonic()
    assert_error(post(hostile, key), 504, hostile, "upstream_timeout")
    assert time.monotonic() - started < 5


def test_dripping_stream_without_a_whole_event_hits_the_idle_gap(
        up: ScriptedUpstream, hostile: Proxy, key: str) -> None:
    # Bytes keep coming (each read is fast) but no event completes: the gap between events counts.
    limits(hostile, idle_timeout_s=0.8, total_timeout_s=30.0)
    up.script = _drip(sse_head(), chunk(b"data: " + b"x" * 200), 0.05)
    started = time.monotonic()
    r = post(hostile, key, stream=True)
    assert_error(r, 504, hostile, "upstream_timeout")
    assert time.monotonic() - started < 5


def test_stalled_stream_after_first_event_ends_with_an_error_event(
        up: ScriptedUpstream, hostile: Proxy, key: str) -> None:
    limits(hostile, idle_timeout_s=0.5)

    async def script(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(sse_head() + chunk(sse_events()[0]))
        await writer.drain()
        await request.closed_by_peer(5)
        return False

    up.script = script
    r = post(hostile, key, stream=True)
    lines = [line for line in r.text.splitlines() if line.startswith("data: ")]
    assert len(lines) == 2 and orjson.loads(lines[1][6:])["error"]["code"] == "upstream_timeout"
    row = hostile.row(r.headers["x-request-id"])
    assert row["outcome"] == "upstream_timeout" and row["status"] == 504


def _socket_buffers() -> int:
    """The most a loopback connection can hold unread: the receiver's and the sender's largest
    kernel buffers (autotuned up to tcp_rmem and tcp_wmem's maxima; 32 + 4 MiB on some hosts)."""
    return sum(int(Path(f"/proc/sys/net/ipv4/{name}").read_text().split()[2])
               for name in ("tcp_rmem", "tcp_wmem"))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / MiB


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "until-close"])
def test_huge_json_answer_is_cut_at_the_limit_unbuffered(
        up: ScriptedUpstream, hostile: Proxy, key: str, declared: bool) -> None:
    limits(hostile, max_json_bytes=4 * MiB)
    bound = 4 * MiB + _socket_buffers() + 2 * MiB  # the limit, the kernel, one piece in flight
    total, sent = 4 * bound, [0]
    piece = b" " * MiB

    async def script(request: Request, writer: asyncio.StreamWriter) -> bool:
        length = f"content-length: {total}\r\n" if declared else "connection: close\r\n"
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                     + length.encode() + b"\r\n")
        while sent[0] < total:
            writer.write(piece)
            await writer.drain()  # raises once euroute closes the connection
            sent[0] += len(piece)
        return False

    up.script = script
    before = _rss_mb()
    assert_error(post(hostile, key), 502, hostile, "upstream_error")
    assert up.closed.wait(10)
    # euroute stopped reading near the limit: the rest is what the sockets' buffers held
    assert sent[0] < bound, (sent[0], bound)
    assert _rss_mb() - before < 64


def test_huge_sse_event_is_refused(up: ScriptedUpstream, hostile: Proxy, key: str) -> None:
    limits(hostile, max_event_bytes=MiB)
    bound = MiB + _socket_buffers() + 2 * MiB  # the limit, the kernel, one piece in flight
    sent = [0]

    async def script(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(sse_head() + chunk(b"data: "))
        while sent[0] < 2 * bound:
            writer.write(chunk(b"x" * MiB))
            await writer.drain()
            sent[0] += MiB
        return False

    up.script = script
    assert_error(post(hostile, key, stream=True), 502, hostile, "upstream_error")
    assert up.closed.wait(10)
    assert sent[0] < bound, (sent[0], bound)


def test_kept_alive_connection_closed_after_reading_the_request_sends_the_prompt_once(
        up: ScriptedUpstream, hostile: Proxy, key: str) -> None:
    served = [0]

    async def script(request: Request, writer: asyncio.StreamWriter) -> bool:
        served[0] += 1
        if served[0] == 1:  # the first answer keeps the connection alive for the pool
            writer.write(response(200, orjson.dumps(ANSWER)))
            await writer.drain()
            return True
        return False  # read the whole request, then close without answering

    up.script = script
    assert post(hostile, key).status_code == 200
    marker = "prompt-" + os.urandom(6).hex()
    r = httpx.post(f"{hostile.url}/chat/completions", timeout=60,
                   headers={"authorization": f"Bearer {key}"},
                   json={"model": MODEL, "messages": [{"role": "user", "content": marker}]})
    assert_error(r, 502, hostile, "upstream_error")
    carrying = [q for q in up.requests if marker.encode() in q.body]
    assert len(carrying) == 1  # never resent
    assert carrying[0].connection == up.requests[0].connection  # it was the reused connection


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_client_gone_while_upstream_stalls_closes_upstream_at_once(
        up: ScriptedUpstream, hostile: Proxy, key: str, stream: bool) -> None:
    arrived = asyncio.Event()

    async def script(request: Request, writer: asyncio.StreamWriter) -> bool:
        if stream:
            writer.write(sse_head() + chunk(sse_events()[0]))
            await writer.drain()
        arrived.set()
        await request.closed_by_peer(60)  # stalls until euroute closes the connection
        return False

    up.script = script
    body = orjson.dumps({"model": MODEL, "messages": HELLO, "stream": stream})
    with socket.create_connection(("127.0.0.1", int(hostile.origin.rsplit(":", 1)[1]))) as client:
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                       b"authorization: Bearer " + key.encode() + b"\r\n"
                       b"content-type: application/json\r\ncontent-length: "
                       + str(len(body)).encode() + b"\r\n\r\n" + body)
        asyncio.run_coroutine_threadsafe(asyncio.wait_for(arrived.wait(), 10), up.loop).result(15)
        if stream:
            head = client.recv(65536)
            assert b" 200 " in head.split(b"\r\n", 1)[0]
    started = time.monotonic()
    assert up.closed.wait(5), "euroute kept the upstream connection open"
    assert time.monotonic() - started < 3
    row = last_row(hostile)
    assert row["outcome"] == "client_cancelled" and row["status"] == 499
    # the prompt reached the route: the row says where, and that its cost is unknown
    assert row["route"] == "mistral-eu-magistral-small" and row["usage_missing"] is True


def last_row(proxy: Proxy, timeout: float = 10.0) -> dict[str, Any]:
    """The newest ledger row once it is client_cancelled (the client never saw its request id)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = run(ledger_rows(proxy.settings.database_url, ledger.c.app == "hostile-app"))
        if (rows and rows[-1]["outcome"] == "client_cancelled") or time.monotonic() > deadline:
            return rows[-1]
        time.sleep(0.05)


def test_impossible_usage_is_an_upstream_error_and_never_booked(
        up: ScriptedUpstream, hostile: Proxy, key: str) -> None:
    for usage in ({"prompt_tokens": -500_000_000, "completion_tokens": 1},
                  {"prompt_tokens": 1e17, "completion_tokens": 1},
                  {"prompt_tokens": 2**40, "completion_tokens": 1},
                  {"prompt_tokens": 5, "completion_tokens": "many"},
                  {"prompt_tokens": True, "completion_tokens": 1}):
        up.script = answer(response(200, orjson.dumps({**ANSWER, "usage": usage})), keep=True)
        assert_error(post(hostile, key), 502, hostile, "upstream_error")


def test_impossible_usage_in_a_stream_is_never_booked(up: ScriptedUpstream, hostile: Proxy,
                                                      key: str) -> None:
    async def script(request: Request, writer: asyncio.StreamWriter) -> bool:
        events = sse_events(usage={"prompt_tokens": -10**9, "completion_tokens": -10**9})
        writer.write(sse_head() + b"".join(chunk(e) for e in events) + b"0\r\n\r\n")
        await writer.drain()
        return True

    up.script = script
    r = post(hostile, key, stream=True, stream_options={"include_usage": True})
    assert "data: [DONE]" not in r.text
    row = hostile.row(r.headers["x-request-id"])
    assert row["outcome"] == "upstream_error" and row["prompt_tokens"] == 0
    assert row["cost_nanos"] == 0


def test_done_inside_model_text_does_not_end_the_stream(up: ScriptedUpstream, hostile: Proxy,
                                                        key: str) -> None:
    async def script(request: Request, writer: asyncio.StreamWriter) -> bool:
        events = sse_events(text="say\n\ndata: [DONE]\n\nnow")
        writer.write(sse_head() + b"".join(chunk(e) for e in events[:1]) + b"0\r\n\r\n")
        await writer.drain()
        return True  # cut after the first event: no real [DONE]

    up.script = script
    r = post(hostile, key, stream=True)
    lines = [line for line in r.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] != "data: [DONE]"
    assert orjson.loads(lines[-1][6:])["error"]["code"] == "stream_cut"
    assert hostile.row(r.headers["x-request-id"])["outcome"] == "stream_cut"


def test_include_usage_chunk_is_its_own_event(up: ScriptedUpstream, hostile: Proxy,
                                              key: str) -> None:
    async def script(request: Request, writer: asyncio.StreamWriter) -> bool:
        # all events in one write, CRLF line ends, the last one without its blank line
        events = [e.replace(b"\n", b"\r\n") for e in sse_events()]
        events[-1] = b"data: [DONE]\r\n"
        writer.write(response(200, b"".join(events), content_type="text/event-stream"))
        await writer.drain()
        return True

    up.script = script
    r = post(hostile, key, stream=True, stream_options={"include_usage": True})
    # events that need no change are relayed as they came, CRLF line ends included
    assert sse_events()[0].replace(b"\n", b"\r\n") in r.content
    datas = [e for e in r.text.replace("\r\n", "\n").split("\n\n") if e.strip()]
    assert datas[-1] == "data: [DONE]"
    usage_chunk = orjson.loads(datas[-2][6:])
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["prompt_tokens"] == 7
    assert [orjson.loads(d[6:])["choices"][0]["delta"].get("content") for d in datas[:1]] == \
        ["Bonjour"]
    row = hostile.row(r.headers["x-request-id"])
    assert row["outcome"] == "ok" and row["prompt_tokens"] == 7


def test_fall_over_records_every_attempt(scripted: ScriptedUpstream, tmp_path: Path) -> None:
    """Two routes: a broken answer from the first falls over to the second; both are recorded."""
    with ScriptedUpstream() as second:
        url, drop = new_database("sqlite", tmp_path)
        saved = {k: os.environ.get(k) for k in ("MISTRAL_BASE_URL", "SELFHOSTED_BASE_URL",
                                                 "SELFHOSTED_API_KEY")}
        os.environ.update(MISTRAL_BASE_URL=second.url, SELFHOSTED_BASE_URL=scripted.url,
                          SELFHOSTED_API_KEY="sk-selfhosted-test")
        try:
            with Proxy(proxy_settings(url, copy_policies(tmp_path / "p"))) as server:
                key = server.key("fallover")
                scripted.reset(answer(response(999, b"{}")))
                second.reset()
                r = post(server, key, stream=True)
                assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
                assert r.headers["x-euroute-route"] == "mistral-eu-magistral-small"
                row = server.row(r.headers["x-request-id"])
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            scripted.reset()
            drop()
    tried = orjson.loads(row["decision"])["tried"]
    assert tried == [{"route": "selfhosted-eu-magistral-small", "outcome": "upstream_error"},
                     {"route": "mistral-eu-magistral-small", "outcome": "ok"}]
    assert row["route"] == "mistral-eu-magistral-small" and row["outcome"] == "ok"
