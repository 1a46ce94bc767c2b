"""A scripted upstream on loopback: raw asyncio, so a test can send any bytes, right or wrong.

Each test sets `server.script`, a coroutine `(request, writer) -> keep_alive`; requests are
recorded with the connection they came on. Without a script the answer is a normal Mistral
chat completion (JSON or SSE, as the request asks).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

ANSWER = {"id": "cmpl-1", "object": "chat.completion", "created": 1, "model": "magistral-small-2509",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "Bonjour"},
                       "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}


@dataclass
class Request:
    connection: int
    head: bytes
    body: bytes
    reader: asyncio.StreamReader  # to notice euroute closing the connection

    async def closed_by_peer(self, within_s: float) -> None:
        await asyncio.wait_for(self.reader.read(1), within_s)

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)


Script = Callable[[Request, asyncio.StreamWriter], Awaitable[bool]]


def response(status: int, body: bytes, *extra: str, content_type: str = "application/json"
             ) -> bytes:
    head = [f"HTTP/1.1 {status} X", f"content-type: {content_type}",
            f"content-length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def chunk(event: bytes) -> bytes:
    return f"{len(event):x}\r\n".encode() + event + b"\r\n"


def sse_head(*extra: str) -> bytes:
    return ("\r\n".join(["HTTP/1.1 200 OK", "content-type: text/event-stream",
                         "transfer-encoding: chunked", *extra]) + "\r\n\r\n").encode()


def sse_events(text: str = "Bonjour", usage: dict[str, Any] | None = None) -> list[bytes]:
    base = {"id": "cmpl-1", "object": "chat.completion.chunk", "created": 1,
            "model": "magistral-small-2509"}
    first = {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": text},
                                  "finish_reason": None}]}
    last = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            "usage": usage or {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}
    return [b"data: " + orjson.dumps(first) + b"\n\n", b"data: " + orjson.dumps(last) + b"\n\n",
            b"data: [DONE]\n\n"]


async def normal(request: Request, writer: asyncio.StreamWriter) -> bool:
    if request.json.get("stream"):
        writer.write(sse_head() + b"".join(chunk(e) for e in sse_events()) + b"0\r\n\r\n")
    else:
        writer.write(response(200, orjson.dumps(ANSWER)))
    await writer.drain()
    return True


class LoopbackServer:
    """A raw asyncio server on a loopback port, its loop in a thread of its own.

    Stopping it ends every connection still open first, so no socket outlives its loop.
    """

    tls: ssl.SSLContext | None = None

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._handlers: set[asyncio.Task[None]] = set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self._handlers.discard(task)
            await closed(writer)

    def start(self) -> int:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.tls), self.loop).result()
        self.port: int = self._server.sockets[0].getsockname()[1]
        return self.port

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            self._server.close()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


async def closed(writer: asyncio.StreamWriter) -> None:
    """Close a connection and wait until its socket is released (a peer may be gone already)."""
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()


class ScriptedUpstream(LoopbackServer):
    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        super().__init__()
        self.tls = tls
        self.script: Script | None = None
        self.requests: list[Request] = []
        self.closed = threading.Event()  # set whenever a connection ends
        self._connections = 0

    def __enter__(self) -> ScriptedUpstream:
        port = self.start()
        self.url = f"https://localhost:{port}/v1" if self.tls else f"http://127.0.0.1:{port}/v1"
        return self

    def reset(self, script: Script | None = None) -> None:
        self.script = script
        self.requests.clear()
        self.closed.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections += 1
        connection = self._connections
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                request = Request(connection, head, await reader.readexactly(length), reader)
                self.requests.append(request)
                if not await (self.script or normal)(request, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            await closed(writer)
            self.closed.set()
