"""The few ASGI pieces the HTTP surface shares: types, JSON replies, bounded body reads."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from proxy.errors import BadRequest, EurouteError, PayloadTooLarge

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

JSON = (b"content-type", b"application/json")
SSE = (b"content-type", b"text/event-stream")


def new_request_id() -> str:
    """A new request's id: in its `x-request-id`, its log lines and its ledger row."""
    return "req_" + os.urandom(12).hex()


async def send_json(send: Send, status: int, body: bytes,
                    headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [JSON, (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, exc: EurouteError,
                     headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    await send_json(send, exc.status, exc.render(), [*headers, *exc.headers()])


async def read_body(receive: Receive, headers: dict[bytes, bytes], limit: int) -> bytes:
    declared = headers.get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is larger than the {limit} byte limit")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequest("client disconnected before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is larger than the {limit} byte limit")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class DisconnectWatch:
    """Cancels the request's task as soon as the client goes away, while armed.

    Uvicorn drops writes to a gone client silently; only `receive()` tells of a disconnect.
    Waiting on an upstream that stalls, the request would otherwise hold the upstream
    connection until a timeout. Arm it once the body is read; disarm it before the last send
    (a finished response also makes `receive()` report a disconnect).
    """

    __slots__ = ("_task", "_watcher", "gone")

    def __init__(self, receive: Receive) -> None:
        self.gone = False
        self._task = asyncio.current_task()
        self._watcher = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        if self._task is not None:
            self._task.cancel()

    def disarm(self) -> None:
        self._watcher.cancel()

    def cancelled_by_client(self) -> bool:
        """In an `except CancelledError`: True (and the cancel absorbed) when this watch caused it
        and nothing else asked the task to stop."""
        if not self.gone or self._task is None:
            return False
        return self._task.uncancel() == 0


def header_values(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """Every value of a header, in order: a field may be sent several times (RFC 9110 5.3)."""
    return [v for k, v in headers if k == name]


def single_header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """A header that cannot be a list: copies that differ are refused, since which one wins
    differs from one proxy to the next."""
    values = header_values(headers, name)
    if len(set(values)) > 1:
        raise BadRequest(f"the {name.decode()} header is sent more than once with different "
                         "values", param=name.decode(), code="conflicting_headers")
    return values[0] if values else None
