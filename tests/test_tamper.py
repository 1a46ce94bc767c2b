"""The ledger against its own database administrator: every tampering kind that plain SQL
allows is found by `audit verify`, by the keyed chain or by the anchors published outside
the database. Keys rotate without breaking what older keys signed."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import secrets
import shutil
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.pool import NullPool

from proxy.cli import main
from proxy.ledger.chain import GENESIS, LedgerKey, canonical, tombstone_mac
from proxy.ledger.db import make_engine
from proxy.ledger.tables import chains, ledger, tombstones
from tests.conftest import (
    Proxy,
    _pg,
    copy_policies,
    ledger_rows,
    new_database,
    proxy_settings,
    run,
)
from tests.made_rows import made_row
from tests.test_durability import _anchored
from tests.test_migrations import _apply

KEY = "tamper-test-ledger-key"


@dataclass
class Anchored:
    url: str
    anchors: Path
    first: str  # writer ids
    second: str
    ids: list[str]  # request ids of the first writer, seq 1..6
    head_at_5: dict[str, Any]  # the first writer's chain head when it held five rows


async def _sql(url: str, *statements: Any) -> list[Any]:
    engine = make_engine(url, poolclass=NullPool)
    try:
        async with engine.begin() as conn:
            out = []
            for statement in statements:
                result = await conn.execute(statement)
                out.append(result.all() if result.returns_rows else None)
            return out
    finally:
        await engine.dispose()


def _requests(server: Proxy, n: int, after_each: Any = None) -> list[str]:
    key = server.key(f"tamper-{secrets.token_hex(3)}")
    ids = []
    for i in range(n):
        r = httpx.post(f"{server.url}/chat/completions", timeout=30,
                       headers={"authorization": f"Bearer {key}"},
                       json={"model": "magistral-small-2509",
                             "messages": [{"role": "user", "content": "hi"}]})
        ids.append(r.headers["x-request-id"])
        server.row(ids[-1])
        if after_each:
            after_each(i + 1)
    return ids


@pytest.fixture(scope="module")
def template(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Anchored]:
    """Two writers' chains (six rows, then three) under KEY, anchored at start and stop; made
    once, copied for each test (which tampers with its copy)."""
    from tests.conftest import _migrate

    tmp = tmp_path_factory.mktemp("anchored")
    url, drop = new_database("sqlite" if db_url.startswith("sqlite") else "postgresql", tmp)
    run(_migrate(url))
    anchors = tmp / "anchors"
    settings = proxy_settings(url, copy_policies(tmp / "policies"), ledger_key=KEY,
                              anchor_dir=anchors)
    snapshot: dict[str, Any] = {}

    def keep_head(n: int) -> None:
        if n == 5:
            (rows,) = run(_sql(url, select(chains)))
            snapshot.update({str(k): v for k, v in rows[0]._mapping.items()})
    with Proxy(settings) as first:
        ids = _requests(first, 6, keep_head)
        first_id = first.gateway.writer.writer_id
    with Proxy(settings) as second:
        _requests(second, 3)
        second_id = second.gateway.writer.writer_id
    assert _anchored(anchors, first_id) == 6 and _anchored(anchors, second_id) == 3
    yield Anchored(url, anchors, first_id, second_id, ids, snapshot)
    drop()


@pytest.fixture
def anchored(template: Anchored, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
             ) -> Iterator[Anchored]:
    """A copy of the template's database and anchors, with the CLI's environment set."""
    if template.url.startswith("sqlite"):
        path = tmp_path / "copy.db"
        with contextlib.closing(sqlite3.connect(template.url.split("///", 1)[1])) as src, \
                contextlib.closing(sqlite3.connect(path)) as out:
            src.backup(out)
        url, drop = f"sqlite+aiosqlite:///{path}", None
    else:
        name = f"euroute_test_{secrets.token_hex(6)}"
        original = template.url.rsplit("/", 1)[1]
        run(_pg(f'CREATE DATABASE "{name}" TEMPLATE "{original}"'))
        url = template.url.rsplit("/", 1)[0] + f"/{name}"
        drop = name
    anchors = shutil.copytree(template.anchors, tmp_path / "anchors")
    monkeypatch.setenv("EUROUTE_DATABASE_URL", url)
    monkeypatch.setenv("EUROUTE_LEDGER_KEY", KEY)
    monkeypatch.delenv("EUROUTE_LEDGER_KEYS_OLD", raising=False)
    yield Anchored(url, anchors, template.first, template.second, template.ids,
                   template.head_at_5)
    if drop:
        run(_pg(f'DROP DATABASE IF EXISTS "{drop}" WITH (FORCE)'))


def _verify(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["audit", "verify", *args])
    return code, capsys.readouterr().out


def test_untouched_chains_verify_against_their_anchors(
        anchored: Anchored, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _verify(capsys, "--anchors", str(anchored.anchors))
    assert code == 0 and out.startswith("OK: 9 rows in 2 chains verified against 4 anchors")
    assert "development key" not in out and "unkeyed" not in out


# -- 1. delete the newest row and rewind the head --------------------------------------------

def test_deleted_newest_row_with_a_rewound_head_is_found_by_the_anchors(
        anchored: Anchored, capsys: pytest.CaptureFixture[str]) -> None:
    old = anchored.head_at_5
    assert old["last_seq"] == 5
    run(_sql(anchored.url, delete(ledger).where(ledger.c.request_id == anchored.ids[5]),
             update(chains).where(chains.c.writer_id == anchored.first).values(
                 last_seq=old["last_seq"], last_hash=old["last_hash"],
                 head_mac=old["head_mac"], updated_at=old["updated_at"])))
    # A replayed head is a head the key once signed: only the anchors know it was newer.
    assert _verify(capsys)[0] == 0
    code, out = _verify(capsys, "--anchors", str(anchored.anchors))
    assert code == 1 and f"rewound_head: writer {anchored.first} head at seq 5" in out
    assert f"missing_tail: writer {anchored.first} seq 6" in out


def test_a_rewound_head_without_the_key_is_forged(
        anchored: Anchored, capsys: pytest.CaptureFixture[str]) -> None:
    (rows,) = run(_sql(anchored.url, select(ledger.c.row_hash).where(
        ledger.c.request_id == anchored.ids[4])))
    run(_sql(anchored.url, delete(ledger).where(ledger.c.request_id == anchored.ids[5]),
             update(chains).where(chains.c.writer_id == anchored.first).values(
                 last_seq=5, last_hash=rows[0][0])))
    code, out = _verify(capsys)
    assert code == 1 and f"forged_head: writer {anchored.first} seq 5" in out


# -- 2. insert a forged row with a recomputed hash and advance the head ----------------------

def _forged(anchored: Anchored, secret: bytes | None) -> dict[str, Any]:
    (rows,) = run(_sql(anchored.url, select(ledger).where(
        ledger.c.request_id == anchored.ids[5])))
    last = {str(k): v for k, v in rows[0]._mapping.items()}
    row = made_row("forger").as_dict()
    row.update(writer_id=anchored.first, seq=7, prev_hash=last["row_hash"],
               hash_key_id=last["hash_key_id"] if secret else None)
    body = last["row_hash"].encode() + canonical(row)
    row["row_hash"] = (hmac.new(secret, body, hashlib.sha256) if secret
                       else hashlib.sha256(body)).hexdigest()
    return row


@pytest.mark.parametrize("secret", [b"a guessed key", None], ids=["wrong-key", "unkeyed"])
def test_a_forged_row_with_a_recomputed_hash_is_found(
        anchored: Anchored, capsys: pytest.CaptureFixture[str], secret: bytes | None) -> None:
    row = _forged(anchored, secret)
    run(_sql(anchored.url, insert(ledger).values(**row)))
    code, out = _verify(capsys)
    problem = "altered" if secret else "unkeyed_row"
    assert code == 1 and f"{problem}: writer {anchored.first} seq 7" in out
    # ...and advancing the head to it needs the key too.
    guessed = LedgerKey(secret or b"x")
    run(_sql(anchored.url, update(chains).where(chains.c.writer_id == anchored.first).values(
        last_seq=7, last_hash=row["row_hash"],
        head_mac=guessed.mac("head", anchored.first, 7, row["row_hash"]))))
    code, out = _verify(capsys)
    assert code == 1 and f"forged_head: writer {anchored.first} seq 7" in out


# -- 3. a tombstone for a row inside its retention period ------------------------------------

def _stone(anchored: Anchored, key: LedgerKey | None) -> dict[str, Any]:
    (rows,) = run(_sql(anchored.url, select(ledger).where(
        ledger.c.request_id == anchored.ids[2])))
    row = rows[0]
    stone = {"writer_id": row.writer_id, "seq": row.seq, "row_hash": row.row_hash,
             "purged_at": dt.datetime.now(dt.UTC).replace(microsecond=0),
             "reason": "retention_purge", "retain_until": row.retain_until,
             "hash_key_id": key.id if key else None}
    stone["mac"] = tombstone_mac(key, stone) if key else None
    return stone


REAL = LedgerKey(KEY.encode())


@pytest.mark.parametrize(("key", "claimed", "problem"), [
    (LedgerKey(b"a guessed key"), None, "unknown_key"),
    (LedgerKey(b"a guessed key"), REAL.id, "forged_tombstone"),  # the real key id, a guess
    (None, None, "unkeyed_tombstone"),
    (REAL, None, "purged_in_retention"),  # even the key holder may not
], ids=["guessed-key", "real-key-id", "unkeyed", "inside-retention"])
def test_a_tombstone_for_a_row_inside_retention_is_rejected(
        anchored: Anchored, capsys: pytest.CaptureFixture[str], key: LedgerKey | None,
        claimed: str | None, problem: str) -> None:
    stone = _stone(anchored, key)
    stone["hash_key_id"] = claimed or stone["hash_key_id"]
    run(_sql(anchored.url, insert(tombstones).values(**stone),
             delete(ledger).where(ledger.c.request_id == anchored.ids[2])))
    code, out = _verify(capsys)
    assert code == 1 and f"{problem}: writer {anchored.first} seq 3" in out


# -- 4. delete a whole writer's chain and its head; 5. wipe everything -----------------------

def test_a_deleted_chain_is_found_by_the_anchors(
        anchored: Anchored, capsys: pytest.CaptureFixture[str]) -> None:
    run(_sql(anchored.url, delete(ledger).where(ledger.c.writer_id == anchored.second),
             delete(chains).where(chains.c.writer_id == anchored.second)))
    assert _verify(capsys) == (0, "OK: 6 rows in 1 chains verified\n")
    code, out = _verify(capsys, "--anchors", str(anchored.anchors))
    assert code == 1 and f"deleted_chain: writer {anchored.second} (anchored at seq 3)" in out


def test_a_wiped_ledger_is_found_by_the_anchors(
        anchored: Anchored, capsys: pytest.CaptureFixture[str]) -> None:
    run(_sql(anchored.url, delete(ledger), delete(tombstones), delete(chains)))
    assert _verify(capsys) == (0, "OK: 0 rows in 0 chains verified\n")
    code, out = _verify(capsys, "--anchors", str(anchored.anchors))
    assert code == 1 and "wiped: the database holds no chain; the anchors name 2 writers" in out


def test_a_tampered_anchor_file_is_named(
        anchored: Anchored, capsys: pytest.CaptureFixture[str]) -> None:
    path = anchored.anchors / f"{anchored.first}.jsonl"
    path.write_text(path.read_text().replace('"seq":6', '"seq":60'))
    code, out = _verify(capsys, "--anchors", str(anchored.anchors))
    assert code == 1 and f"bad_anchor: writer {anchored.first} seq 60" in out


# -- key rotation and rows from before keyed chains ------------------------------------------

def test_rotated_keys_keep_verifying_what_they_signed(
        anchored: Anchored, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EUROUTE_LEDGER_KEY", "the-next-ledger-key")
    code, out = _verify(capsys)
    assert code == 1 and "unknown_key" in out
    monkeypatch.setenv("EUROUTE_LEDGER_KEYS_OLD", f"an-older-one,{KEY}")
    settings = proxy_settings(anchored.url, copy_policies(tmp_path / "p2"),
                              ledger_key="the-next-ledger-key", ledger_keys_old=KEY,
                              anchor_dir=anchored.anchors)
    with Proxy(settings) as server:
        _requests(server, 2)
    code, out = _verify(capsys, "--anchors", str(anchored.anchors))
    assert code == 0 and out.startswith("OK: 11 rows in 3 chains verified")
    keys = {r["hash_key_id"] for r in run(ledger_rows(anchored.url))}
    assert keys == {LedgerKey(KEY.encode()).id, LedgerKey(b"the-next-ledger-key").id}


def test_unkeyed_rows_from_before_the_upgrade_verify_and_are_reported(
        db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    url, drop = new_database("sqlite" if db_url.startswith("sqlite") else "postgresql", tmp_path)
    try:
        run(_apply(url, "0001"))
        writer, prev = "legacy" + "0" * 26, GENESIS
        rows = []
        for seq in (1, 2, 3):
            row = made_row("legacy").as_dict()
            del row["hash_key_id"]
            row.update(writer_id=writer, seq=seq, prev_hash=prev)
            row["row_hash"] = prev = hashlib.sha256(prev.encode() + canonical(
                {**row, "hash_key_id": None})).hexdigest()
            rows.append(row)
        columns = ", ".join(rows[0])
        marks = ", ".join(f":{k}" for k in rows[0])
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        run(_sql(url, *[text(f"INSERT INTO ledger ({columns}) VALUES ({marks})").bindparams(
            **{k: (v.astimezone(dt.UTC).replace(tzinfo=None) if isinstance(v, dt.datetime)
                   else v) for k, v in r.items()}) for r in rows],
            text("INSERT INTO ledger_chains (writer_id, started_at, last_seq, last_hash, "
                 "updated_at) VALUES (:w, :t, 3, :h, :t)").bindparams(w=writer, t=now, h=prev)))
        run(_apply(url, "head"))
        monkeypatch.setenv("EUROUTE_DATABASE_URL", url)
        monkeypatch.setenv("EUROUTE_LEDGER_KEY", KEY)
        code, out = _verify(capsys)
        assert code == 0 and out.startswith("OK: 3 rows in 1 chains verified")
        assert "NOTE: 3 rows are unkeyed" in out
    finally:
        drop()


def test_verifying_under_the_development_key_says_it_proves_nothing(
        anchored: Anchored, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    run(_sql(anchored.url, delete(ledger), delete(chains)))
    monkeypatch.delenv("EUROUTE_LEDGER_KEY")
    code, out = _verify(capsys)
    assert code == 0 and "public development key" in out
