"""/metrics from prometheus-client: what one request adds, the writer and policy state, and
several workers summed into one exposition."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.ledger.tables import ledger
from tests.conftest import PSEUDONYM_KEY, Proxy, copy_policies, ledger_rows, run
from tests.fake_mistral import UPSTREAM_KEY, FakeMistral
from tests.test_serve import start

MODEL = "magistral-small-2509"
HELLO = [{"role": "user", "content": "hello"}]


def scrape(origin: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    r = httpx.get(f"{origin}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:
    """The sum over every series of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= have)


def test_one_request_counts_once_with_its_route_tokens_cost_and_times(proxy: Proxy,
                                                                      app_key: str) -> None:
    before = scrape(proxy.origin)
    r = httpx.post(f"{proxy.url}/chat/completions", headers={"authorization": f"Bearer {app_key}"},
                   json={"model": MODEL, "messages": HELLO}, timeout=30)
    assert r.status_code == 200
    row = proxy.row(r.headers["x-request-id"])
    after = scrape(proxy.origin)

    def added(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    route = row["route"]
    assert added("euroute_requests_total", endpoint="chat", route=route, outcome="ok",
                 status="200") == 1
    assert added("euroute_requests_total") == 1  # nothing else moved
    assert added("euroute_request_duration_seconds_count", endpoint="chat", route=route) == 1
    assert added("euroute_time_to_first_byte_seconds_count", endpoint="chat", route=route) == 1
    assert added("euroute_tokens_total", app="support-bot", route=route, kind="prompt") == \
        row["prompt_tokens"] > 0
    assert added("euroute_tokens_total", app="support-bot", route=route, kind="completion") == \
        row["completion_tokens"] > 0
    assert added("euroute_cost_total", app="support-bot", route=route, currency="USD") == \
        pytest.approx(row["cost_nanos"] / 1e9)


def test_a_denial_counts_each_failed_requirement(proxy: Proxy) -> None:
    key = proxy.key("hr-assistant", "eu-strict")
    before = scrape(proxy.origin)
    r = httpx.post(f"{proxy.url}/chat/completions", headers={"authorization": f"Bearer {key}"},
                   json={"model": MODEL, "messages": HELLO}, timeout=30)
    assert r.status_code == 403
    failed = proxy.row(r.headers["x-request-id"])["failed_requirements"].split(",")
    after = scrape(proxy.origin)
    assert "zero_data_retention" in failed
    for requirement in failed:
        assert (value(after, "euroute_denials_total", requirement=requirement)
                - value(before, "euroute_denials_total", requirement=requirement)) == 1
    denied = {"endpoint": "chat", "route": "none", "outcome": "denied", "status": "403"}
    assert (value(after, "euroute_requests_total", **denied)
            - value(before, "euroute_requests_total", **denied)) == 1


def test_writer_and_policy_state(proxy: Proxy, app_key: str) -> None:
    r = httpx.post(f"{proxy.url}/chat/completions", headers={"authorization": f"Bearer {app_key}"},
                   json={"model": MODEL, "messages": HELLO}, timeout=30)
    proxy.row(r.headers["x-request-id"])
    samples = scrape(proxy.origin)
    version = proxy.gateway.policies.current.version[:12]
    assert value(samples, "euroute_policy_info", version=version) == 1
    assert value(samples, "euroute_ledger_healthy") == 1
    assert value(samples, "euroute_ledger_written_total") >= 1
    names = {name for name, _ in samples}
    assert {"euroute_ledger_pending_rows", "euroute_ledger_write_failures_total",
            "euroute_ledger_backpressure_waits_total", "euroute_ledger_batches_total",
            "euroute_policy_reloads_total", "euroute_admitted_unrecorded_total"} <= names


def test_two_workers_sum_into_one_exposition(db_url: str, upstream: FakeMistral,
                                             tmp_path: Path) -> None:
    """Each worker counts what it served; every scrape, whichever worker answers, shows all."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "EUROUTE_DATABASE_URL": db_url, "MISTRAL_BASE_URL": upstream.url,
           "MISTRAL_API_KEY": UPSTREAM_KEY, "EUROUTE_PSEUDONYM_KEY": PSEUDONYM_KEY,
           "EUROUTE_POLICY_DIR": str(copy_policies(tmp_path / "policies")), "TMPDIR": str(temp)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    key = subprocess.run([sys.executable, "-m", "proxy", "keys", "create", "--app", "two-workers",
                          "--policy", "eu-standard"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    server, url = start(env, tmp_path / "serve.log", "--workers", "2")
    try:
        shared = list(temp.glob("euroute-metrics-*"))
        assert len(shared) == 1  # euroute serve made the multiprocess directory

        def one(_: int) -> str:
            # A new connection each time, so that the kernel hands them to both workers.
            r = httpx.post(f"{url}/v1/chat/completions", timeout=30,
                           headers={"authorization": f"Bearer {key}", "connection": "close"},
                           json={"model": MODEL, "messages": HELLO})
            assert r.status_code == 200
            return r.headers["x-request-id"]

        sent: list[str] = []
        writers: set[str] = set()
        with ThreadPoolExecutor(8) as pool:
            while len(writers) < 2:
                assert len(sent) < 400, "one worker served every request"
                sent += pool.map(one, range(16))
                # A request's row is written after its metrics: once all rows are in, so are
                # the metrics. Each worker writes its own chain.
                deadline = time.monotonic() + 10
                while len(rows := run(ledger_rows(db_url, ledger.c.app == "two-workers"))) < len(sent):
                    assert time.monotonic() < deadline, "rows missing from the ledger"
                    time.sleep(0.02)
                writers = {r["writer_id"] for r in rows}
        # Every scrape (the kernel picks the worker) sees the requests of both.
        for _ in range(6):
            samples = httpx.get(f"{url}/metrics", headers={"connection": "close"}).text
            total = sum(s.value for family in text_string_to_metric_families(samples)
                        for s in family.samples
                        if s.name == "euroute_requests_total" and s.labels["endpoint"] == "chat")
            assert total == len(sent)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    assert not list(temp.glob("euroute-metrics-*"))  # removed once the workers stopped
