"""The upstream client: send a request to the first route that answers, return what came back.

No client I/O and no ledger here: the gateway relays the `Answer` and records it.

A request is never resent to the same route once its bytes may have reached the upstream
(RFC 9112 section 9.3.1): neither transport retries a POST, and neither follows redirects.
The next compliant route is tried after a failure; every try is an `Attempt`.

Failures, translated once here:
    connect refused, reset, bad HTTP, short body, broken answer   -> UpstreamUnavailable (502)
    connect / first byte / idle gap / total deadline exceeded     -> UpstreamTimeout (504)
    the upstream's own 4xx/5xx                                     -> UpstreamError (its status)
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import time
import urllib.request
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx
import orjson
from httpx_aiohttp import AiohttpTransport

from proxy import dialect, sse
from proxy.errors import EurouteError, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from proxy.policy.schema import Route, RouteUpstream
from proxy.settings import Settings


@dataclass(slots=True, frozen=True)
class Limits:
    connect_timeout_s: float
    first_byte_timeout_s: float
    idle_timeout_s: float
    total_timeout_s: float
    max_json_bytes: int
    max_event_bytes: int
    max_header_bytes: int


@dataclass(slots=True)
class Call:
    """One request to one route, ready to send."""

    route: Route
    url: str
    body: bytes
    headers: dict[str, str]


@dataclass(slots=True)
class Attempt:
    route: str
    outcome: str  # "ok", or what went wrong: upstream_timeout, upstream_unavailable, http_503, ...


@dataclass(slots=True)
class Answer:
    """What came back: a JSON `body` or SSE `events`, or the `error` of the last attempt."""

    route: Route | None
    attempts: list[Attempt]
    status: int = 0
    headers: list[tuple[bytes, bytes]] = dataclasses.field(default_factory=list)
    body: bytes | None = None
    json: dict[str, Any] | None = None
    usage: tuple[int, int] | None = None
    events: Events | None = None  # the rest of the stream, after `first`
    first: list[sse.Event] = dataclasses.field(default_factory=list)
    error: EurouteError | None = None
    ttfb: float | None = None  # perf_counter() when the answer's headers arrived


def broken(message: str) -> UpstreamUnavailable:
    """An answer euroute cannot relay: recorded as `upstream_error`."""
    return UpstreamUnavailable(message, code="upstream_error")


class Upstream:
    """One shared connection pool per egress (direct, or each proxy from the environment).

    Driven through httpx's transport interface, not `AsyncClient`: a proxy needs none of its
    per-request work (URL merging, auth and redirect flows, cookie jars, default headers).
    Neither transport keeps cookies (one tenant's cookie must not reach another's request).
    """

    def __init__(self, settings: Settings) -> None:
        self.defaults = Limits(
            connect_timeout_s=settings.upstream_connect_timeout_s,
            first_byte_timeout_s=settings.upstream_first_byte_timeout_s,
            idle_timeout_s=settings.upstream_idle_timeout_s,
            total_timeout_s=settings.upstream_total_timeout_s,
            max_json_bytes=settings.upstream_max_json_bytes,
            max_event_bytes=settings.upstream_max_event_bytes,
            max_header_bytes=settings.upstream_max_header_bytes)
        self.kind = settings.upstream_transport
        # certifi's authorities, or SSL_CERT_FILE / SSL_CERT_DIR when set (a private CA)
        self.tls = httpx.create_ssl_context()
        self.proxies = urllib.request.getproxies_environment()
        self.transports: dict[str | None, httpx.AsyncBaseTransport] = {}

    def limits(self, route: Route) -> Limits:
        return self.defaults if route.upstream is None else _tuned(self.defaults, route.upstream)

    async def forward(self, calls: Iterable[Call], stream: bool) -> Answer:
        """The first 2xx answer, its body read (JSON) or its events ready (SSE); else the error."""
        answer = Answer(None, [])
        for call in calls:
            answer.route = call.route
            try:
                await self._send(call, stream, answer)
            except EurouteError as exc:
                answer.attempts.append(Attempt(call.route.id, _attempt_outcome(exc)))
                answer.error = exc
                if retryable(exc):
                    continue
                return answer
            answer.attempts.append(Attempt(call.route.id, "ok"))
            answer.error = None
            return answer
        if answer.error is None:
            answer.error = UpstreamUnavailable("no route was tried")
        return answer

    async def _send(self, call: Call, stream: bool, answer: Answer) -> None:
        limits = self.limits(call.route)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limits.total_timeout_s
        request = httpx.Request("POST", _url(call.url), content=call.body, headers=call.headers,
                                extensions={"timeout": {
                                    "connect": limits.connect_timeout_s,
                                    "pool": limits.connect_timeout_s,
                                    "read": limits.idle_timeout_s,
                                    "write": limits.idle_timeout_s}})
        transport = self.transport_for(call.url)
        response: httpx.Response | None
        try:
            async with asyncio.timeout_at(min(deadline, loop.time() + limits.first_byte_timeout_s)):
                response = await transport.handle_async_request(request)
        except TimeoutError:
            raise UpstreamTimeout("upstream sent no answer in time") from None
        except (httpx.HTTPError, aiohttp.ClientError) as exc:
            raise translate(exc) from None
        answer.ttfb = time.perf_counter()
        try:
            answer.status = status = response.status_code
            answer.headers = response.headers.raw
            _check_head(response, limits)
            if status >= 400:
                raise upstream_error(status, await read_body(response, limits, deadline))
            if stream:
                events = Events(response, limits, deadline)
                response = None  # the events own it now
                try:
                    # The first events too arrive before any byte reaches the client: a stream
                    # that breaks before them still falls over, or fails cleanly.
                    answer.first = await anext(events, [])
                except BaseException:
                    await events.aclose()
                    raise
                answer.events = events
                return
            answer.body = await read_body(response, limits, deadline)
            answer.json = json_object(answer.body)
            answer.usage = dialect.usage_of(answer.json)
        finally:
            if response is not None:
                await response.aclose()

    def transport_for(self, url: str) -> httpx.AsyncBaseTransport:
        """The pool for this URL: direct, or through the proxy the environment names."""
        proxy = _proxy_for(url, self.proxies)
        transport = self.transports.get(proxy)
        if transport is None:
            transport = self.transports[proxy] = self._new_transport(proxy)
        return transport

    def _new_transport(self, proxy: str | None) -> httpx.AsyncBaseTransport:
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
        via = _proxy(proxy) if proxy else None
        if self.kind == "httpx":
            return httpx.AsyncHTTPTransport(verify=self.tls, limits=limits, retries=0,
                                            trust_env=False, proxy=via)
        header_bytes = self.defaults.max_header_bytes

        def session() -> aiohttp.ClientSession:
            connector = aiohttp.TCPConnector(limit=limits.max_connections or 0, ssl=self.tls,
                                             keepalive_timeout=limits.keepalive_expiry or 5.0)
            # trust_env stays off: proxies are chosen above, and netrc must not add credentials
            return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                         max_line_size=header_bytes, max_field_size=header_bytes)

        return AiohttpTransport(client=session, proxy=via)

    async def aclose(self) -> None:
        for transport in self.transports.values():
            await transport.aclose()


class Events:
    """An SSE answer's events as they complete, within the idle gap and the total deadline."""

    __slots__ = ("_chunks", "_deadline", "_done", "_idle", "_parser", "_response")

    def __init__(self, response: httpx.Response, limits: Limits, deadline: float) -> None:
        self._response = response
        self._chunks: AsyncIterator[bytes] = response.stream.__aiter__()  # type: ignore[union-attr]
        self._parser = sse.Parser(limits.max_event_bytes)
        self._idle = limits.idle_timeout_s
        self._deadline = deadline
        self._done = False

    def __aiter__(self) -> Events:
        return self

    async def __anext__(self) -> list[sse.Event]:
        if self._done:
            raise StopAsyncIteration
        until = min(self._deadline, asyncio.get_running_loop().time() + self._idle)
        try:
            async with asyncio.timeout_at(until):
                while True:
                    try:
                        chunk = await anext(self._chunks)
                    except StopAsyncIteration:
                        self._done = True
                        last = self._parser.close()
                        if last is None:
                            raise
                        return [last]
                    if events := self._parser.feed(chunk):
                        return events
        except TimeoutError:
            raise UpstreamTimeout("upstream stream stalled or ran past its deadline") from None
        except sse.EventTooLarge as exc:
            raise broken(str(exc)) from None
        except (httpx.HTTPError, aiohttp.ClientError) as exc:
            failure = translate(exc)
            if isinstance(failure, UpstreamTimeout):
                raise failure from None
            raise UpstreamUnavailable(f"upstream stream dropped before [DONE] ({failure.message})",
                                      code="stream_cut") from None

    async def aclose(self) -> None:
        await self._response.aclose()


