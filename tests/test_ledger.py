"""The ledger at production grade: outages, tamper evidence, budgets, limits, keys."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import delete, select, update
from sqlalchemy.pool import NullPool

from proxy.cli import main
from proxy.ledger import queries
from proxy.ledger.chain import HASHED, canonical, record_hash, row_hash
from proxy.ledger.db import make_engine
from proxy.ledger.store import Store
from proxy.ledger.tables import ledger
from proxy.ledger.writer import Writer
from proxy.limits import period_end, period_start
from tests.conftest import Proxy, copy_policies, ledger_rows, proxy_settings, run
from tests.fake_mistral import FakeMistral
from tests.made_rows import made_row

MODEL = "magistral-small-2509"
HELLO = [{"role": "user", "content": "hello"}]
LIMITED = """\
name: {name}
require: {{no_training: true}}
limits:
{limits}
audit: {{on_write_failure: {on_failure}}}
"""


@pytest.fixture
def own(db_url: str, upstream: FakeMistral, tmp_path: Path) -> Iterator[Proxy]:
    with Proxy(proxy_settings(db_url, _policies(tmp_path), ledger_max_outage_s=0.5)) as server:
        yield server


def _policies(tmp_path: Path) -> Path:
    policy_dir = copy_policies(tmp_path / "policies")
    for name, limits, on_failure in [
        ("budgeted", '  budget: {amount: "0.0005", currency: USD, period: month}', "reject"),
        ("paced", "  requests_per_minute: 2", "reject"),
        ("lenient", "  max_output_tokens: 1000", "admit"),
        ("metered", "  tokens_per_minute: 60", "reject"),
    ]:
        (policy_dir / f"{name}.policy.yaml").write_text(
            LIMITED.format(name=name, limits=limits, on_failure=on_failure))
    return policy_dir


def chat(proxy: Proxy, key: str, **extra: Any) -> httpx.Response:
    return httpx.post(f"{proxy.url}/chat/completions", timeout=30,
                      headers={"authorization": f"Bearer {key}"},
                      json={"model": MODEL, "messages": HELLO, **extra})


async def _verify(url: str) -> dict[str, Any]:
    engine = make_engine(url, poolclass=NullPool)
    try:
        return await queries.verify(engine)
    finally:
        await engine.dispose()


async def _tamper(url: str, statement: Any) -> None:
    engine = make_engine(url, poolclass=NullPool)
    try:
        async with engine.begin() as conn:
            await conn.execute(statement)
    finally:
        await engine.dispose()


# -- tamper evidence --------------------------------------------------------------------------


@pytest.fixture
def chained(db_url: str, upstream: FakeMistral, tmp_path: Path) -> Iterator[tuple[Proxy, list[str]]]:
    """A fresh database with one writer's chain of six rows."""
    from tests.conftest import _migrate, new_database

    url, drop = new_database("sqlite" if db_url.startswith("sqlite") else "postgresql", tmp_path)
    run(_migrate(url))
    with Proxy(proxy_settings(url, copy_policies(tmp_path / "p"))) as server:
        key = server.key()
        ids = [chat(server, key).headers["x-request-id"] for _ in range(6)]
        for request_id in ids:
            server.row(request_id)
    assert run(_verify(url))["ok"] is True
    yield server, ids
    drop()


def _check(server: Proxy, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
           ) -> tuple[int, str]:
    monkeypatch.setenv("EUROUTE_DATABASE_URL", server.settings.database_url)
    code = main(["audit", "verify"])
    return code, capsys.readouterr().out


