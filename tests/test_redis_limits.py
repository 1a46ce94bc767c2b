"""Rate limits shared across replicas through the real Redis on 127.0.0.1:6379, each test under
its own key prefix; what happens when Redis (or a budget's spend) cannot be read; and
per-replica windows without it."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from pydantic import ValidationError
from sqlalchemy.pool import NullPool

from proxy.errors import StoreUnavailable
from proxy.gateway import outcome_of
from proxy.ledger.db import make_engine
from proxy.limits import Budgets
from proxy.policy.schema import Budget
from proxy.settings import Settings
from tests.conftest import Proxy, copy_policies, new_database, proxy_settings, run
from tests.conftest import _migrate as migrate_url
from tests.fake_mistral import FakeMistral
from tests.test_metrics import scrape, value

REDIS = "redis://127.0.0.1:6379/0"
UNREACHABLE = "redis://127.0.0.1:1/0"  # nothing listens on port 1: refused at once
MODEL = "magistral-small-2509"
POLICIES = {
    "paced": "requests_per_minute: 3", "metered": "tokens_per_minute: 60",
    "paced-lenient": "requests_per_minute: 3",
}
POLICY = """\
name: {name}
require: {{no_training: true}}
limits: {{{limits}}}
audit: {{on_write_failure: {on_failure}}}
"""


@pytest.fixture(scope="module")
def pg_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One PostgreSQL database shared by the replicas of these tests."""
    url, drop = new_database("postgresql", tmp_path_factory.mktemp("pg"))
    run(migrate_url(url))
    yield url
    drop()


@pytest.fixture
def prefix() -> Iterator[str]:
    own = f"euroute-test-{secrets.token_hex(6)}:"
    yield own
    client = redis.Redis.from_url(REDIS)
    for key in client.scan_iter(match=f"{own}*"):
        client.delete(key)
    client.close()


def policies(tmp_path: Path) -> Path:
    directory = copy_policies(tmp_path / "policies")
    for name, limits in POLICIES.items():
        on_failure = "admit" if name.endswith("lenient") else "reject"
        (directory / f"{name}.policy.yaml").write_text(
            POLICY.format(name=name, limits=limits, on_failure=on_failure))
    return directory


def settings(db_url: str, tmp_path: Path, **extra: Any) -> Settings:
    return proxy_settings(db_url, policies(tmp_path), **extra)


def chat(proxy: Proxy, key: str) -> httpx.Response:
    return httpx.post(f"{proxy.url}/chat/completions", timeout=30,
                      headers={"authorization": f"Bearer {key}"},
                      json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})


def shared_key(first: Proxy, second: Proxy, app: str, policy: str) -> str:
    """A new key, once both replicas' key caches hold it."""
    key = first.key(app, policy)
    deadline = time.monotonic() + 10
    while second.gateway.keys.get(key) is None:
        assert time.monotonic() < deadline, "the second replica never saw the key"
        time.sleep(0.02)
    return key


def key_id(proxy: Proxy, secret: str) -> str:
    return str(proxy.gateway.keys.get(secret).id)


