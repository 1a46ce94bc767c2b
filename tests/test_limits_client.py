"""Client-side limits over real sockets (issue 11, item 13): header size, slow headers, slow
bodies, idle keep-alive, connections per worker. Each test fails under plain uvicorn."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Proxy, copy_policies, proxy_settings
from tests.fake_mistral import FakeMistral
from tests.test_serve import free_port, start

TIMEOUT_S = 0.5
HEADER_LIMIT = 8192


@pytest.fixture(scope="module")
def strict(db_url: str, upstream: FakeMistral, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Proxy]:
    policy_dir = copy_policies(tmp_path_factory.mktemp("policies"))
    with Proxy(proxy_settings(db_url, policy_dir, max_header_bytes=HEADER_LIMIT,
                              header_timeout_s=TIMEOUT_S, body_timeout_s=TIMEOUT_S,
                              keep_alive_s=TIMEOUT_S)) as server:
        yield server


def connect(proxy: Proxy) -> socket.socket:
    host, port = proxy.origin.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def status_and_error(raw: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)["error"]


def test_a_header_block_over_the_limit_is_431(strict: Proxy) -> None:
    ok = httpx.get(f"{strict.origin}/healthz", headers={"x-pad": "a" * (HEADER_LIMIT // 2)})
    assert ok.status_code == 200
    for size in (HEADER_LIMIT * 2, 32 * 1024 * 1024):
        with connect(strict) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-pad: ")
            try:
                sent = 0
                while sent < size:  # the server closes long before 32 MiB
                    sock.sendall(b"a" * 65536)
                    sent += 65536
            except (BrokenPipeError, ConnectionResetError):
                pass
            status, error = status_and_error(read_all(sock))
        assert status == 431
        assert error["code"] == "request_header_fields_too_large"
        assert error["type"] == "invalid_request_error" and "message" in error


def test_the_431_survives_a_client_that_keeps_sending(strict: Proxy) -> None:
    """The server closes in stages (RFC 9112 9.6): what still arrives after the 431 is read
    and dropped. Closed at once with unread bytes queued, the kernel sends a reset instead,
    and a reset destroys the 431 before the client reads it."""
    for _ in range(5):
        with connect(strict) as sock:
            try:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * (1 << 20))
            except (BrokenPipeError, ConnectionResetError):
                pass
            status, error = status_and_error(read_all(sock))
        assert status == 431 and error["code"] == "request_header_fields_too_large"


@pytest.mark.parametrize("sent", [b"", b"GET /healthz HTTP/1.1\r\nhost: x\r\n"])
def test_headers_that_do_not_arrive_in_time_are_408(strict: Proxy, sent: bytes) -> None:
    with connect(strict) as sock:
        began = time.monotonic()
        sock.sendall(sent)
        raw = read_all(sock)
        elapsed = time.monotonic() - began
    status, error = status_and_error(raw)
    assert status == 408 and error["code"] == "request_timeout"
    assert TIMEOUT_S * 0.8 <= elapsed < TIMEOUT_S + 5


def test_dripped_headers_are_408_however_steady_the_drip(strict: Proxy) -> None:
    with connect(strict) as sock:
        began = time.monotonic()
        sock.settimeout(TIMEOUT_S / 5)
        raw = b""
        for byte in b"GET /healthz HTTP/1.1\r\nhost: x\r\n" + b"x-drip: " + b"a" * 1000:
            try:
                sock.sendall(bytes([byte]))
                raw += sock.recv(65536)  # waits up to a fifth of the limit for an answer
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            if raw:
                break
        sock.settimeout(10)
        raw += read_all(sock)
    assert status_and_error(raw)[0] == 408
    assert time.monotonic() - began < TIMEOUT_S + 5


def test_a_body_that_stalls_is_408(strict: Proxy, fake: FakeMistral) -> None:
    app_key = strict.key()  # known to this proxy's key cache, not only to the database
    body = b'{"model": "magistral-small-2509", "messages": [{"role": "user", "content": "hi"}]}'
    with connect(strict) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                     b"authorization: Bearer " + app_key.encode() + b"\r\n"
                     b"content-type: application/json\r\n"
                     b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:20])
        status, error = status_and_error(read_all(sock))
    assert status == 408 and error["code"] == "request_timeout"
    assert fake.received == []


def test_an_idle_keep_alive_connection_is_closed(strict: Proxy) -> None:
    with connect(strict) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        began = time.monotonic()
        raw = read_all(sock)  # returns when the server closes the idle connection
    assert raw.startswith(b"HTTP/1.1 200")
    assert time.monotonic() - began < 3  # uvicorn's default would keep it for 5 s


def test_connections_above_the_limit_get_503_at_once(db_url: str, upstream: FakeMistral,
                                                     tmp_path: Path) -> None:
    settings = proxy_settings(db_url, copy_policies(tmp_path / "p"), max_connections=4,
                              header_timeout_s=60)
    with Proxy(settings) as proxy:
        idle = [connect(proxy) for _ in range(4)]
        try:
            # Each idle connection is in place once the server has accepted it.
            deadline = time.monotonic() + 10
            while len(proxy.server.server_state.connections) < 4:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            with connect(proxy) as extra:
                status, error = status_and_error(read_all(extra))
            assert status == 503 and error["type"] == "service_unavailable"
        finally:
            for sock in idle:
                sock.close()
        # Once they are gone, clients get in again.
        deadline = time.monotonic() + 10
        while True:
            try:
                if httpx.get(f"{proxy.origin}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not take connections again"
            time.sleep(0.02)


def test_euroute_serve_applies_the_limits(db_url: str, tmp_path: Path) -> None:
    env = {**os.environ, "EUROUTE_DATABASE_URL": db_url, "EUROUTE_MAX_HEADER_BYTES": "4096",
           "EUROUTE_POLICY_DIR": str(copy_policies(tmp_path / "policies"))}
    server, url = start(env, tmp_path / "serve.log")
    try:
        r = httpx.get(f"{url}/healthz", headers={"x-pad": "a" * 8192})
        assert r.status_code == 431
        assert r.json()["error"]["code"] == "request_header_fields_too_large"
        assert httpx.get(f"{url}/healthz").status_code == 200
    finally:
        server.terminate()
        server.wait(30)


def test_idle_sockets_cannot_lock_clients_out_at_256_descriptors(db_url: str,
                                                                 tmp_path: Path) -> None:
    """The issue's attack: 300 idle sockets against a process limited to 256 descriptors."""
    env = {**os.environ, "EUROUTE_DATABASE_URL": db_url, "EUROUTE_HEADER_TIMEOUT_S": "2",
           "EUROUTE_POLICY_DIR": str(copy_policies(tmp_path / "policies"))}
    port = free_port()
    with (tmp_path / "serve.log").open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--port", str(port)], env=env, stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)))
    url = f"http://127.0.0.1:{port}"
    idle: list[socket.socket] = []
    try:
        wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200)
        for _ in range(300):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        # Full: a newcomer is told so at once instead of waiting on a wedged server...
        began = time.monotonic()
        assert httpx.get(f"{url}/healthz", timeout=10).status_code in (200, 503)
        assert time.monotonic() - began < 5
        # ...and gets in once the idle sockets have been timed out, though the attacker
        # still holds them open.
        wait_for(lambda: httpx.get(f"{url}/healthz", timeout=10).status_code == 200)
        assert server.poll() is None
        assert b"Too many open files" not in (tmp_path / "serve.log").read_bytes()
    finally:
        for sock in idle:
            sock.close()
        server.terminate()
        server.wait(30)


def wait_for(condition: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)
