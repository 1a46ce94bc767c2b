"""euroute's own HTTP/1.1 client transport (proxy/http1.py) against scripted servers on loopback.

The end-to-end tests run every request through this transport (it is the default); these cover
what the fake Mistral upstream does not do: idle connections the server closed, bodies framed
three ways, malformed answers, timeouts, a full pool, back-pressure, TLS.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
import trustme

from proxy.http1 import HIGH_WATER, HTTP1Transport
from proxy.settings import Settings
from proxy.upstream import Upstream, read_raw
from tests.conftest import run

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
LIMITS = httpx.Limits(max_connections=10, max_keepalive_connections=10, keepalive_expiry=5)


def answer(body: bytes = b'{"ok":true}', *extra: bytes) -> bytes:
    return b"\r\n".join([b"HTTP/1.1 200 OK", b"content-type: application/json",
                         b"content-length: %d" % len(body), *extra, b"", body])


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request off the connection: its head and body (empty head: the client left)."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return b"", b""
    length = next(int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                  if line.startswith(b"content-length:"))
    return head, await reader.readexactly(length)


class Server:
    """A loopback server that runs `handler` on each connection and counts connections."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None) -> None:
        self.handler, self.tls, self.connections = handler, tls, 0
        self.writers: list[asyncio.StreamWriter] = []
        self.handlers: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Server:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            self.writers.append(writer)
            self.handlers.append(asyncio.current_task())  # type: ignore[arg-type]
            try:
                await self.handler(reader, writer)
            finally:
                writer.close()

        self.server = await asyncio.start_server(accept, "127.0.0.1", 0, ssl=self.tls)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for writer in self.writers:  # handlers waiting on a read see the end and return
            writer.close()
        await asyncio.gather(*self.handlers, return_exceptions=True)

    def url(self, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}/v1/chat/completions"


async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        head, body = await read_request(reader)
        if not head:
            return
        writer.write(answer(body))
        await writer.drain()


async def post(transport: httpx.AsyncBaseTransport, url: str, body: bytes = b"{}",
               timeout: float = 5.0, **headers: str) -> tuple[int, bytes]:
    request = httpx.Request("POST", url, content=body, headers=headers,
                            extensions={"timeout": httpx.Timeout(timeout).as_dict()})
    response = await transport.handle_async_request(request)
    try:
        return response.status_code, await read_raw(response)
    finally:
        await response.aclose()


def test_keeps_one_connection_for_sequential_requests_and_sends_the_body_as_given() -> None:
    async def scenario() -> None:
        async with Server(keep_alive) as server:
            transport = HTTP1Transport(LIMITS)
            for i in range(20):
                assert await post(transport, server.url(), b'{"n":%d}' % i) == (200, b'{"n":%d}' % i)
            await transport.aclose()
            assert server.connections == 1
    run(scenario())


def test_does_not_reuse_a_connection_idle_longer_than_the_keepalive_expiry() -> None:
    async def scenario() -> None:
        async with Server(keep_alive) as server:
            transport = HTTP1Transport(httpx.Limits(keepalive_expiry=0.1))
            await post(transport, server.url())
            await post(transport, server.url())
            await asyncio.sleep(0.2)
            await post(transport, server.url())
            assert server.connections == 2
            await transport.aclose()
    run(scenario())


def test_an_idle_connection_the_server_closed_is_replaced_and_the_request_sent_once() -> None:
    seen: list[bytes] = []

    async def one_answer_then_close_unanswered(reader: asyncio.StreamReader,
                                               writer: asyncio.StreamWriter) -> None:
        # Answers with keep-alive, then drops the next request the way a server whose
        # keep-alive timer fired does: no byte of answer.
        head, body = await read_request(reader)
        seen.append(body)
        writer.write(answer(body))
        await writer.drain()
        await read_request(reader)

    async def scenario() -> None:
        async with Server(one_answer_then_close_unanswered) as server:
            transport = HTTP1Transport(LIMITS)
            assert await post(transport, server.url(), b"1") == (200, b"1")
            assert await post(transport, server.url(), b"2") == (200, b"2")
            assert server.connections == 2 and seen == [b"1", b"2"]
            await transport.aclose()
    run(scenario())