def within_one_minute(attempt: Any) -> Any:
    """Run `attempt` again if a one-minute window ended while it ran (fixed windows). Each
    attempt makes its own key: what a cut attempt counted lands in the next window."""
    for _ in range(2):
        minute = int(time.time() // 60)
        result = attempt()
        if int(time.time() // 60) == minute:
            return result
    raise AssertionError("two minute boundaries in a row")


def test_two_replicas_admit_at_most_the_limit(pg_url: str, upstream: FakeMistral,
                                              tmp_path: Path, prefix: str) -> None:
    shared = settings(pg_url, tmp_path, redis_url=REDIS, redis_prefix=prefix)
    with Proxy(shared) as first, Proxy(shared) as second:
        def attempt() -> tuple[str, list[int]]:
            key = shared_key(first, second, "paced-app", "paced")
            return key_id(first, key), [chat(replica, key).status_code
                                        for replica in (first, second) * 4]

        counted, statuses = within_one_minute(attempt)
    assert statuses.count(200) == 3 and statuses.count(429) == 5
    window = redis.Redis.from_url(REDIS)
    (stored,) = window.scan_iter(match=f"{prefix}rate:{counted}:*")
    assert 60 < window.ttl(stored) <= 120  # the window expires by itself
    assert window.hget(stored, "r") == b"3"
    window.close()


def test_tokens_spent_on_one_replica_count_on_the_other(pg_url: str, upstream: FakeMistral,
                                                        tmp_path: Path, prefix: str) -> None:
    shared = settings(pg_url, tmp_path, redis_url=REDIS, redis_prefix=prefix)
    window = redis.Redis.from_url(REDIS)
    with Proxy(shared) as first, Proxy(shared) as second:
        def attempt() -> tuple[int, httpx.Response]:
            key = shared_key(first, second, "metered-app", "metered")
            used = 0
            while used < 60:
                r = chat(first, key)
                assert r.status_code == 200, r.text
                used += r.json()["usage"]["total_tokens"]
            # Tokens are counted after the answer: wait until Redis holds them all.
            deadline = time.monotonic() + 10
            pattern = f"{prefix}rate:{key_id(first, key)}:*"
            while sum(int(window.hget(k, "t") or 0) for k in window.scan_iter(match=pattern)) < used:
                assert time.monotonic() < deadline, "tokens never reached Redis"
                time.sleep(0.01)
            return used, chat(second, key)

        used, refused = within_one_minute(attempt)
    window.close()
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "tokens_rate_limit_exceeded"


def test_without_redis_each_replica_keeps_its_own_window(pg_url: str, upstream: FakeMistral,
                                                         tmp_path: Path) -> None:
    """What the README says: without EUROUTE_REDIS_URL a limit holds per replica."""
    alone = settings(pg_url, tmp_path)
    with Proxy(alone) as first, Proxy(alone) as second:
        def attempt() -> list[int]:
            key = shared_key(first, second, "paced-app", "paced")
            return [chat(replica, key).status_code for replica in (first, second) * 4]

        statuses = within_one_minute(attempt)
    assert statuses.count(200) == 6


def test_unreachable_redis_follows_the_policys_outage_rule(pg_url: str, upstream: FakeMistral,
                                                           tmp_path: Path) -> None:
    with Proxy(settings(pg_url, tmp_path, redis_url=UNREACHABLE, redis_timeout_s=0.2)) as proxy:
        before = scrape(proxy.origin)
        refused = chat(proxy, proxy.key("paced-app", "paced"))
        admitted = chat(proxy, proxy.key("lenient-app", "paced-lenient"))
        after = scrape(proxy.origin)
        refused_row = proxy.row(refused.headers["x-request-id"])
    # reject: fail closed, like a ledger that cannot be written
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "rate_limits_unavailable"
    assert "Redis is unreachable" in refused.json()["error"]["message"]
    assert (refused_row["status"], refused_row["outcome"]) == (503, "unavailable")
    # admit: served without the shared limit
    assert admitted.status_code == 200
    for decision in ("refused", "admitted"):
        assert (value(after, "euroute_rate_limit_store_outages_total", decision=decision)
                - value(before, "euroute_rate_limit_store_outages_total", decision=decision)) == 1


def test_redis_url_is_a_secret_with_a_scheme_redis_py_knows() -> None:
    shown = repr(Settings(redis_url="redis://:hunter2@redis:6379/0"))
    assert "hunter2" not in shown
    with pytest.raises(ValidationError) as refused:
        Settings(redis_url="http://:hunter2@redis:6379/0")
    assert "redis_url" in str(refused.value) and "rediss://" in str(refused.value)
    assert "hunter2" not in str(refused.value)


async def test_an_unreadable_budget_fails_closed_as_unavailable() -> None:
    """The other store admission reads: the ledger's spend, for a budget."""
    engine = make_engine("postgresql+asyncpg://postgres@127.0.0.1:1/nowhere", poolclass=NullPool)
    try:
        with pytest.raises(StoreUnavailable) as refused:
            await Budgets(engine, cache_s=5).admit(
                "some-app", Budget(amount=Decimal("10"), currency="USD", period="month"), 1)
    finally:
        await engine.dispose()
    assert (refused.value.status, refused.value.code) == (503, "budget_unavailable")
    assert outcome_of(refused.value) == "unavailable"
