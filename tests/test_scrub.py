"""A provider key that a stream cuts across events never reaches the client whole: an upstream
on loopback echoes the key euroute sent it, in pieces, and the real SDKs read euroute's stream
on each surface. Ordinary streams still go on byte for byte."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest

from proxy.scrub import HOLD, MARK
from tests.conftest import Proxy, copy_policies, new_database, proxy_settings
from tests.fake_mistral import UPSTREAM_KEY
from tests.scripted import Request, ScriptedUpstream, chunk, sse_head

MODEL = "magistral-small-2509"
HELLO = [{"role": "user", "content": "Hi"}]
BEFORE, AFTER = "Your key is ", " - keep it safe."
USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
SURFACES = ("chat", "responses", "messages")
FIELDS = ("text", "thinking", "tool")


@pytest.fixture(scope="module")
def scripted() -> Iterator[ScriptedUpstream]:
    with ScriptedUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def relaying(scripted: ScriptedUpstream, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Proxy]:
    tmp = tmp_path_factory.mktemp("scrub")
    url, drop = new_database("sqlite", tmp)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MISTRAL_BASE_URL", scripted.url)
        with Proxy(proxy_settings(url, copy_policies(tmp / "policies"))) as server:
            yield server
    drop()


@pytest.fixture(scope="module")
def key(relaying: Proxy) -> str:
    return relaying.key("scrub-app")


def event(delta: dict[str, Any], encode: Callable[[Any], bytes] = orjson.dumps, **extra: Any
          ) -> bytes:
    body = {"id": "cmpl-1", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": None}], **extra}
    return b"data: " + encode(body) + b"\n\n"


def delta(field: str, text: str) -> dict[str, Any]:
    """A piece of the answer text, of Magistral's thinking (a content chunk), or of the
    arguments of tool call 0 (which the scrub needs not be JSON)."""
    if field == "text":
        return {"content": text}
    if field == "tool":
        return {"tool_calls": [{"index": 0, "function": {"arguments": text}}]}
    return {"content": [{"type": "thinking", "thinking": [{"type": "text", "text": text}]}]}


def tool_call(index: int, arguments: str) -> dict[str, Any]:
    """The first delta of tool call `index`, as OpenAI streams it."""
    return {"role": "assistant", "tool_calls": [{
        "index": index, "id": f"call_{index}", "type": "function",
        "function": {"name": "remember", "arguments": arguments}}]}


def echo(pieces: Callable[[str], list[str]], field: str = "text", done: bool = True,
         encode: Callable[[Any], bytes] = orjson.dumps) -> Any:
    """An upstream that streams the key it was sent (from Authorization), in `pieces(key)`,
    one event each, then the usage, then `[DONE]` (or just ends, when not `done`)."""
    async def script(request: Request, writer: asyncio.StreamWriter) -> bool:
        auth = next(line.split(b":", 1)[1].strip().decode() for line in request.head.split(b"\r\n")
                    if line.lower().startswith(b"authorization:"))
        events = [event(delta(field, p), encode) for p in pieces(auth.removeprefix("Bearer "))]
        if field == "tool":
            events.insert(0, event(tool_call(0, "")))
        events.append(event({"content": ""}, usage=USAGE))
        writer.write(sse_head())
        for e in [*events, b"data: [DONE]\n\n"] if done else events:
            writer.write(chunk(e))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True
    return script


def read(proxy: Proxy, key: str, surface: str) -> tuple[str, str, str, str, str]:
    """What a client of `surface` reads of the stream, through its SDK: (text, thinking, the
    arguments of its tool call, everything it got, serialised, x-request-id). Checks the stream
    ended with its usage."""
    if surface == "messages":
        with anthropic.Anthropic(base_url=proxy.origin, api_key=key) as claude:
            raw = claude.messages.with_raw_response.create(
                model=MODEL, max_tokens=50, messages=HELLO, stream=True)  # type: ignore[arg-type]
            events: list[Any] = list(raw.parse())
        deltas = [e.delta for e in events if e.type == "content_block_delta"]
        text = "".join(d.text for d in deltas if d.type == "text_delta")
        thinking = "".join(d.thinking for d in deltas if d.type == "thinking_delta")
        arguments = "".join(d.partial_json for d in deltas if d.type == "input_json_delta")
        assert events[-1].type == "message_stop" and events[-2].usage.output_tokens == 3
    else:
        with openai.OpenAI(base_url=proxy.url, api_key=key) as client:
            if surface == "chat":
                raw = client.chat.completions.with_raw_response.create(
                    model=MODEL, messages=HELLO, stream=True,  # type: ignore[arg-type]
                    stream_options={"include_usage": True})
                events = list(raw.parse())
                text = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
                thinking = "".join(getattr(e.choices[0].delta, "reasoning_content", None) or ""
                                   for e in events if e.choices)
                # Joined by tool-call index, as the SDK's own accumulator does.
                arguments = "".join(c.function.arguments or "" for e in events if e.choices
                                    for c in e.choices[0].delta.tool_calls or ()
                                    if c.index == 0 and c.function)
                assert events[-1].usage.completion_tokens == 3 and not events[-1].choices
            else:
                raw = client.responses.with_raw_response.create(model=MODEL, input="Hi",
                                                                stream=True)
                events = list(raw.parse())
                text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
                thinking = "".join(e.delta for e in events
                                   if e.type == "response.reasoning_text.delta")
                arguments = "".join(e.delta for e in events
                                    if e.type == "response.function_call_arguments.delta")
                assert events[-1].type == "response.completed"
                assert events[-1].response.usage.output_tokens == 3
    request_id = raw.headers["x-request-id"]
    row = proxy.row(request_id)
    assert (row["outcome"], row["prompt_tokens"], row["completion_tokens"]) == ("ok", 7, 3)
    return text, thinking, arguments, str([e.model_dump() for e in events]), request_id


def assert_marked(got: str, key: str, before: str = BEFORE, after: str = AFTER) -> None:
    """`got` is `before`, at most HOLD - 1 first characters of the key, the mark, `after`."""
    head, mark, tail = got.partition(MARK)
    shown = head.removeprefix(before)
    assert mark and tail == after and head.startswith(before), got
    assert len(shown) < HOLD and key.startswith(shown), got


def texts(proxy: Proxy, key: str, surface: str) -> tuple[dict[str, str], str]:
    """What the client read of each text ("text", "thinking", "tool": the arguments of tool
    call 0), and everything it got, serialised."""
    *joined, everything, _ = read(proxy, key, surface)
    return dict(zip(FIELDS, joined, strict=True)), everything


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("surface", SURFACES)
@pytest.mark.parametrize("cut", [1, HOLD - 1, HOLD, 15])
def test_a_key_cut_in_two_never_reaches_the_client(
        scripted: ScriptedUpstream, relaying: Proxy, key: str, surface: str, field: str,
        cut: int) -> None:
    scripted.reset(echo(lambda k: [BEFORE + k[:cut], k[cut:] + AFTER], field))
    got, everything = texts(relaying, key, surface)
    assert UPSTREAM_KEY not in everything
    assert_marked(got.pop(field), UPSTREAM_KEY)
    assert set(got.values()) == {""}


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("surface", SURFACES)
@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_a_key_in_many_pieces_never_reaches_the_client(
        scripted: ScriptedUpstream, relaying: Proxy, key: str, surface: str, field: str,
        size: int) -> None:
    scripted.reset(echo(lambda k: [BEFORE, *(k[i:i + size] for i in range(0, len(k), size)),
                                   AFTER], field))
    got, everything = texts(relaying, key, surface)
    assert UPSTREAM_KEY not in everything
    assert_marked(got[field], UPSTREAM_KEY)


def test_each_tool_call_is_followed_on_its_own(
        scripted: ScriptedUpstream, relaying: Proxy, key: str) -> None:
    """Two calls streamed in turns, each with a key cut over its pieces; a chat client joins
    each call's arguments by its index."""
    async def script(request: Request, writer: asyncio.StreamWriter) -> bool:
        k = UPSTREAM_KEY
        calls = [tool_call(0, BEFORE + k[:5]), tool_call(1, BEFORE + k[:9])]
        calls += [{"tool_calls": [{"index": i, "function": {"arguments": a}}]}
                  for i, a in [(0, k[5:9]), (1, k[9:] + AFTER), (0, k[9:] + AFTER)]]
        events = [event(d) for d in calls] + [event({}, usage=USAGE), b"data: [DONE]\n\n"]
        writer.write(sse_head() + b"".join(chunk(e) for e in events) + b"0\r\n\r\n")
        await writer.drain()
        return True

    scripted.reset(script)
    with openai.OpenAI(base_url=relaying.url, api_key=key) as client:
        events = list(client.chat.completions.create(model=MODEL, messages=HELLO, stream=True))
    joined = ["", ""]
    for e in events:
        for c in e.choices[0].delta.tool_calls or ():
            if c.function:
                joined[c.index] += c.function.arguments or ""
    assert UPSTREAM_KEY not in str([e.model_dump() for e in events])
    for arguments in joined:
        assert_marked(arguments, UPSTREAM_KEY)


