"""The one shared upstream client, and translation of transport failures into our errors."""

from __future__ import annotations

from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx

from proxy.errors import EurouteError, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from proxy.settings import Settings


def _no_cookies() -> CookieJar:
    # A shared client would otherwise carry one tenant's upstream cookies into another's calls.
    return CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


def make_client(settings: Settings) -> httpx.AsyncClient:
    timeout = httpx.Timeout(settings.upstream_timeout_s, connect=settings.upstream_connect_timeout_s)
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
    transport: httpx.AsyncBaseTransport
    if settings.upstream_transport == "aiohttp":
        import aiohttp
        from httpx_aiohttp import AiohttpTransport

        def session() -> aiohttp.ClientSession:
            connector = aiohttp.TCPConnector(limit=limits.max_connections or 0,
                                             keepalive_timeout=limits.keepalive_expiry)
            return aiohttp.ClientSession(connector=connector,
                                         cookie_jar=aiohttp.DummyCookieJar())

        transport = AiohttpTransport(client=session)
    else:
        transport = httpx.AsyncHTTPTransport(limits=limits, retries=0)
    return httpx.AsyncClient(transport=transport, timeout=timeout, limits=limits,
                             cookies=_no_cookies(), follow_redirects=False, trust_env=False)


def translate(exc: httpx.HTTPError) -> EurouteError:
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(f"upstream timed out ({type(exc).__name__})")
    return UpstreamUnavailable(f"upstream unreachable ({type(exc).__name__})")


def retryable(exc: EurouteError) -> bool:
    """Worth trying the next compliant route: the upstream failed, not the request."""
    if isinstance(exc, UpstreamError):
        return exc.status >= 500 or exc.status == 429
    return isinstance(exc, UpstreamTimeout | UpstreamUnavailable)