def test_verify_passes_untouched(chained: tuple[Proxy, list[str]],
                                 capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    code, out = _check(chained[0], capsys, monkeypatch)
    assert code == 0 and out.startswith("OK: 6 rows")


def test_altered_cost_is_detected(chained: tuple[Proxy, list[str]],
                                  capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    server, ids = chained
    run(_tamper(server.settings.database_url, update(ledger).where(
        ledger.c.request_id == ids[2]).values(cost_nanos=1)))
    code, out = _check(server, capsys, monkeypatch)
    assert code == 1 and "altered" in out and ids[2] in out and "seq 3" in out


def test_deleted_row_is_detected(chained: tuple[Proxy, list[str]],
                                 capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    server, ids = chained
    run(_tamper(server.settings.database_url, delete(ledger).where(ledger.c.request_id == ids[3])))
    code, out = _check(server, capsys, monkeypatch)
    assert code == 1 and "missing" in out and "seq 4" in out


def test_deleted_tail_is_detected(chained: tuple[Proxy, list[str]],
                                  capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    server, ids = chained
    run(_tamper(server.settings.database_url, delete(ledger).where(ledger.c.request_id == ids[5])))
    code, out = _check(server, capsys, monkeypatch)
    assert code == 1 and "missing" in out and "seq 6" in out


def test_swapped_rows_are_detected(chained: tuple[Proxy, list[str]],
                                   capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Two rows trade places (every column but the physical id)."""
    server, ids = chained
    url = server.settings.database_url
    a, b = (run(ledger_rows(url, ledger.c.request_id == i))[0] for i in ids[1:3])
    cols = [c.name for c in ledger.columns if c.name != "id"]

    async def swap() -> None:
        engine = make_engine(url, poolclass=NullPool)
        async with engine.begin() as conn:
            # Park one row out of the way first: request ids and seqs are unique.
            await conn.execute(update(ledger).where(ledger.c.id == a["id"]).values(
                request_id="parked", decision_id="parked", seq=-1))
            await conn.execute(update(ledger).where(ledger.c.id == b["id"]).values(
                {c: a[c] for c in cols}))
            await conn.execute(update(ledger).where(ledger.c.id == a["id"]).values(
                {c: b[c] for c in cols}))
        await engine.dispose()
    run(swap())
    code, out = _check(server, capsys, monkeypatch)
    assert code == 1 and "reordered" in out


# -- writes off the request path, and database outages ------------------------------------------


def test_outage_buffers_then_fails_closed_or_admits_and_recovers(own: Proxy,
                                                                 fake: FakeMistral) -> None:
    strict_on_failure = own.key("outage-reject", "budgeted")
    lenient = own.key("outage-admit", "lenient")
    writer = own.gateway.writer
    healthy_engine, healthy_store = writer.engine, writer.store
    # A database that refuses connections: a real failure, not a mock.
    writer.engine = make_engine("postgresql+asyncpg://postgres@127.0.0.1:1/none")
    writer.store = Store(writer.engine)
    try:
        answered = [chat(own, lenient) for _ in range(3)]
        assert all(r.status_code == 200 for r in answered)
        time.sleep(0.7)  # longer than ledger_max_outage_s
        assert httpx.get(f"{own.origin}/readyz").status_code == 503
        refused = chat(own, strict_on_failure)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "service_unavailable"
        admitted = chat(own, lenient)
        assert admitted.status_code == 200
        assert own.gateway.admitted_unrecorded >= 1
        assert writer.failures >= 1 and writer.pending >= 4
    finally:
        run_dispose = writer.engine
        writer.engine, writer.store = healthy_engine, healthy_store
    asyncio.run(run_dispose.dispose())
    # Recovery is automatic: every answered request, and the refusal, reach the ledger.
    for r in [*answered, refused, admitted]:
        assert own.row(r.headers["x-request-id"], timeout=20)
    assert own.row(refused.headers["x-request-id"])["outcome"] == "ledger_unavailable"
    assert httpx.get(f"{own.origin}/readyz").status_code == 200
    assert run(_verify(own.settings.database_url))["ok"] is True


# -- budgets, rate limits -----------------------------------------------------------------------


def test_budget_holds_across_replicas(own: Proxy, fake: FakeMistral, db_url: str) -> None:
    key = own.key("budget-app", "budgeted")
    spent = 0
    for _ in range(40):
        r = chat(own, key, max_tokens=40)
        if r.status_code != 200:
            break
        spent += own.row(r.headers["x-request-id"])["cost_nanos"]
    else:
        pytest.fail("the budget was never reached")
    assert r.status_code == 429 and r.json()["error"]["code"] == "budget_exceeded"
    assert own.row(r.headers["x-request-id"])["outcome"] == "budget_exceeded"
    assert 0 < spent <= 500_000  # USD 0.0005 in nano-units
    # A second replica on the same database refuses too: spend is read from the ledger.
    with Proxy(own.settings) as replica:
        r = chat(replica, key, max_tokens=40)
    assert r.status_code == 429 and r.json()["error"]["code"] == "budget_exceeded"


def test_requests_per_minute_gives_429_with_retry_after(own: Proxy, fake: FakeMistral) -> None:
    key = own.key("paced-app", "paced")
    statuses = [chat(own, key).status_code for _ in range(2)]
    third = chat(own, key)
    if third.status_code == 200:  # the minute turned over between requests
        third = chat(own, key)
    assert statuses == [200, 200] or 429 in statuses
    assert third.status_code == 429
    assert 1 <= int(third.headers["retry-after"]) <= 60
    assert third.json()["error"]["code"] == "rate_limit_exceeded"
    assert own.row(third.headers["x-request-id"])["outcome"] == "rate_limit_exceeded"


def test_tokens_per_minute_counts_what_the_upstream_reported(own: Proxy, fake: FakeMistral
                                                            ) -> None:
    key = own.key("metered-app", "metered")
    used, statuses = 0, []
    for _ in range(6):
        r = chat(own, key)
        statuses.append(r.status_code)
        if r.status_code != 200:
            break
        usage = r.json()["usage"]
        used += usage["prompt_tokens"] + usage["completion_tokens"]
    assert statuses[-1] == 429 and r.json()["error"]["code"] == "tokens_rate_limit_exceeded"
    assert used >= 60 and "retry-after" in r.headers


# -- keys ---------------------------------------------------------------------------------------


def test_keys_create_list_revoke(proxy: Proxy, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("EUROUTE_DATABASE_URL", proxy.settings.database_url)
    monkeypatch.setenv("EUROUTE_POLICY_DIR", str(proxy.settings.resolved_policy_dir()))
    assert main(["keys", "create", "--app", "support-bot"]) == 0
    captured = capsys.readouterr()
    secret = captured.out.strip()
    assert secret.startswith("eur_") and "\n" not in secret
    key_id = captured.err.split(":")[0].split()[-1]
    assert "policy=eu-standard" in captured.err  # from apps.yaml
    ok = _eventually_status(proxy, secret, 200)
    assert ok
    assert main(["keys", "list", "--format", "json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    mine = next(k for k in listed if k["id"] == key_id)
    assert mine["app"] == "support-bot" and mine["revoked_at"] is None
    assert "key_hash" not in mine and secret not in json.dumps(listed)
    assert mine["prefix"] == secret[:10]
    assert main(["keys", "revoke", key_id]) == 0
    assert _eventually_status(proxy, secret, 401)
    assert main(["keys", "revoke", key_id]) == 1
    assert main(["keys", "create", "--app", "nobody"]) == 2


def test_key_last_used_is_recorded(proxy: Proxy, app_key: str) -> None:
    from proxy.ledger.tables import api_keys

    chat(proxy, app_key)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rows = run(_select(proxy.settings.database_url, select(api_keys.c.last_used_at)
                           .where(api_keys.c.last_used_at.is_not(None))))
        if rows:
            return
        time.sleep(0.05)
    pytest.fail("last_used_at never written")


async def _select(url: str, statement: Any) -> list[Any]:
    engine = make_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            return list((await conn.execute(statement)).all())
    finally:
        await engine.dispose()


def _eventually_status(proxy: Proxy, secret: str, status: int) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if httpx.get(f"{proxy.url}/models", headers={"authorization": f"Bearer {secret}"}
                     ).status_code == status:
            return True
        time.sleep(0.05)
    return False


def test_client_disconnect_mid_stream_is_recorded(db_url: str, tmp_path: Path) -> None:
    slow = FakeMistral(stream_chunks=10, delay_s=0.2).start()
    import os

    saved = os.environ["MISTRAL_BASE_URL"]
    os.environ["MISTRAL_BASE_URL"] = slow.url
    try:
        with Proxy(proxy_settings(db_url, copy_policies(tmp_path / "p"))) as server:
            key = server.key()
            with httpx.Client(timeout=30) as http, http.stream(
                "POST", f"{server.url}/chat/completions",
                headers={"authorization": f"Bearer {key}"},
                json={"model": MODEL, "messages": HELLO, "stream": True}) as r:
                request_id = r.headers["x-request-id"]
                next(r.iter_lines())
            row = server.row(request_id, timeout=20)
    finally:
        os.environ["MISTRAL_BASE_URL"] = saved
        slow.stop()
    assert row["outcome"] == "client_cancelled" and row["status"] == 499


async def _steady_trickle(url: str, seconds: float, gather_s: float) -> tuple[int, int]:
    """One row every millisecond or so for `seconds`: (rows written, write transactions)."""
    engine = make_engine(url, poolclass=NullPool)
    try:
        writer = Writer(engine, gather_s=gather_s)
        writer.start()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            writer.submit(made_row("trickle"))
            await asyncio.sleep(0.001)
        await writer.close()
        return writer.written, writer.batches
    finally:
        await engine.dispose()


def test_writer_batches_a_steady_trickle(db_url: str) -> None:
    # Rows that arrive while a batch is being written wait for the next gather window; a
    # writer that wrote them at once would chase single rows, one transaction each.
    written, batches = run(_steady_trickle(db_url, seconds=1.0, gather_s=0.2))
    assert written >= 300
    assert batches <= 1.0 / 0.2 + 3, f"{written} rows took {batches} transactions"


async def _back_pressure(url: str, tmp: Path) -> None:
    engine = make_engine(url, poolclass=NullPool)
    try:
        writer = Writer(engine, batch_size=10, gather_s=0)
        for _ in range(100):
            writer.submit(made_row("backlog"))
        waiting = asyncio.ensure_future(writer.room())
        await asyncio.sleep(0.2)
        assert not waiting.done()  # 100 rows wait and nothing writes them: new requests wait
        writer.start()
        await asyncio.wait_for(waiting, 10)
        assert writer.written > 0 and writer.pending < writer.backlog_rows
        await writer.room()  # keeping up: no wait
        assert writer.waits == 1
        await writer.close()
        assert writer.written == 100
    finally:
        await engine.dispose()
    # A database that fails is the health check's case: requests do not hang on the writer.
    broken = make_engine(f"sqlite+aiosqlite:///{tmp / 'missing' / 'ledger.db'}", poolclass=NullPool)
    try:
        writer = Writer(broken, batch_size=10, gather_s=0)
        for _ in range(100):
            writer.submit(made_row("backlog"))
        writer.start()
        await asyncio.wait_for(writer.room(), 5)
        assert writer.failures >= 1 and writer.pending == 100
        await writer.close(timeout_s=0.1)
    finally:
        await broken.dispose()


def test_requests_wait_for_a_writer_that_falls_behind_but_not_for_a_failing_one(
        db_url: str, tmp_path: Path) -> None:
    run(_back_pressure(db_url, tmp_path))


@pytest.mark.parametrize(("period", "start", "end"), [
    ("month", dt.datetime(2026, 12, 1, tzinfo=dt.UTC), dt.datetime(2027, 1, 1, tzinfo=dt.UTC)),
    ("month", dt.datetime(2028, 2, 1, tzinfo=dt.UTC), dt.datetime(2028, 3, 1, tzinfo=dt.UTC)),
    ("month", dt.datetime(2026, 1, 1, tzinfo=dt.UTC), dt.datetime(2026, 2, 1, tzinfo=dt.UTC)),
    ("day", dt.datetime(2026, 12, 31, tzinfo=dt.UTC), dt.datetime(2027, 1, 1, tzinfo=dt.UTC)),
])
def test_budget_period_ends_at_next_period_start(period: str, start: dt.datetime,
                                                 end: dt.datetime) -> None:
    assert period_start(period, start + dt.timedelta(hours=5)) == start
    assert period_end(period, start) == end.timestamp()


def test_canonical_form_is_sorted_key_json() -> None:
    # Stored hashes depend on these exact bytes: sorted-key JSON of the hashed columns.
    record = made_row("canon", writer_id="w", seq=1, prev_hash="0" * 64)
    row = record.as_dict()
    expected = orjson.dumps({k: row[k] for k in HASHED}, option=orjson.OPT_SORT_KEYS)
    assert canonical(row) == expected
    assert list(orjson.loads(expected)) == sorted(orjson.loads(expected))
    # The writer hashes the record itself; a verifier hashes the row read back: same bytes.
    assert record_hash("0" * 64, record) == row_hash("0" * 64, row)


@pytest.mark.parametrize(("field", "value"), [
    ("model", "m" * 201), ("model", "gpt\x00"), ("prompt_tokens", -1),
    ("prompt_tokens", 2**31), ("cost_nanos", 2**63), ("completion_tokens", True),
])
def test_record_refuses_values_the_database_cannot_take(field: str, value: object) -> None:
    record = made_row("bounds")
    with pytest.raises(ValueError, match=field):
        record.set(**{field: value})
    with pytest.raises(ValueError, match=field):
        made_row("bounds", **{field: value})


def test_record_outcomes_are_a_closed_set() -> None:
    record = made_row("closed")
    with pytest.raises(ValueError, match="outcome"):
        record.finish("rate_limit_exceeded_by_upstream_with_a_very_long_code", 429)
    with pytest.raises(ValueError, match="status"):
        record.finish("upstream_error", 999)
    record.finish("upstream_rate_limited", 429)
    assert (record.outcome, record.status) == ("upstream_rate_limited", 429)