@pytest.mark.parametrize("when", ["with the answer", "while idle"])
def test_an_answer_nobody_asked_for_retires_the_connection(when: str) -> None:
    # Some servers send "408 Request Timeout" on an idle keep-alive connection before closing
    # it; it must never be taken for the answer to the next request.
    first: list[bool] = []

    async def then_408(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if first:  # only the first connection misbehaves
            return await keep_alive(reader, writer)
        first.append(True)
        head, body = await read_request(reader)
        timeout = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\r\n"
        writer.write(answer(body) + (timeout if when == "with the answer" else b""))
        await writer.drain()
        if when == "while idle":
            await asyncio.sleep(0.1)
            writer.write(timeout)
            await writer.drain()
        await keep_alive(reader, writer)

    async def scenario() -> None:
        async with Server(then_408) as server:
            transport = HTTP1Transport(LIMITS)
            assert await post(transport, server.url(), b"1") == (200, b"1")
            await asyncio.sleep(0.2)
            assert await post(transport, server.url(), b"2") == (200, b"2")
            assert await post(transport, server.url(), b"3") == (200, b"3")
            assert server.connections == 2
            await transport.aclose()
    run(scenario())


def test_a_connection_cut_after_part_of_an_answer_is_an_error_not_a_retry() -> None:
    async def half_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(b'{"ok":true}')[:-4])
        await writer.drain()

    async def scenario() -> None:
        async with Server(half_answer) as server:
            transport = HTTP1Transport(LIMITS)
            with pytest.raises(httpx.ReadError):
                await post(transport, server.url())
            assert server.connections == 1
    run(scenario())


@pytest.mark.parametrize("framing", ["chunked", "until-close", "connection-close"])
def test_reads_bodies_framed_every_way_and_reuses_only_what_may_be_reused(framing: str) -> None:
    async def framed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, body = await read_request(reader)
            if not head:
                return
            if framing == "chunked":
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                             + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body, b"-end"))
                             + b"0\r\n\r\n")
            elif framing == "until-close":
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n" + body)
                return
            else:
                writer.write(answer(body, b"connection: close"))
                return
            await writer.drain()

    async def scenario() -> None:
        async with Server(framed) as server:
            transport = HTTP1Transport(LIMITS)
            for i in range(3):
                status, got = await post(transport, server.url(), b"body%d" % i)
                assert status == 200
                assert got == (b"body%d-end" % i if framing == "chunked" else b"body%d" % i)
            assert server.connections == (1 if framing == "chunked" else 3)
            await transport.aclose()
    run(scenario())


def test_an_answer_that_arrives_a_few_bytes_at_a_time_reads_the_same() -> None:
    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, body = await read_request(reader)
            if not head:
                return
            whole = (b"HTTP/1.1 200 OK\r\nx-long-header: " + b"v" * 300 + b"\r\n"
                     b"transfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
                     % (len(body), body))
            for i in range(0, len(whole), 7):
                writer.write(whole[i:i + 7])
                await writer.drain()
                await asyncio.sleep(0)

    async def scenario() -> None:
        async with Server(trickle) as server:
            transport = HTTP1Transport(LIMITS)
            for i in range(3):
                assert await post(transport, server.url(), b"x" * 100 + b"%d" % i) == (
                    200, b"x" * 100 + b"%d" % i)
            request = httpx.Request("POST", server.url(), content=b"{}",
                                    extensions={"timeout": httpx.Timeout(5).as_dict()})
            response = await transport.handle_async_request(request)
            assert response.headers["x-long-header"] == "v" * 300
            await response.aclose()
            await transport.aclose()
    run(scenario())


