"""The upstream that tests point euroute at: the sandbox, recorded, with faults on demand.

`FakeMistral` is an ASGI app wrapping `proxy.sandbox` and a loopback uvicorn server for it
(a real socket, because only a real server proves streaming). Every request is recorded in
`received`, so a test can assert what euroute sent upstream. Faults are armed between
requests and each fires once:

    fail_next(status, body)  the next request gets that Mistral error (calls queue up)
    delay_next(seconds)      the next request waits before answering
    cut_stream_after(n)      the next stream stops after n events, connection dropped
    omit_usage_next()        the next response carrying usage (JSON or stream) loses it
    answer_next(text, ...)   the next valid chat request is answered with this text, after a
                             thinking chunk when `thinking` is given, with tool calls when given
                             (Magistral's shape, JSON or SSE as the request asked)
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import threading
import time
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import orjson
import uvicorn

from proxy import sandbox

UPSTREAM_KEY = "sk-upstream-test"


@dataclass(frozen=True)
class ReceivedRequest:
    method: str
    path: str
    headers: dict[str, str]  # names lowercased
    json: Any  # parsed body, None when empty or not JSON
    raw: bytes


@dataclass(frozen=True)
class Script:
    """A scripted chat answer: thinking (optional), then text, then tool calls (optional)."""

    text: str
    thinking: str | None = None
    tool_calls: tuple[dict[str, Any], ...] = ()
    usage: tuple[int, int] = (21, 13)

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.tool_calls else "stop"

    def usage_json(self) -> dict[str, int]:
        prompt, completion = self.usage
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def pieces(self, text: str) -> list[str]:
        """The text in three pieces, as a stream carries it."""
        third = max(1, len(text) // 3)
        return [text[i:i + third] for i in range(0, len(text), third)] or [""]

    def tool_calls_json(self) -> list[dict[str, Any]]:
        return [{"id": c.get("id", f"call{i}"), "type": "function", "index": i,
                 "function": {"name": c["name"], "arguments": c["arguments"]}}
                for i, c in enumerate(self.tool_calls)]

    def mistral_json(self, head: dict[str, Any]) -> dict[str, Any]:
        content: Any = self.text
        if self.thinking is not None:
            content = [sandbox._thinking_chunk(self.thinking), {"type": "text", "text": self.text}]
        message = {"role": "assistant", "content": content,
                   "tool_calls": self.tool_calls_json() or None}
        return {**head, "object": "chat.completion", "usage": self.usage_json(), "choices": [
            {"index": 0, "message": message, "finish_reason": self.finish_reason}]}

    def mistral_deltas(self) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
        if self.thinking is not None:
            deltas += [{"content": [sandbox._thinking_chunk(p)]} for p in self.pieces(self.thinking)]
        deltas += [{"content": p} for p in self.pieces(self.text)]
        if self.tool_calls:
            deltas.append({"content": "", "tool_calls": self.tool_calls_json()})
        return deltas


class _StreamCut(Exception):
    """Raised into the sandbox to stop it mid-stream."""


class FakeMistral:
    def __init__(self, *, api_key: str | None = UPSTREAM_KEY, stream_chunks: int = 5,
                 delay_s: float = 0.0) -> None:
        self.api_key = api_key
        self.received: list[ReceivedRequest] = []
        self._app = sandbox.create_sandbox(
            api_key=api_key, stream_chunks=stream_chunks, delay_s=delay_s)
        # Tests arm faults from their thread while the server thread consumes them.
        self._lock = threading.Lock()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._port = 0
        self._failures: deque[tuple[int, dict[str, Any]]] = deque()
        self._delay = 0.0
        self._cut_after: int | None = None
        self._omit_usage = False
        self._script: Script | None = None

    # -- fault injection ------------------------------------------------------------------

    def fail_next(self, status: int, body: dict[str, Any] | None = None) -> None:
        if not 400 <= status <= 599:
            raise ValueError(f"fail_next needs an error status, got {status}")
        if body is None:
            kind = "rate_limited" if status == 429 else (
                "invalid_request_error" if status < 500 else "internal_server_error")
            body = sandbox.mistral_error(http.HTTPStatus(status).phrase, kind)
        with self._lock:
            self._failures.append((status, body))

    def delay_next(self, seconds: float) -> None:
        with self._lock:
            self._delay = seconds

    def cut_stream_after(self, n: int) -> None:
        with self._lock:
            self._cut_after = n

    def omit_usage_next(self) -> None:
        with self._lock:
            self._omit_usage = True

    def answer_next(self, text: str, *, thinking: str | None = None,
                    tool_calls: list[dict[str, Any]] | None = None,
                    usage: tuple[int, int] = (21, 13)) -> None:
        """`tool_calls`: [{"name": ..., "arguments": json text, "id": optional}]."""
        with self._lock:
            self._script = Script(text, thinking, tuple(tool_calls or ()), usage)

    def reset(self) -> None:
        with self._lock:
            self._script = None
            self.received.clear()
            self._failures.clear()
            self._delay = 0.0
            self._cut_after = None
            self._omit_usage = False

    @property
    def last(self) -> ReceivedRequest:
        return self.received[-1]

    # -- the loopback server --------------------------------------------------------------

    def start(self) -> FakeMistral:
        if self._server is not None:
            raise RuntimeError("FakeMistral is already running")
        config = uvicorn.Config(
            self, host="127.0.0.1", port=0, lifespan="off", ws="none", access_log=False,
            log_config=None,  # leave the test process's logging configuration alone
            log_level="warning", timeout_graceful_shutdown=2,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name="fake-mistral", daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                raise RuntimeError("FakeMistral: uvicorn did not start")
            time.sleep(0.005)
        self._server, self._thread = server, thread
        self._port = server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._server = self._thread = None

    @property
    def origin(self) -> str:
        """Scheme, host and port: the `server_url` of the mistralai SDK."""
        if self._server is None:
            raise RuntimeError("FakeMistral is not running; call start() first")
        return f"http://127.0.0.1:{self._port}"

    @property
    def url(self) -> str:
        """The base URL with /v1, as in MISTRAL_BASE_URL."""
        return f"{self.origin}/v1"

    def __enter__(self) -> FakeMistral:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _take(self, name: str, empty: Any) -> Any:
        with self._lock:
            value = getattr(self, name)
            setattr(self, name, empty)
            return value

    # -- ASGI -----------------------------------------------------------------------------

    async def __call__(self, scope: sandbox.Scope, receive: sandbox.Receive,
                       send: sandbox.Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        if (raw := await sandbox.read_body(receive)) is None:
            return
        try:
            parsed = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            parsed = None
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        self.received.append(ReceivedRequest(scope["method"], scope["path"], headers, parsed, raw))

        # Faults armed for the next request are taken as it arrives: a request still delayed
        # when its test ended must not take the next test's.
        with self._lock:
            failure = self._failures.popleft() if self._failures else None
        script = self._take("_script", None) if failure is None \
            and scope["path"].endswith("/chat/completions") else None
        if delay := self._take("_delay", 0.0):
            await asyncio.sleep(delay)
        if failure is not None:
            await sandbox.send_json(send, *failure)
            return

        replayed = False

        async def replay() -> sandbox.Message:
            nonlocal replayed
            if replayed:  # after the body, the sandbox may only wait for a disconnect
                return await receive()
            replayed = True
            return {"type": "http.request", "body": raw, "more_body": False}

        if script is not None:
            # The upstream still validates the request; a valid one gets the scripted answer.
            await self._app(scope, replay, _Scripted(self, send, script, parsed).send)
            return
        # Returning mid-response after a cut makes uvicorn close the socket: a dropped upstream.
        with contextlib.suppress(_StreamCut):
            await self._app(scope, replay, _Rewriter(self, send).send)

    # -- the answer's shape (FakeOpenAI answers in OpenAI's) ------------------------------

    def scripted_json(self, script: Script, head: dict[str, Any]) -> dict[str, Any]:
        return script.mistral_json(head)

    def scripted_events(self, script: Script, head: dict[str, Any], request: Any
                        ) -> list[dict[str, Any]]:
        """The data events of a scripted stream; usage rides on the last, as Mistral's does."""
        deltas = script.mistral_deltas()
        events = [{**head, "object": "chat.completion.chunk",
                   "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
        events[-1]["choices"][0]["finish_reason"] = script.finish_reason
        events[-1]["usage"] = script.usage_json()
        return events


class _Scripted:
    """Swallows the upstream's own answer to a valid request and sends the script instead."""

    def __init__(self, fake: FakeMistral, send: sandbox.Send, script: Script, request: Any
                 ) -> None:
        self.fake, self._send, self.script, self.request = fake, send, script, request
        self.relay = False

    async def send(self, message: sandbox.Message) -> None:
        if message["type"] == "http.response.start":
            self.relay = message["status"] != 200  # a validation error goes out as it is
            if self.relay:
                await self._send(message)
            return
        if self.relay:
            await self._send(message)
        elif not message.get("more_body"):
            await self._answer()

    async def _answer(self) -> None:
        head = {"id": "cmpl-scripted", "created": int(time.time()),
                "model": self.request["model"]}
        if not self.request.get("stream"):
            await sandbox.send_json(send=self._send, status=200,
                                    payload=self.fake.scripted_json(self.script, head))
            return
        await self._send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
        for event in self.fake.scripted_events(self.script, head, self.request):
            await self._send({"type": "http.response.body", "more_body": True,
                              "body": b"data: " + orjson.dumps(event) + b"\n\n"})
        await self._send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


class _Rewriter:
    """Applies the cut and omit-usage faults to one response on its way out."""

    def __init__(self, fake: FakeMistral, send: sandbox.Send) -> None:
        self.fake, self._send = fake, send
        self.start: sandbox.Message | None = None
        self.stream = False
        self.cut_after: int | None = None
        self.events = 0
        self.body = b""

    async def send(self, message: sandbox.Message) -> None:
        if message["type"] == "http.response.start":
            self.stream = dict(message["headers"]).get(b"content-type") == b"text/event-stream"
            if not self.stream:
                self.start = message  # held back: dropping usage changes content-length
                return
            self.cut_after = self.fake._take("_cut_after", None)
            await self._send(message)
        elif self.stream:
            await self._stream_event(message)
        else:
            self.body += message.get("body", b"")
            if not message.get("more_body"):
                await self._send_json()

    async def _send_json(self) -> None:
        if self.start is None:
            raise RuntimeError("response body before http.response.start")
        payload = orjson.loads(self.body)
        if "usage" in payload and self.fake._take("_omit_usage", False):
            del payload["usage"]
            self.body = orjson.dumps(payload)
        headers = [(k, v) for k, v in self.start["headers"] if k != b"content-length"]
        headers.append((b"content-length", str(len(self.body)).encode()))
        await self._send({**self.start, "headers": headers})
        await self._send({"type": "http.response.body", "body": self.body})

    async def _stream_event(self, message: sandbox.Message) -> None:
        if self.cut_after is not None and self.events >= self.cut_after:
            raise _StreamCut
        self.events += 1
        body = message.get("body", b"")
        if body.startswith(b"data: {") and b'"usage"' in body:
            event = orjson.loads(body[len(b"data: "):])
            if "usage" in event and self.fake._take("_omit_usage", False):
                del event["usage"]
                message = {**message, "body": b"data: " + orjson.dumps(event) + b"\n\n"}
        await self._send(message)
