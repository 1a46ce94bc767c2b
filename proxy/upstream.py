"""The one shared upstream connection pool; forwarding with fall-over; relaying JSON and SSE answers."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import time
from typing import Any

import httpx
import orjson

from proxy import dialect
from proxy.asgi import SSE, Receive, Send, send_json
from proxy.errors import EurouteError, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from proxy.http1 import HTTP1Transport
from proxy.ledger.record import RequestRecord
from proxy.policy.load import PolicySet
from proxy.policy.schema import Route
from proxy.settings import Settings


class Upstream:
    """One shared connection pool to every route, driven through httpx's transport interface.

    A proxy needs none of what `httpx.AsyncClient` does per request (URL merging, auth and
    redirect flows, cookie jars, default headers), and measured, that work cost more than
    euroute's policy decision (bench/README.md). Neither transport keeps cookies.
    """

    def __init__(self, settings: Settings) -> None:
        self.timeout = httpx.Timeout(settings.upstream_timeout_s,
                                     connect=settings.upstream_connect_timeout_s).as_dict()
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
        # certifi's authorities, or SSL_CERT_FILE / SSL_CERT_DIR when set (a private CA)
        tls = httpx.create_ssl_context()
        self.transport: httpx.AsyncBaseTransport
        if settings.upstream_transport == "http1":
            self.transport = HTTP1Transport(limits, tls)
        else:
            self.transport = httpx.AsyncHTTPTransport(verify=tls, limits=limits, retries=0,
                                                      trust_env=False)

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
        """The answer with its body unread: the caller reads or streams it, then closes it."""
        request = httpx.Request("POST", _url(url), content=body, headers=headers,
                                extensions={"timeout": self.timeout})
        return await self.transport.handle_async_request(request)

    async def aclose(self) -> None:
        await self.transport.aclose()


@functools.lru_cache(maxsize=256)
def _url(url: str) -> httpx.URL:
    return httpx.URL(url)


def translate(exc: httpx.HTTPError) -> EurouteError:
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(f"upstream timed out ({type(exc).__name__})")
    return UpstreamUnavailable(f"upstream unreachable ({type(exc).__name__})")


def retryable(exc: EurouteError) -> bool:
    """Worth trying the next compliant route: the upstream failed, not the request."""
    if isinstance(exc, UpstreamError):
        return exc.status >= 500 or exc.status == 429
    return isinstance(exc, UpstreamTimeout | UpstreamUnavailable)


def route_facts(row: RequestRecord, route: Route, policies: PolicySet) -> None:
    """What the ledger must say about where this request's data went."""
    p = route.posture
    standing = policies.standings[route.id]
    days = standing.retention_days
    row.set(route=route.id, provider=route.provider, upstream_model=route.upstream_model,
            inference_location=p.inference_location, storage_location=p.storage_location,
            transfer_mechanism=p.transfer_mechanism, zdr_reference=standing.zdr_reference,
            dpa_reference=standing.dpa_reference, currency=route.pricing.currency,
            provider_retention_days=days)
    row.provider_copy_gone_on = (None if days is None
                                 else row.created_at.date() + dt.timedelta(days=days))


async def forward(upstream: Upstream, policies: PolicySet, routes: list[Route],
                  request: dict[str, Any], endpoint: str, receive: Receive, send: Send,
                  row: RequestRecord, reply_headers: list[tuple[bytes, bytes]], started: float,
                  tried: list[str]) -> tuple[Route, tuple[int, int] | None]:
    """Send to the first route that answers and relay its answer; (route, usage) or raise.

    The next compliant route is tried only while no byte has reached the client.
    """
    stream = endpoint == "chat" and bool(request.get("stream"))
    path = "chat/completions" if endpoint == "chat" else "embeddings"
    last_error: EurouteError | None = None
    for route in routes:
        tried.append(route.id)
        route_facts(row, route, policies)
        payload = (dialect.chat_request(request, route) if endpoint == "chat"
                   else dialect.embeddings_request(request, route.upstream_model))
        headers = {"content-type": "application/json", "accept-encoding": "identity",
                   "accept": "text/event-stream" if stream else "application/json",
                   "user-agent": "euroute"}
        if api_key := policies.api_keys.get(route.id):
            headers["authorization"] = f"Bearer {api_key}"
        try:
            response = await upstream.post(f"{policies.base_urls[route.id]}/{path}",
                                           orjson.dumps(payload), headers)
        except httpx.HTTPError as exc:
            last_error = translate(exc)
            if retryable(last_error):
                continue
            raise last_error from None
        row.ttfb_us = int((time.perf_counter() - started) * 1e6)
        answered = [*reply_headers, (b"x-euroute-route", route.id.encode())]
        try:
            if response.status_code >= 400:
                last_error = upstream_error(response.status_code, await read_raw(response))
                if retryable(last_error):
                    continue
                raise last_error
            if stream:
                return route, await _relay_stream(receive, send, response, request, row, answered)
            raw = await read_raw(response)
            return route, await _relay_json(send, raw, request, endpoint, answered)
        except httpx.HTTPError as exc:  # reading a JSON body: nothing was sent yet
            last_error = translate(exc)
            if retryable(last_error):
                continue
            raise last_error from None
        finally:
            await response.aclose()
    raise last_error or UpstreamUnavailable("no route was tried")


async def read_raw(response: httpx.Response) -> bytes:
    """The body as sent: euroute asks for identity encoding, so there is nothing to decode
    (and httpx's decoding layers cost more per answer than relaying it)."""
    return b"".join([chunk async for chunk in response.stream])  # type: ignore[union-attr]


async def _relay_json(send: Send, raw: bytes, request: dict[str, Any], endpoint: str,
                      reply_headers: list[tuple[bytes, bytes]]) -> tuple[int, int] | None:
    try:
        answer = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise UpstreamUnavailable("upstream sent a body that is not JSON") from None
    usage = dialect.usage_of(answer) if isinstance(answer, dict) else None
    if endpoint == "embeddings" and isinstance(answer, dict):
        raw = orjson.dumps(dialect.embeddings_answer(answer, request.get("encoding_format")))
    await send_json(send, 200, raw, reply_headers)
    return usage


async def _relay_stream(receive: Receive, send: Send, response: httpx.Response,
                        request: dict[str, Any], row: RequestRecord,
                        reply_headers: list[tuple[bytes, bytes]]) -> tuple[int, int] | None:
    options = request.get("stream_options")
    relay = dialect.StreamRelay(isinstance(options, dict) and options.get("include_usage") is True)
    # uvicorn drops writes to a gone client silently; only receive() tells of a disconnect.
    gone = asyncio.ensure_future(receive())
    await send({"type": "http.response.start", "status": 200,
                "headers": [SSE, (b"cache-control", b"no-cache"), *reply_headers]})
    try:
        async for chunk in response.stream:  # type: ignore[union-attr]
            if gone.done():
                row.outcome, row.status = "client_cancelled", 499
                break
            out = relay.feed(chunk)
            if out:
                await send({"type": "http.response.body", "body": out, "more_body": True})
        else:
            if not relay.done:
                row.finish("stream_cut", 502)
    except httpx.HTTPError:
        row.finish("stream_cut", 502)
    finally:
        gone.cancel()
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    return relay.usage


def upstream_error(status: int, raw: bytes) -> EurouteError:
    if status in (401, 403):
        # The upstream refused euroute's own credentials: the caller can do nothing about it.
        return UpstreamUnavailable(f"upstream refused euroute's credentials (HTTP {status})")
    message, kind, param, code = dialect.error_from_upstream(status, raw)
    return UpstreamError(status, message, type=kind, param=param, code=code)
