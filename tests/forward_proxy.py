"""An HTTP forward proxy on loopback (asyncio): CONNECT tunnels and absolute-form requests.

It records what it was asked (method, target, headers) and, when given credentials, refuses
requests without the matching `Proxy-Authorization`, as an enterprise egress proxy does.
"""

from __future__ import annotations

import asyncio
import base64
from urllib.parse import urlsplit

from tests.scripted import LoopbackServer, closed


class ForwardProxy(LoopbackServer):
    def __init__(self, credentials: tuple[str, str] | None = None) -> None:
        super().__init__()
        self.expected = None if credentials is None else "Basic " + base64.b64encode(
            ":".join(credentials).encode()).decode()
        self.seen: list[tuple[str, str, dict[str, str]]] = []

    def __enter__(self) -> ForwardProxy:
        self.start()
        return self

    def url(self, credentials: str = "") -> str:
        return f"http://{credentials + '@' if credentials else ''}127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            first, *lines = head.decode("latin-1").split("\r\n")
            method, target, _ = first.split(" ")
            headers = {k.strip().lower(): v.strip()
                       for k, _, v in (line.partition(":") for line in lines if line)}
            self.seen.append((method, target, headers))
            if self.expected and headers.get("proxy-authorization") != self.expected:
                writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                             b"proxy-authenticate: Basic\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()
                return
            if method == "CONNECT":
                host, port = target.rsplit(":", 1)
                up_reader, up_writer = await asyncio.open_connection(host, int(port))
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                url = urlsplit(target)
                up_reader, up_writer = await asyncio.open_connection(url.hostname, url.port)
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                kept = [f"{k}: {v}" for k, v in headers.items()
                        if not k.startswith("proxy-") and k != "connection"]
                up_writer.write(f"{method} {url.path} HTTP/1.1\r\n".encode()
                                + "\r\n".join([*kept, "connection: close"]).encode()
                                + b"\r\n\r\n" + body)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        await closed(writer)