async def read_body(response: httpx.Response, limits: Limits, deadline: float) -> bytes:
    """The body as sent, never more than the route allows: euroute asks for identity
    encoding, so there is nothing to decode (and httpx's decoding layers cost more per
    answer than relaying it)."""
    declared = response.headers.get("content-length")
    limit = limits.max_json_bytes
    if declared and declared.isdigit() and int(declared) > limit:
        raise broken(f"upstream answer is larger than the {limit} byte limit")
    chunks, size = [], 0
    try:
        async with asyncio.timeout_at(deadline):
            async for chunk in response.stream:  # type: ignore[union-attr]
                size += len(chunk)
                if size > limit:
                    raise broken(f"upstream answer is larger than the {limit} byte limit")
                chunks.append(chunk)
    except TimeoutError:
        raise UpstreamTimeout("upstream answer ran past its deadline") from None
    except (httpx.HTTPError, aiohttp.ClientError) as exc:
        raise translate(exc) from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _check_head(response: httpx.Response, limits: Limits) -> None:
    status = response.status_code
    if not 100 <= status <= 599:
        raise broken(f"upstream answered with an invalid HTTP status {status}")
    if 300 <= status < 400 or status < 200:
        # Redirects are never followed: the provider key goes to the configured URL only.
        raise broken(f"upstream answered HTTP {status}; redirects are not followed")
    size = sum(len(k) + len(v) + 4 for k, v in response.headers.raw)
    if size > limits.max_header_bytes:
        raise broken(f"upstream answer headers exceed {limits.max_header_bytes} bytes")


