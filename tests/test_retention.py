"""euroute's own retention: `purge` leaves tombstones so the chains still verify, tampering is
still caught afterwards, and `erase` removes a subject's pseudonym without breaking a hash."""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, select, update
from sqlalchemy.pool import NullPool

from proxy.cli import main
from proxy.ledger import queries, retention
from proxy.ledger.chain import DEV_KEYRING, pseudonym
from proxy.ledger.db import make_engine
from proxy.ledger.tables import ledger, tombstones
from tests.conftest import (
    PSEUDONYM_KEY,
    Proxy,
    _migrate,
    copy_policies,
    ledger_rows,
    new_database,
    proxy_settings,
    run,
)
from tests.made_rows import made_row, write


def today() -> dt.date:
    """Read in each test, never at import: a run that crosses UTC midnight still agrees."""
    return dt.datetime.now(dt.UTC).date()


def past() -> dt.date:
    return today() - dt.timedelta(days=1)


def future() -> dt.date:
    return today() + dt.timedelta(days=30)


async def _run(url: str, work: Any) -> Any:
    engine = make_engine(url, poolclass=NullPool)
    try:
        return await work(engine)
    finally:
        await engine.dispose()


def _execute(url: str, statement: Any) -> None:
    async def work(engine: Any) -> None:
        async with engine.begin() as conn:
            await conn.execute(statement)
    run(_run(url, work))


def _verify(url: str) -> dict[str, Any]:
    return run(_run(url, queries.verify))  # type: ignore[no-any-return]


