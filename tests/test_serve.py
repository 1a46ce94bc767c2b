"""`euroute serve` as operators run it: a real process, stopped with SIGTERM under load."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from proxy.ledger.tables import ledger
from tests.conftest import PSEUDONYM_KEY, copy_policies, ledger_rows, run
from tests.fake_mistral import UPSTREAM_KEY, FakeMistral


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(env: dict[str, str], log: Path, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    with log.open("wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--port", str(port),
                                   *args], env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                return server, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            server.kill()
            raise AssertionError(f"euroute serve did not come up:\n{log.read_text()}")
        time.sleep(0.05)


def chat_once(client: httpx.Client, url: str, i: int) -> httpx.Response:
    """One chat completion, streamed when i is even, read to its end."""
    r = client.post(f"{url}/v1/chat/completions",
                    json={"model": "magistral-small-2509", "stream": i % 2 == 0,
                          "messages": [{"role": "user", "content": f"n{i}"}]})
    r.read()
    return r


def test_sighup_reloads_policies(db_url: str, tmp_path: Path) -> None:
    policy_dir = copy_policies(tmp_path / "policies")
    env = {**os.environ, "EUROUTE_DATABASE_URL": db_url, "EUROUTE_POLICY_DIR": str(policy_dir),
           "EUROUTE_POLICY_POLL_S": "0"}  # no polling: only the signal reloads
    server, url = start(env, tmp_path / "serve.log")
    try:
        before = httpx.get(f"{url}/readyz").json()["policy_version"]
        apps = policy_dir / "apps.yaml"
        apps.write_text(apps.read_text() + "  newcomer: {policy: eu-standard}\n")
        time.sleep(0.3)
        assert httpx.get(f"{url}/readyz").json()["policy_version"] == before
        server.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/readyz").json()["policy_version"] == before:
            assert time.monotonic() < deadline, "SIGHUP did not reload the policies"
            time.sleep(0.05)
    finally:
        server.terminate()
        server.wait(30)


def test_sigterm_under_load_loses_no_answered_request(db_url: str, tmp_path: Path) -> None:
    slow = FakeMistral(stream_chunks=3, delay_s=0.05).start()
    env = {**os.environ, "EUROUTE_DATABASE_URL": db_url, "MISTRAL_BASE_URL": slow.url,
           "MISTRAL_API_KEY": UPSTREAM_KEY, "EUROUTE_PSEUDONYM_KEY": PSEUDONYM_KEY,
           "EUROUTE_POLICY_DIR": str(copy_policies(tmp_path / "policies"))}
    key = subprocess.run([sys.executable, "-m", "proxy", "keys", "create", "--app", "sigterm",
                          "--policy", "eu-standard"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    log = tmp_path / "serve.log"
    server, url = start(env, log)
    answers = threading.Semaphore(0)
    # One client for all threads: a client per request builds a TLS context each time, and
    # that alone kept two cores busy for half a minute.
    client = httpx.Client(timeout=30, limits=httpx.Limits(max_connections=16),
                          headers={"authorization": f"Bearer {key}"})
    try:
        def one(i: int) -> str | None:
            try:
                r = chat_once(client, url, i)
            except httpx.TransportError:
                return None  # refused once shutdown began: never answered, nothing to record
            answers.release()
            return r.headers["x-request-id"] if r.status_code == 200 else None

        with client, ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(one, i) for i in range(400)]
            for _ in range(10):  # SIGTERM once ten requests were answered, under load
                assert answers.acquire(timeout=30), log.read_text()
            server.send_signal(signal.SIGTERM)
            answered = [rid for f in futures if (rid := f.result())]
        # uvicorn re-raises SIGTERM once it has shut down gracefully.
        assert server.wait(30) in (0, -signal.SIGTERM), log.read_text()
    finally:
        if server.poll() is None:
            server.kill()
        slow.stop()
    assert len(answered) >= 10
    recorded = {r["request_id"] for r in run(ledger_rows(db_url, ledger.c.app == "sigterm"))}
    assert set(answered) <= recorded