@functools.lru_cache(maxsize=256)
def _tuned(defaults: Limits, overrides: RouteUpstream) -> Limits:
    given = {k: v for k, v in overrides.model_dump().items() if v is not None}
    return dataclasses.replace(defaults, **given)


@functools.lru_cache(maxsize=256)
def _url(url: str) -> httpx.URL:
    return httpx.URL(url)


@functools.lru_cache(maxsize=256)
def _origin_proxy(scheme: str, host: str, proxies: tuple[tuple[str, str], ...]) -> str | None:
    found = dict(proxies)
    # NO_PROXY as urllib (and requests) read it: the snapshot's "no" entry, host or domain
    if urllib.request.proxy_bypass_environment(host, found):  # type: ignore[attr-defined]
        return None
    return found.get(scheme) or found.get("all")


def _proxy(url: str) -> httpx.Proxy:
    """Credentials in the proxy URL become a Proxy-Authorization header, one way for both
    transports (httpx-aiohttp would pass them through aiohttp's deprecated BasicAuth)."""
    parsed = httpx.URL(url)
    headers = {}
    if parsed.username or parsed.password:
        token = base64.b64encode(f"{parsed.username}:{parsed.password}".encode()).decode()
        headers["proxy-authorization"] = f"Basic {token}"
        parsed = parsed.copy_with(username=None, password=None)
    return httpx.Proxy(parsed, headers=headers)


def _proxy_for(url: str, proxies: dict[str, str]) -> str | None:
    """HTTPS_PROXY / HTTP_PROXY / ALL_PROXY unless NO_PROXY lists the host (any case)."""
    if not proxies:
        return None
    parsed = _url(url)
    return _origin_proxy(parsed.scheme, parsed.host, tuple(sorted(proxies.items())))


def translate(exc: Exception) -> EurouteError:
    # httpx-aiohttp maps aiohttp's errors loosely (a dropped connection becomes ConnectTimeout):
    # judge by the original error where there is one.
    cause = exc.__cause__ if isinstance(exc, httpx.HTTPError) and exc.__cause__ else exc
    if isinstance(cause, TimeoutError) or (
            isinstance(exc, httpx.TimeoutException) and not isinstance(cause, aiohttp.ClientError)):
        return UpstreamTimeout(f"upstream timed out ({type(cause).__name__})")
    if isinstance(exc, httpx.ProxyError) or isinstance(
            cause, aiohttp.ClientConnectorError | aiohttp.ClientHttpProxyError | httpx.ConnectError):
        # nothing reached the upstream
        return UpstreamUnavailable(f"upstream unreachable ({type(cause).__name__})")
    return broken(f"upstream connection failed ({type(cause).__name__})")


def retryable(exc: EurouteError) -> bool:
    """Worth trying the next compliant route: the upstream failed, not the request."""
    if isinstance(exc, UpstreamError):
        return exc.status >= 500 or exc.status == 429
    return isinstance(exc, UpstreamTimeout | UpstreamUnavailable)


def _attempt_outcome(exc: EurouteError) -> str:
    return f"http_{exc.status}" if isinstance(exc, UpstreamError) else exc.code or "upstream_error"


def upstream_error(status: int, raw: bytes) -> EurouteError:
    if status in (401, 403):
        # The upstream refused euroute's own credentials: the caller can do nothing about it.
        return UpstreamUnavailable(f"upstream refused euroute's credentials (HTTP {status})")
    message, kind, param, code = dialect.error_from_upstream(status, raw)
    return UpstreamError(status, message, type=kind, param=param, code=code)


def json_object(raw: bytes) -> dict[str, Any]:
    """A 2xx JSON answer, which must be an object."""
    try:
        answer = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise broken("upstream sent a body that is not JSON") from None
    if not isinstance(answer, dict):
        raise broken("upstream sent JSON that is not an object")
    return dialect.check_choices(answer)