def test_malformed_answers_timeouts_and_refused_connections_are_httpx_errors() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()
        await reader.read()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.read()

    async def scenario() -> None:
        transport = HTTP1Transport(httpx.Limits(max_connections=1))
        async with Server(garbage) as server:
            with pytest.raises(httpx.RemoteProtocolError):
                await post(transport, server.url())
        async with Server(silent) as server:
            with pytest.raises(httpx.ReadTimeout):
                await post(transport, server.url(), timeout=0.2)
        async with Server(keep_alive) as gone:
            port = gone.port
        with pytest.raises(httpx.ConnectError):
            await post(transport, f"http://127.0.0.1:{port}/")
        with pytest.raises(httpx.LocalProtocolError):
            await post(transport, f"http://127.0.0.1:{port}/", authorization="Bearer k\r\nx: y")
        # The one connection slot came back after every failure: a working server answers.
        async with Server(keep_alive) as server:
            assert (await post(transport, server.url()))[0] == 200
        await transport.aclose()
    run(scenario())


def test_a_full_pool_waits_then_times_out_and_frees_its_slot_on_close() -> None:
    async def scenario() -> None:
        async with Server(keep_alive) as server:
            transport = HTTP1Transport(httpx.Limits(max_connections=1))
            held = await transport.handle_async_request(httpx.Request(
                "POST", server.url(), content=b"{}",
                extensions={"timeout": httpx.Timeout(5).as_dict()}))
            with pytest.raises(httpx.PoolTimeout):
                await post(transport, server.url(), timeout=0.2)
            waiting = asyncio.ensure_future(post(transport, server.url(), b"next"))
            await asyncio.sleep(0.05)
            assert not waiting.done()
            assert await read_raw(held) == b"{}"
            await held.aclose()
            assert await waiting == (200, b"next")
            assert server.connections == 1  # the waiting request took the freed connection
            await transport.aclose()
    run(scenario())


def test_stops_reading_while_the_reader_lags_behind() -> None:
    size = 16 * HIGH_WATER

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(b"x" * size))
        await writer.drain()
        await reader.read()

    async def scenario() -> None:
        async with Server(big) as server:
            transport = HTTP1Transport(LIMITS)
            response = await transport.handle_async_request(httpx.Request(
                "POST", server.url(), content=b"{}",
                extensions={"timeout": httpx.Timeout(5).as_dict()}))
            body: Any = response.stream
            await asyncio.sleep(0.3)  # a slow client: the answer keeps arriving meanwhile
            buffered = body.conn.buffered
            got = len(await read_raw(response))
            await response.aclose()
            assert got == size
            assert HIGH_WATER <= buffered <= 2 * HIGH_WATER
            await transport.aclose()
    run(scenario())


@pytest.mark.parametrize("kind", ["http1", "httpx"])
def test_tls_upstreams_are_verified_against_the_configured_authority(
        kind: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    authority = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(server_tls)
    server_tls.set_alpn_protocols(["h2", "http/1.1"])  # it would speak HTTP/2 if offered
    settings = Settings(upstream_transport=kind)  # type: ignore[arg-type]
    protocols: list[str | None] = []

    async def noting_protocol(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        protocols.append(writer.get_extra_info("ssl_object").selected_alpn_protocol())
        await keep_alive(reader, writer)

    async def scenario() -> None:
        async with Server(noting_protocol, tls=server_tls) as server:
            # The default authorities do not know this one: the connection is refused.
            with pytest.raises(httpx.ConnectError):
                await post(Upstream(settings).transport, server.url("https"))
            # SSL_CERT_FILE names it (as for httpx itself): the same upstream is trusted.
            ca = tmp_path / "ca.pem"
            authority.cert_pem.write_to_path(str(ca))
            monkeypatch.setenv("SSL_CERT_FILE", str(ca))
            transport = Upstream(settings).transport
            assert await post(transport, server.url("https"), b"secret") == (200, b"secret")
            assert await post(transport, server.url("https"), b"again") == (200, b"again")
            assert server.connections == 1  # kept alive (the refused handshake never got in)
            assert protocols == ["http/1.1"]
            await transport.aclose()
    run(scenario())