def test_a_key_in_json_escapes_is_found(scripted: ScriptedUpstream, relaying: Proxy,
                                       key: str) -> None:
    """Every character of the key written as `\\uXXXX`: the client decodes them, so does the
    scrub."""
    def escaping(value: Any) -> bytes:
        raw = orjson.dumps(value)
        for part in (UPSTREAM_KEY[:5], UPSTREAM_KEY[5:]):
            raw = raw.replace(part.encode(), "".join(f"\\u{ord(c):04x}" for c in part).encode())
        return raw

    scripted.reset(echo(lambda k: [BEFORE + k[:5], k[5:] + AFTER], encode=escaping))
    text, _, _, everything, _ = read(relaying, key, "chat")
    assert UPSTREAM_KEY not in everything
    assert_marked(text, UPSTREAM_KEY)
    scripted.reset(echo(lambda k: [BEFORE + k[:5] + k[5:] + AFTER], encode=escaping))
    assert read(relaying, key, "chat")[0] == BEFORE + MARK + AFTER


@pytest.mark.parametrize("field", ["text", "tool"])
@pytest.mark.parametrize("surface", SURFACES)
def test_a_key_cut_short_by_the_end_of_the_stream_is_marked(
        scripted: ScriptedUpstream, relaying: Proxy, key: str, surface: str, field: str) -> None:
    scripted.reset(echo(lambda k: [BEFORE, k[:9]], field))
    got, everything = texts(relaying, key, surface)
    assert UPSTREAM_KEY[:9] not in everything
    assert_marked(got[field], UPSTREAM_KEY, after="")


