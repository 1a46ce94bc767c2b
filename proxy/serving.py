"""How `euroute serve` runs uvicorn, with the client-side limits uvicorn lacks.

uvicorn's httptools protocol bounds neither the size of a request's header block nor the time
a client takes to send it or its body, and accepts every connection until file descriptors run
out (slowloris). `GuardedHttpTools` adds, per connection:

    header block larger than max_header_bytes            431, connection closed
    headers not complete within header_timeout_s        408, connection closed
    a body read gap longer than body_timeout_s          408, connection closed
    more than max_connections open in this worker       503 at once, connection closed

The keep-alive idle limit is uvicorn's own `timeout_keep_alive`.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.supervisors import Multiprocess

from proxy import logs
from proxy.settings import Settings

log = logging.getLogger("euroute")
# File descriptors kept for everything that is not a client: database, upstream pools, logs.
_RESERVED_FDS = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientLimits:
    max_header_bytes: int
    header_timeout_s: float
    body_timeout_s: float
    max_connections: int

    @classmethod
    def of(cls, settings: Settings) -> ClientLimits:
        # A client connection may hold an upstream connection too: two descriptors each.
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        fit = max(1, (soft - _RESERVED_FDS) // 2) if soft != resource.RLIM_INFINITY else None
        connections = settings.max_connections
        if fit is not None and connections > fit:
            log.warning("EUROUTE_MAX_CONNECTIONS=%d needs more file descriptors than the limit "
                        "of %d allows: using %d", connections, soft, fit)
            connections = fit
        return cls(max_header_bytes=settings.max_header_bytes,
                   header_timeout_s=settings.header_timeout_s,
                   body_timeout_s=settings.body_timeout_s, max_connections=connections)


class ServeConfig(uvicorn.Config):
    """uvicorn's Config carrying euroute's client limits to every worker's protocol."""

    def __init__(self, app: Any, *, limits: ClientLimits, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.client_limits = limits


def config(settings: Settings, app: Any, *, host: str, port: int, workers: int = 1,
           **overrides: Any) -> ServeConfig:
    """The one uvicorn configuration: `euroute serve` and the tests' servers use it alike."""
    options: dict[str, Any] = {
        "host": host, "port": port, "workers": workers, "loop": "uvloop",
        "http": GuardedHttpTools, "ws": "none", "lifespan": "on",
        "log_level": settings.log_level, "access_log": False, "proxy_headers": False,
        "server_header": False, "timeout_keep_alive": settings.keep_alive_s,
        "timeout_graceful_shutdown": 30,
        # Only the h11 protocol reads it; kept equal should anyone select h11.
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        **overrides,
    }
    return ServeConfig(app, limits=ClientLimits.of(settings), **options)


def serve(settings: Settings, *, host: str, port: int, workers: int) -> None:
    # Workers are started by pickling the config: the app goes by name, the protocol by class.
    # euroute's log form for every worker (proxy/logs.py): uvicorn applies it in each.
    cfg = config(settings, "proxy.app:create_app", host=host, port=port, workers=workers,
                 factory=True, log_config=logs.config(settings))
    if workers > 1:
        Multiprocess(cfg, sockets=[cfg.bind_socket()]).run()
    else:
        uvicorn.Server(cfg).run()


# How long a refused connection keeps reading (and dropping) what the client still sends.
LINGER_S = 1.0


def _reply(status: bytes) -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: ")


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits in the module docstring."""

    def __init__(self, config: ServeConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.limits = config.client_limits
        self._header_bytes = 0
        self._in_headers = True
        self._in_body = False
        self._refused = False  # an error was written and the connection is closing
        self._timer: asyncio.TimerHandle | None = None

    # -- connection ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # Counted before this one joins: above the limit, answer at once and free the socket.
        if len(self.connections) >= self.limits.max_connections:
            self.transport = transport
            self._refuse(b"503 Service Unavailable", "too many connections; retry shortly",
                         "service_unavailable", "service_unavailable")
            return
        super().connection_made(transport)
        self._arm(self.limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self.flow is None:  # refused in connection_made: uvicorn never saw it
            return
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        counting = self._in_headers
        if counting:
            self._header_bytes += len(data)
            if self._timer is None:  # the first byte of a request after a keep-alive pause
                self._arm(self.limits.header_timeout_s)
        elif self._in_body:
            self._arm(self.limits.body_timeout_s)
        super().data_received(data)
        # Checked after parsing, so a body arriving with the headers is not counted.
        if counting and self._in_headers and self._header_bytes > self.limits.max_header_bytes:
            self._too_large()

    def _too_large(self) -> None:
        self._refuse(b"431 Request Header Fields Too Large",
                     f"request headers exceed {self.limits.max_header_bytes} bytes",
                     "invalid_request_error", "request_header_fields_too_large", linger=True)

    # -- parser callbacks ---------------------------------------------------------------------

    def on_headers_complete(self) -> None:
        self._in_headers = False
        # A header block that arrived whole in one read is measured here, before the app runs.
        size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
        if size > self.limits.max_header_bytes:
            self._too_large()
            return
        self._in_body = True
        self._arm(self.limits.body_timeout_s)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._in_body = False
        self._disarm()
        super().on_message_complete()
        # The next request's header block starts here; uvicorn's keep-alive timer covers the
        # idle time before its first byte.
        self._in_headers, self._header_bytes = True, 0

    # -- timers -------------------------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._in_body and self.flow.read_paused:
            # The app is not reading yet: the client is not the one being slow.
            self._arm(self.limits.body_timeout_s)
            return
        if self._in_headers or (self._in_body and not self._response_started()):
            what = "headers" if self._in_headers else "body"
            self._refuse(b"408 Request Timeout", f"the request {what} arrived too slowly",
                         "invalid_request_error", "request_timeout")
        else:  # an answer is under way: it cannot be replaced, only cut
            self.transport.close()

    def _response_started(self) -> bool:
        return self.cycle is not None and self.cycle.response_started

    def _refuse(self, status: bytes, message: str, kind: str, code: str,
                linger: bool = False) -> None:
        """An OpenAI-shaped error written straight to the socket, which is then closed.

        `linger` when the client is still sending: the connection closes in stages (RFC 9112
        section 9.6), the write side at once, the read side once the client closes or after
        LINGER_S, what it still sends being dropped. Closing both at once while data keeps
        arriving makes the kernel reset the connection, and a reset can destroy the error
        before the client reads it. Not otherwise: a lingering socket holds a descriptor."""
        self._refused = True
        self._disarm()
        body = (b'{"error":{"message":"' + message.encode() + b'","type":"' + kind.encode()
                + b'","param":null,"code":"' + code.encode() + b'"}}')
        self.transport.write(_reply(status) + str(len(body)).encode() + b"\r\n\r\n" + body)
        if linger and self.transport.can_write_eof():
            self.transport.write_eof()
            self._timer = self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()