class Ledger:
    """A fresh database holding two writers' chains: `mixed` has rows past their retain-until
    date at its start, middle and end; every row of `expired` is past it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.keep = [1, 2, 4, 5]  # indexes into the mixed chain that stay
        p, f = past(), future()
        dates = [p, f, f, p, f, f, p]
        self.mixed_rows = [made_row("kept-app", retain_until=d) for d in dates]
        self.mixed = run(write(url, self.mixed_rows))
        self.expired = run(write(url, [made_row("old-app", retain_until=p) for _ in range(3)]))

    def request_ids(self) -> list[str]:
        return [r["request_id"] for r in run(ledger_rows(self.url))]


@pytest.fixture
def fresh(db_url: str, tmp_path: Path) -> Iterator[Ledger]:
    url, drop = new_database("sqlite" if db_url.startswith("sqlite") else "postgresql", tmp_path)
    run(_migrate(url))
    yield Ledger(url)
    drop()


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    def call(url: str, *argv: str) -> tuple[int, str, str]:
        monkeypatch.setenv("EUROUTE_DATABASE_URL", url)
        code = main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return call


# -- purge ------------------------------------------------------------------------------------

def test_dry_run_counts_and_deletes_nothing(fresh: Ledger) -> None:
    counts = run(_run(fresh.url, lambda e: retention.purge(e, today(), DEV_KEYRING, dry_run=True)))
    assert counts == {fresh.mixed: 3, fresh.expired: 3}
    assert len(fresh.request_ids()) == 10
    assert run(_run(fresh.url, lambda e: retention.purge(e, past(), DEV_KEYRING, dry_run=True))) == {}


def test_purge_leaves_tombstones_and_the_rest_still_verifies(fresh: Ledger) -> None:
    assert _verify(fresh.url)["ok"] is True
    counts = run(_run(fresh.url, lambda e: retention.purge(e, today(), DEV_KEYRING)))
    assert counts == {fresh.mixed: 3, fresh.expired: 3}
    assert fresh.request_ids() == [fresh.mixed_rows[i].request_id for i in fresh.keep]
    stones = run(_run(fresh.url, _tombstones))
    assert stones == {(fresh.mixed, 1), (fresh.mixed, 4), (fresh.mixed, 7),
                      (fresh.expired, 1), (fresh.expired, 2), (fresh.expired, 3)}
    result = _verify(fresh.url)
    assert (result["ok"], result["rows"], result["writers"]) == (True, 4, 2)
    assert run(_run(fresh.url, lambda e: retention.purge(e, today(), DEV_KEYRING))) == {}


async def _tombstones(engine: Any) -> set[tuple[str, int]]:
    async with engine.connect() as conn:
        rows = await conn.execute(select(tombstones.c.writer_id, tombstones.c.seq))
        return {(w, s) for w, s in rows}


def test_tampering_is_still_caught_after_a_purge(fresh: Ledger, tmp_path: Path) -> None:
    run(_run(fresh.url, lambda e: retention.purge(e, today(), DEV_KEYRING)))
    third = fresh.mixed_rows[2].request_id  # seq 3, between the tombstones of 1 and 4
    _execute(fresh.url, update(ledger).where(ledger.c.request_id == third).values(cost_nanos=1))
    found = _verify(fresh.url)
    assert found["ok"] is False and found["finding"].startswith("altered")
    assert third in found["finding"] and "seq 3" in found["finding"]
    with Proxy(proxy_settings(fresh.url, copy_policies(tmp_path / "policies"))) as server:
        auditor = server.key("compliance", "eu-standard", "auditor")
        r = httpx.get(f"{server.url}/audit/verify", timeout=30,
                      headers={"authorization": f"Bearer {auditor}"})
    assert r.status_code == 409
    error = r.json()["error"]
    assert (error["type"], error["code"]) == ("integrity_error", "ledger_verification_failed")
    assert error["finding"] == found["finding"] and error["rows_verified"] == found["rows"]


def test_a_row_deleted_without_a_tombstone_is_caught_after_a_purge(fresh: Ledger) -> None:
    run(_run(fresh.url, lambda e: retention.purge(e, today(), DEV_KEYRING)))
    sixth = fresh.mixed_rows[5].request_id
    _execute(fresh.url, delete(ledger).where(ledger.c.request_id == sixth))
    found = _verify(fresh.url)
    assert found["ok"] is False and found["finding"].startswith("missing")
    assert "seq 6" in found["finding"]


def test_a_removed_tombstone_is_caught(fresh: Ledger) -> None:
    run(_run(fresh.url, lambda e: retention.purge(e, today(), DEV_KEYRING)))
    _execute(fresh.url, delete(tombstones).where(tombstones.c.writer_id == fresh.mixed,
                                                 tombstones.c.seq == 4))
    found = _verify(fresh.url)
    assert found["ok"] is False and "missing" in found["finding"] and "seq 4" in found["finding"]


def test_purge_command(fresh: Ledger, cli: Any) -> None:
    code, out, _ = cli(fresh.url, "purge", "--dry-run")
    assert code == 0 and out.startswith(f"would delete 6 rows with retain_until before {today()}")
    assert fresh.mixed in out and fresh.expired in out
    code, _, err = cli(fresh.url, "purge", "--before", future().isoformat())
    assert code == 2 and "in the future" in err
    code, out, _ = cli(fresh.url, "purge", "--before", past().isoformat())
    assert code == 0 and out.startswith("deleted 0 rows")
    code, out, _ = cli(fresh.url, "purge", "--format", "json")
    assert code == 0 and '"rows": 3' in out and len(fresh.request_ids()) == 4
    code, out, _ = cli(fresh.url, "audit", "verify")
    assert code == 0 and out.startswith("OK: 4 rows in 2 chains verified")


# -- erase ------------------------------------------------------------------------------------

def test_erase_removes_the_pseudonym_and_verify_still_passes(
        proxy: Proxy, monkeypatch: pytest.MonkeyPatch, cli: Any) -> None:
    subject, bystander = f"subject-{secrets.token_hex(4)}", f"other-{secrets.token_hex(4)}"
    key = proxy.key(f"erase-{secrets.token_hex(4)}", "eu-standard")
    hello = {"model": "magistral-small-2509", "messages": [{"role": "user", "content": "hi"}]}
    auth = {"authorization": f"Bearer {key}"}
    sent = [httpx.post(f"{proxy.url}/chat/completions", json=body, headers={**auth, **extra},
                       timeout=30)
            for body, extra in [(hello, {"x-euroute-user": subject}),
                                ({**hello, "user": subject}, {}),
                                ({**hello, "max_tokens": 99999}, {"x-euroute-user": subject}),
                                (hello, {"x-euroute-user": bystander})]]
    assert [r.status_code for r in sent] == [200, 200, 403, 200]
    before = [proxy.row(r.headers["x-request-id"]) for r in sent]
    mark = pseudonym(PSEUDONYM_KEY.encode(), subject)
    assert [r["end_user"] == mark for r in before] == [True, True, True, False]

    url = proxy.settings.database_url
    monkeypatch.delenv("EUROUTE_PSEUDONYM_KEY", raising=False)
    monkeypatch.setenv("EUROUTE_ENV", "production")
    code, _, err = cli(url, "erase", "--subject", subject)
    assert code == 2 and "EUROUTE_PSEUDONYM_KEY is not set" in err
    monkeypatch.delenv("EUROUTE_ENV")
    monkeypatch.setenv("EUROUTE_PSEUDONYM_KEY", PSEUDONYM_KEY)
    code, out, _ = cli(url, "erase", "--subject", subject)
    assert code == 0 and out.strip() == "erased the subject's pseudonym from 3 rows"

    after = [proxy.row(r.headers["x-request-id"]) for r in sent]
    for old, new in zip(before[:3], after[:3], strict=True):
        assert (new["end_user"], new["end_user_salt"]) == (None, None)
        assert new["end_user_commitment"] == old["end_user_commitment"] is not None
        assert new["row_hash"] == old["row_hash"]
    assert after[3] == before[3]
    assert not run(ledger_rows(url, ledger.c.end_user == mark))
    assert _verify(url)["ok"] is True
    code, out, _ = cli(url, "audit", "verify")
    assert code == 0 and out.startswith("OK: ")
    # Erased already (or never there): not reported as a success.
    code, out, err = cli(url, "erase", "--subject", subject)
    assert code == 1 and out == "" and "no ledger row carries this subject" in err


def test_without_a_key_development_pseudonyms_agree_and_erase_finds_them(
        db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli: Any) -> None:
    """Two proxies without EUROUTE_PSEUDONYM_KEY (two workers, or before and after a restart)
    give one end user one pseudonym, and `erase` without the key finds it."""
    monkeypatch.delenv("EUROUTE_PSEUDONYM_KEY", raising=False)
    subject = f"dev-subject-{secrets.token_hex(4)}"
    hello = {"model": "magistral-small-2509", "messages": [{"role": "user", "content": "hi"}]}
    rows = []
    with (Proxy(proxy_settings(db_url, copy_policies(tmp_path / "a"), pseudonym_key=None)) as a,
          Proxy(proxy_settings(db_url, copy_policies(tmp_path / "b"), pseudonym_key=None)) as b):
        for server in (a, b):
            key = server.key(f"dev-erase-{secrets.token_hex(4)}", "eu-standard")
            r = httpx.post(f"{server.url}/chat/completions", json=hello, timeout=30,
                           headers={"authorization": f"Bearer {key}", "x-euroute-user": subject})
            assert r.status_code == 200
            rows.append(server.row(r.headers["x-request-id"]))
    assert rows[0]["end_user"] == rows[1]["end_user"] is not None
    code, out, err = cli(db_url, "erase", "--subject", subject)
    assert code == 0 and out.strip() == "erased the subject's pseudonym from 2 rows"
    assert "public development key" in err
    assert not run(ledger_rows(db_url, ledger.c.end_user == rows[0]["end_user"]))
