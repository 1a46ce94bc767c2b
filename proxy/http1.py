"""euroute's own HTTP/1.1 client, behind httpx's transport interface (the default transport).

One loopback round trip through httpx-aiohttp cost euroute four times what the round trip
itself costs (bench/README.md). A proxy talking to a few known upstreams needs a small part of
a general client: keep-alive connections per origin on asyncio protocols, answers parsed by
httptools (the parser uvicorn serves with), TLS, connect/read/pool timeouts, and back-pressure
while a slow client reads a stream. No redirects, cookies, HTTP proxies or HTTP/2: euroute
uses none of them with either transport.

An idle keep-alive connection the upstream closed just as euroute sent a request on it fails
with no byte of answer; that request is sent once more, on a new connection.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import AsyncIterator

import httptools
import httpx

Origin = tuple[str, str, int]

HIGH_WATER = 256 * 1024  # unread answer bytes at which euroute stops reading the socket


class Connection(asyncio.Protocol):
    """One keep-alive connection; holds the answer in flight as httptools parses it."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.idle_since: float | None = None  # in the pool since then
        self.clear()

    def clear(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.answered = False  # a byte of the answer arrived
        self.headers_done = self.complete = self.keep_alive = False
        self.error: httpx.TransportError | None = None

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.idle_since is not None:  # nothing was asked (a 408 before an idle close, say)
            self.close()
            return
        self.answered = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = httpx.RemoteProtocolError(f"malformed answer from upstream ({exc})")
            self.close()
        self.wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.headers_done and not self.complete and not self.delimited():
            self.complete = True  # a body without length or chunks ends with the connection
        elif not self.complete and self.error is None:
            self.error = httpx.ReadError("upstream closed the connection")
        self.wake()

    # -- httptools
    def on_message_begin(self) -> None:
        if self.complete:  # a second answer to one request: never reuse this connection
            raise httpx.RemoteProtocolError("upstream sent an answer nobody asked for")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()

    # -- used by the transport and the body stream
    def delimited(self) -> bool:
        return any(name.lower() in (b"content-length", b"transfer-encoding")
                   for name, _ in self.headers)

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def wait(self, timeout: float | None) -> None:
        """Until more of the answer arrives, or the connection ends."""
        if self.error is not None:
            raise self.error
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await self.waiter
        except TimeoutError:
            raise httpx.ReadTimeout("upstream did not answer in time") from None
        finally:
            self.waiter = None

    def take(self) -> bytes:
        chunk = self.chunks.popleft()
        self.buffered -= len(chunk)
        if self.buffered + len(chunk) > HIGH_WATER >= self.buffered and not self.closed:
            self.transport.resume_reading()  # type: ignore[union-attr]
        return chunk

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Body(httpx.AsyncByteStream):
    """An answer's body as it arrives; closing it hands the connection back to the pool."""

    def __init__(self, pool: HTTP1Transport, conn: Connection, timeout: float | None) -> None:
        self.pool, self.conn, self.timeout = pool, conn, timeout
        self.released = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self.conn
        while True:
            if conn.chunks:
                yield conn.take()
            elif conn.complete:
                return
            else:
                await conn.wait(self.timeout)

    async def aclose(self) -> None:
        if not self.released:
            self.released = True
            self.pool.release(self.conn)


class HTTP1Transport(httpx.AsyncBaseTransport):
    def __init__(self, limits: httpx.Limits, ssl_context: ssl.SSLContext | None = None) -> None:
        self.idle: dict[Origin, list[Connection]] = {}
        # None means no limit, as in httpx
        self.slots = asyncio.Semaphore(limits.max_connections or 1 << 30)
        idle, expiry = limits.max_keepalive_connections, limits.keepalive_expiry
        self.max_idle = 1 << 30 if idle is None else idle
        self.expiry = float("inf") if expiry is None else expiry
        # httpx's default: certifi's authorities, or SSL_CERT_FILE / SSL_CERT_DIR when set
        self.ssl_context = ssl_context or httpx.create_ssl_context()
        self.ssl_context.set_alpn_protocols(["http/1.1"])  # never let a server choose HTTP/2

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeout = request.extensions.get("timeout", {})
        url = request.url
        origin = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        message = head(request) + request.content
        try:
            async with asyncio.timeout(timeout.get("pool")):
                await self.slots.acquire()
        except TimeoutError:
            raise httpx.PoolTimeout("no upstream connection came free in time") from None
        try:
            conn = self.reuse(origin)
            if conn is not None:
                try:
                    await self.send(conn, message, timeout.get("read"))
                except httpx.ReadError:
                    if conn.answered:
                        raise
                    self.drop(origin)  # the upstream closed it, and likely the others idle
                    conn = None
            if conn is None:
                conn = await self.connect(origin, timeout.get("connect"))
                await self.send(conn, message, timeout.get("read"))
            return httpx.Response(conn.status, headers=conn.headers,
                                  stream=Body(self, conn, timeout.get("read")),
                                  extensions={"http_version": b"HTTP/1.1"})
        except BaseException:
            self.slots.release()
            raise

    async def send(self, conn: Connection, message: bytes, timeout: float | None) -> None:
        """Write the request and wait for the answer's status line and headers."""
        conn.transport.write(message)  # type: ignore[union-attr]
        try:
            while not conn.headers_done:
                await conn.wait(timeout)
        except BaseException:
            conn.close()
            raise

    def reuse(self, origin: Origin) -> Connection | None:
        idle = self.idle.get(origin)
        deadline = time.monotonic() - self.expiry
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.idle_since > deadline:  # type: ignore[operator]
                conn.idle_since = None
                return conn
            conn.close()
        return None

    def drop(self, origin: Origin) -> None:
        for conn in self.idle.pop(origin, []):
            conn.close()

    async def connect(self, origin: Origin, timeout: float | None) -> Connection:
        scheme, host, port = origin
        tls = self.ssl_context if scheme == "https" else None
        try:
            async with asyncio.timeout(timeout):
                _, conn = await asyncio.get_running_loop().create_connection(
                    lambda: Connection(origin), host, port, ssl=tls)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"no connection to {host}:{port} in time") from None
        except OSError as exc:
            raise httpx.ConnectError(f"no connection to {host}:{port} ({exc})") from None
        return conn

    def release(self, conn: Connection) -> None:
        self.slots.release()
        idle = self.idle.setdefault(conn.origin, [])
        if conn.complete and conn.keep_alive and not conn.closed and len(idle) < self.max_idle:
            conn.clear()
            conn.idle_since = time.monotonic()
            idle.append(conn)
        else:
            conn.close()

    async def aclose(self) -> None:
        for origin in list(self.idle):
            self.drop(origin)


def head(request: httpx.Request) -> bytes:
    """The request line and headers; the body's length is always given."""
    url = request.url
    lines = [b"%s %s HTTP/1.1" % (request.method.encode(), url.raw_path), b"host: " + url.netloc]
    for name, value in request.headers.raw:
        if name.lower() not in (b"host", b"content-length", b"transfer-encoding", b"connection"):
            lines.append(name + b": " + value)
    lines.append(b"content-length: %d" % len(request.content))
    text = b"\r\n".join(lines)
    if text.count(b"\n") != len(lines) - 1 or text.count(b"\r") != len(lines) - 1:
        raise httpx.LocalProtocolError("a request header holds a line break")
    return text + b"\r\n\r\n"
