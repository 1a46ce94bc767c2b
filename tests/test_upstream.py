"""The upstream client on its own, over both transports: TLS, forward proxies from the
environment (CONNECT for https, absolute form for http), NO_PROXY, credentials kept in place."""

from __future__ import annotations

import dataclasses
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import trustme

from proxy.policy.schema import Route, RouteUpstream
from proxy.settings import Settings
from proxy.upstream import Answer, Call, Upstream
from tests.forward_proxy import ForwardProxy
from tests.scripted import ScriptedUpstream

PROXY_VARS = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY",
              "https_proxy", "http_proxy", "all_proxy", "no_proxy")
PROVIDER_KEY = "sk-provider-secret-123"
ROUTE = Route.model_validate({
    "id": "test-route", "provider": "test", "upstream_model": "m", "models": ["m"],
    "pricing": {"currency": "USD", "input_per_1m": "1", "output_per_1m": "1"},
    "limits": {"context_window": 1000}, "capabilities": ["chat"]})
TRANSPORTS = pytest.mark.parametrize("transport", ["aiohttp", "httpx"])


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_upstream(ca: trustme.CA) -> Iterator[ScriptedUpstream]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    with ScriptedUpstream(tls=context) as server:
        yield server


@pytest.fixture(scope="module")
def plain_upstream() -> Iterator[ScriptedUpstream]:
    with ScriptedUpstream() as server:
        yield server


def client(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ca: trustme.CA, transport: str,
           **env: str) -> Upstream:
    """An Upstream built as euroute builds it, with exactly these variables in the environment."""
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Upstream(Settings(upstream_transport=transport))  # type: ignore[arg-type]


async def chat(upstream: Upstream, base_url: str) -> Answer:
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    headers = {"content-type": "application/json", "authorization": f"Bearer {PROVIDER_KEY}"}
    try:
        return await upstream.forward([Call(ROUTE, f"{base_url}/chat/completions", body, headers)],
                                      stream=False)
    finally:
        await upstream.aclose()


@TRANSPORTS
async def test_https_goes_through_the_proxy_with_connect(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ca: trustme.CA,
        tls_upstream: ScriptedUpstream, transport: str) -> None:
    tls_upstream.reset()
    with ForwardProxy(credentials=("egress", "s3cret")) as proxy:
        upstream = client(monkeypatch, tmp_path, ca, transport,
                          HTTPS_PROXY=proxy.url("egress:s3cret"))
        answer = await chat(upstream, tls_upstream.url)
    assert answer.error is None and answer.status == 200 and answer.json
    assert answer.json["usage"]["prompt_tokens"] == 7
    (method, target, headers), = proxy.seen
    assert (method, target) == ("CONNECT", f"localhost:{tls_upstream.port}")
    assert headers["proxy-authorization"].startswith("Basic ")
    # the provider key travels inside the tunnel only
    assert "authorization" not in headers and PROVIDER_KEY not in str(headers)
    assert f"Bearer {PROVIDER_KEY}".encode() in tls_upstream.requests[0].head


@TRANSPORTS
async def test_http_goes_through_the_proxy_in_absolute_form_lower_case_variable(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ca: trustme.CA,
        plain_upstream: ScriptedUpstream, transport: str) -> None:
    plain_upstream.reset()
    with ForwardProxy() as proxy:
        upstream = client(monkeypatch, tmp_path, ca, transport, http_proxy=proxy.url())
        answer = await chat(upstream, plain_upstream.url)
    assert answer.error is None and answer.status == 200
    (method, target, _), = proxy.seen
    assert (method, target) == ("POST", f"{plain_upstream.url}/chat/completions")
    assert len(plain_upstream.requests) == 1


@TRANSPORTS
@pytest.mark.parametrize("no_proxy", ["NO_PROXY", "no_proxy"])
async def test_no_proxy_host_is_reached_directly(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ca: trustme.CA,
        tls_upstream: ScriptedUpstream, transport: str, no_proxy: str) -> None:
    tls_upstream.reset()
    with ForwardProxy() as proxy:
        upstream = client(monkeypatch, tmp_path, ca, transport, HTTPS_PROXY=proxy.url(),
                          **{no_proxy: "example.org,localhost"})
        answer = await chat(upstream, tls_upstream.url)
    assert answer.error is None and answer.status == 200
    assert proxy.seen == [] and len(tls_upstream.requests) == 1


@TRANSPORTS
async def test_proxy_refusing_credentials_is_a_clean_upstream_failure(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ca: trustme.CA,
        tls_upstream: ScriptedUpstream, transport: str) -> None:
    tls_upstream.reset()
    with ForwardProxy(credentials=("egress", "s3cret")) as proxy:
        upstream = client(monkeypatch, tmp_path, ca, transport, HTTPS_PROXY=proxy.url("egress:no"))
        answer = await chat(upstream, tls_upstream.url)
    assert answer.error is not None and answer.error.status == 502
    assert [a.outcome for a in answer.attempts] == ["upstream_unavailable"]
    assert tls_upstream.requests == []


@TRANSPORTS
async def test_untrusted_certificate_is_refused(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tls_upstream: ScriptedUpstream,
        transport: str) -> None:
    tls_upstream.reset()
    upstream = client(monkeypatch, tmp_path, trustme.CA(), transport)  # another CA
    answer = await chat(upstream, tls_upstream.url)
    assert answer.error is not None and answer.error.status == 502
    assert tls_upstream.requests == []


def test_route_overrides_the_upstream_limits_it_names() -> None:
    upstream = Upstream(Settings(upstream_idle_timeout_s=7))
    tuned = ROUTE.model_copy(update={"upstream": RouteUpstream(first_byte_timeout_s=300,
                                                                max_json_bytes=1024)})
    limits = upstream.limits(tuned)
    assert (limits.first_byte_timeout_s, limits.max_json_bytes) == (300, 1024)
    assert limits.idle_timeout_s == 7 and upstream.limits(ROUTE) == upstream.defaults
    with pytest.raises(ValueError, match="frobnicate"):
        RouteUpstream.model_validate({"frobnicate": 1})
    with pytest.raises(ValueError):
        RouteUpstream.model_validate({"idle_timeout_s": 0})


@TRANSPORTS
async def test_connect_timeout_is_a_504_and_recorded_as_the_attempt(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ca: trustme.CA, transport: str) -> None:
    # A listener whose accept queue is full: the kernel drops further SYNs, so connect hangs.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        try:
            upstream = client(monkeypatch, tmp_path, ca, transport)
            upstream.defaults = dataclasses.replace(upstream.defaults, connect_timeout_s=0.3)
            started = time.monotonic()
            answer = await chat(upstream, f"http://127.0.0.1:{port}/v1")
        finally:
            for filler in fillers:
                filler.close()
    assert answer.error is not None and answer.error.status == 504
    assert [a.outcome for a in answer.attempts] == ["upstream_timeout"]
    assert time.monotonic() - started < 3
