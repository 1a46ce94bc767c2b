"""The floor the benchmark measures euroute against: `uvicorn passthrough_app:create --factory`.

A bare pass-through on the same stack as euroute (uvicorn, uvloop, httptools, the transport
euroute's `Upstream` would use for this URL) with no authentication, policy, translation, SSE
parsing or ledger: POST bodies go to the upstream as they are and answers come back as they
are. What euroute adds on top of this is the cost of its own work.
"""

from __future__ import annotations

import os
from typing import Any

import httpx

from proxy.asgi import read_body
from proxy.settings import Settings
from proxy.upstream import Upstream


def create():  # type: ignore[no-untyped-def]
    upstream = Upstream(Settings())
    url = httpx.URL(os.environ["MISTRAL_BASE_URL"] + "/chat/completions")
    transport = upstream.transport_for(str(url))
    headers = {"content-type": "application/json", "accept-encoding": "identity",
               "authorization": f"Bearer {os.environ['MISTRAL_API_KEY']}"}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive, dict(scope["headers"]), 1 << 20)
        response = await transport.handle_async_request(
            httpx.Request("POST", url, content=body, headers=headers))
        try:
            kind = response.headers.get("content-type", "application/json")
            start = {"type": "http.response.start", "status": response.status_code,
                     "headers": [(b"content-type", kind.encode())]}
            if kind.startswith("text/event-stream"):
                await send(start)
                async for chunk in response.stream:  # type: ignore[union-attr]
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            else:
                raw = b"".join([chunk async for chunk in response.stream])  # type: ignore[union-attr]
                start["headers"].append((b"content-length", str(len(raw)).encode()))
                await send(start)
                await send({"type": "http.response.body", "body": raw})
        finally:
            await response.aclose()

    return app