def test_a_key_cut_short_by_a_failing_stream_is_marked(
        scripted: ScriptedUpstream, relaying: Proxy, key: str) -> None:
    scripted.reset(echo(lambda k: [BEFORE, k[:9]], done=False))
    text = ""
    with openai.OpenAI(base_url=relaying.url, api_key=key) as client:
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=HELLO, stream=True)  # type: ignore[arg-type]
        with pytest.raises(openai.APIError, match="ended before"):
            for e in raw.parse():
                text += e.choices[0].delta.content or ""
    assert_marked(text, UPSTREAM_KEY, after="")
    row = relaying.row(raw.headers["x-request-id"])
    assert (row["outcome"], row["completion_tokens"]) == ("stream_cut", 3)


def test_text_that_only_begins_like_a_key_is_held_then_given_back_whole(
        scripted: ScriptedUpstream, relaying: Proxy, key: str) -> None:
    scripted.reset(echo(lambda k: ["Run sk-up", "grade, then ", k[:6], "!", "sk-upl", "oad."]))
    assert read(relaying, key, "chat")[0] == "Run sk-upgrade, then sk-ups!sk-upload."


@pytest.mark.parametrize("field", ["text", "tool"])
def test_an_ordinary_stream_goes_on_byte_for_byte(
        scripted: ScriptedUpstream, relaying: Proxy, key: str, field: str) -> None:
    """Text or tool-call arguments ending in fewer than HOLD first characters of the key
    (`sk-upstream-test`), or holding more of them inside, are relayed as they came; events
    encoded as Python does (spaces, `\\u` escapes) show any re-encoding."""
    pieces = ["Les clés", " of tasks", " we ask", " about sk-", "x and desk-unit, ", "done."]
    def python(value: Any) -> bytes:
        return json.dumps(value).encode()

    events = [event(delta(field, p), python) for p in pieces]
    assert b"\\u00e9" in events[0] and b'sk-"' in events[3]
    if field == "tool":
        events.insert(0, event(tool_call(0, '{"note": "'), python))
    events += [event({"content": ""}, usage=USAGE), b"data: [DONE]\n\n"]

    async def script(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(sse_head() + b"".join(chunk(e) for e in events) + b"0\r\n\r\n")
        await writer.drain()
        return True

    scripted.reset(script)
    r = httpx.post(f"{relaying.url}/chat/completions", headers={"authorization": f"Bearer {key}"},
                   json={"model": MODEL, "messages": HELLO, "stream": True}, timeout=30)
    assert r.content == b"".join(events)
    row = relaying.row(r.headers["x-request-id"])
    assert (row["outcome"], row["prompt_tokens"], row["completion_tokens"]) == ("ok", 7, 3)
