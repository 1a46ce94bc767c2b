"""The ledger keeps its evidence through crashes and bad rows: SIGKILL under load, rows the
database refuses, a writer task that dies, an erasure while rows are still buffered, backups."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import func, select
from sqlalchemy.pool import NullPool

from proxy import keys
from proxy.cli import main
from proxy.ledger.chain import pseudonym
from proxy.ledger.db import make_engine
from proxy.ledger.store import Store
from proxy.ledger.tables import api_keys, dead_letters, intents, ledger
from proxy.ledger.writer import Writer
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
from tests.fake_mistral import UPSTREAM_KEY, FakeMistral
from tests.made_rows import made_row
from tests.test_ledger import _verify
from tests.test_serve import chat_once, start

LEDGER_KEY = "test-ledger-key-durability"


@pytest.fixture
def fresh_url(db_url: str, tmp_path: Path) -> Iterator[str]:
    url, drop = new_database("sqlite" if db_url.startswith("sqlite") else "postgresql", tmp_path)
    run(_migrate(url))
    yield url
    drop()


async def _count(url: str, table: Any, *where: Any) -> int:
    engine = make_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            return int((await conn.execute(select(func.count()).select_from(table)
                                           .where(*where))).scalar_one())
    finally:
        await engine.dispose()


def _until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


# -- SIGKILL ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigkill_under_load_leaves_a_row_for_every_forwarded_request(
        fresh_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    slow = FakeMistral(stream_chunks=3, delay_s=0.02).start()
    env = {**os.environ, "EUROUTE_DATABASE_URL": fresh_url, "MISTRAL_BASE_URL": slow.url,
           "MISTRAL_API_KEY": UPSTREAM_KEY, "EUROUTE_PSEUDONYM_KEY": PSEUDONYM_KEY,
           "EUROUTE_LEDGER_KEY": LEDGER_KEY, "EUROUTE_ANCHOR_DIR": str(tmp_path / "anchors"),
           "EUROUTE_LEDGER_HEARTBEAT_S": "0.2", "EUROUTE_LEDGER_GRACE_S": "1",
           # A long gather keeps finished rows in memory, where SIGKILL loses them.
           "EUROUTE_LEDGER_GATHER_S": "0.5",
           "EUROUTE_POLICY_DIR": str(copy_policies(tmp_path / "policies"))}
    key = subprocess.run([sys.executable, "-m", "proxy", "keys", "create", "--app", "killed",
                          "--policy", "eu-standard"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    server, url = start(env, tmp_path / "serve.log")
    answered = 0
    enough, killed = threading.Event(), threading.Event()
    lock = threading.Lock()
    client = httpx.Client(timeout=30, limits=httpx.Limits(max_connections=16),
                          headers={"authorization": f"Bearer {key}"})

    def one(i: int) -> None:
        nonlocal answered
        while not killed.is_set():
            try:
                r = chat_once(client, url, i)
            except httpx.TransportError:
                return  # killed under it
            with lock:
                answered += r.status_code == 200
                if answered >= 60:
                    enough.set()

    try:
        with client, ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(one, i) for i in range(16)]
            assert enough.wait(60), (tmp_path / "serve.log").read_text()
            server.send_signal(signal.SIGKILL)
            killed.set()
            server.wait(10)
            for f in futures:
                f.result()
        forwarded = sum(r.path.endswith("/chat/completions") for r in slow.received)
        assert forwarded >= 60
        rows_at_kill = run(_count(fresh_url, ledger))
        # Restart: the new process recovers what the killed one left open.
        server, url = start(env, tmp_path / "serve2.log")
        _until(lambda: run(_count(fresh_url, ledger)) >= forwarded, 30,
               f"recovery did not bring the ledger to {forwarded} rows")
        _until(lambda: run(_count(fresh_url, intents)) == 0, 30, "intents left open")
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(30)
        slow.stop()
    unknown = run(_count(fresh_url, ledger, ledger.c.outcome == "outcome_unknown"))
    assert unknown == run(_count(fresh_url, ledger)) - rows_at_kill > 0
    forged = [r for r in run(ledger_rows(fresh_url, ledger.c.outcome == "outcome_unknown"))
              if r["app"] != "killed" or r["route"] is None or r["policy"] != "eu-standard"]
    assert forged == []
    monkeypatch.setenv("EUROUTE_DATABASE_URL", fresh_url)
    monkeypatch.setenv("EUROUTE_LEDGER_KEY", LEDGER_KEY)
    code = main(["audit", "verify", "--anchors", str(tmp_path / "anchors")])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("OK: "), out


# -- rows the database refuses ----------------------------------------------------------------

async def _write_with_a_bad_row(url: str) -> tuple[Writer, list[Any], list[Any]]:
    """Eight rows, the fourth of which repeats the request id of a row already written: a
    unique violation, which the record's own checks cannot see."""
    engine = make_engine(url, poolclass=NullPool)
    try:
        first = made_row("dead-letter")
        writer = Writer(engine)
        writer.start()
        writer.submit(first)
        rows = [made_row("dead-letter") for _ in range(8)]
        rows[3].request_id = first.request_id
        while writer.written < 1:  # the first row in its own batch, before the eight
            await asyncio.sleep(0.01)
        for row in rows:
            writer.submit(row)
        await writer.close()
        return writer, [first], rows
    finally:
        await engine.dispose()


def test_a_refused_row_goes_to_dead_letters_and_the_rest_is_written(
        fresh_url: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    writer, (first,), rows = run(_write_with_a_bad_row(fresh_url))
    assert (writer.written, writer.dead_letters, writer.pending) == (8, 1, 0)
    stored = run(ledger_rows(fresh_url))
    assert [r["request_id"] for r in stored] == [
        first.request_id, *(r.request_id for i, r in enumerate(rows) if i != 3)]
    assert [r["seq"] for r in stored] == list(range(1, 9))

    async def letters() -> list[Any]:
        engine = make_engine(fresh_url, poolclass=NullPool)
        try:
            async with engine.connect() as conn:
                return list((await conn.execute(select(dead_letters))).all())
        finally:
            await engine.dispose()
    (letter,) = run(letters())
    assert letter.request_id == first.request_id
    assert "IntegrityError" in letter.error or "UniqueViolation" in letter.error
    assert rows[3].decision_id in letter.record
    monkeypatch.setenv("EUROUTE_DATABASE_URL", fresh_url)
    code = main(["audit", "verify"])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("OK: 8 rows") and "DEAD LETTERS: 1 rows" in out


async def _writer_dies_once(url: str, caplog: pytest.LogCaptureFixture) -> Writer:
    engine = make_engine(url, poolclass=NullPool)
    try:
        writer = Writer(engine, heartbeat_s=0.05)
        real = writer._beat
        broken = asyncio.Event()

        async def beat_with_a_bug() -> None:
            if not broken.is_set():
                broken.set()
                raise RuntimeError("a bug in the writer")
            await real()
        writer._beat = beat_with_a_bug  # type: ignore[method-assign]
        writer.start()
        await broken.wait()
        writer.submit(made_row("after-restart"))
        await writer.close()
        return writer
    finally:
        await engine.dispose()


def test_a_writer_task_that_dies_is_reported_and_restarted(
        fresh_url: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, "euroute.ledger"):
        writer = run(_writer_dies_once(fresh_url, caplog))
    assert writer.restarts == 1 and writer.written == 1
    assert any("task died" in r.getMessage() and r.exc_info for r in caplog.records)
    assert len(run(ledger_rows(fresh_url, ledger.c.app == "after-restart"))) == 1


async def _key_used_mid_request(url: str) -> tuple[Writer, list[Any]]:
    """A key is used, and the writer's heartbeat comes before the request's row does."""
    engine = make_engine(url, poolclass=NullPool)
    try:
        _, key = await keys.create(engine, app="slow-app", policy="eu-standard", role="app",
                                   actor="cli")
        writer = Writer(engine, heartbeat_s=0.05)
        writer.start()
        writer.key_used(key.id, dt.datetime.now(dt.UTC))
        deadline = time.monotonic() + 10
        while await _last_used(engine, key.id) is None:
            assert time.monotonic() < deadline, "the key's use never written"
            await asyncio.sleep(0.01)
        row = made_row("slow-app")
        writer.submit(row)  # the request ends
        await writer.close()
        return writer, await _rows_of(engine, row.request_id)
    finally:
        await engine.dispose()


async def _last_used(engine: Any, key_id: str) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(select(api_keys.c.last_used_at)
                                   .where(api_keys.c.id == key_id))).scalar_one()


def test_a_key_used_before_its_row_is_written_alone(fresh_url: str) -> None:
    writer, rows = run(_key_used_mid_request(fresh_url))
    assert writer.restarts == 0 and writer.written == 1
    assert [(r.seq, r.outcome) for r in rows] == [(1, "ok")]


# -- erasure while rows are buffered ----------------------------------------------------------

def test_erasure_reaches_rows_still_buffered_under_load(
        fresh_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    subject = f"subject-{secrets.token_hex(4)}"
    mark = pseudonym(PSEUDONYM_KEY.encode(), subject)
    # Rows wait a second in the writer's buffer: the erasure arrives while some do.
    settings = proxy_settings(fresh_url, copy_policies(tmp_path / "policies"),
                              ledger_gather_s=1.0, ledger_heartbeat_s=0.1)
    sent: list[tuple[float, str]] = []
    stop = threading.Event()
    with Proxy(settings) as server:
        key = server.key("erasure-load")

        def load() -> None:
            with httpx.Client(base_url=server.url, timeout=30,
                              headers={"authorization": f"Bearer {key}",
                                       "x-euroute-user": subject}) as client:
                while not stop.is_set():
                    r = client.post("/chat/completions", json={
                        "model": "magistral-small-2509",
                        "messages": [{"role": "user", "content": "hi"}]})
                    sent.append((time.time(), r.headers["x-request-id"]))
        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        _until(lambda: len(sent) >= 20, 30, "no load")
        monkeypatch.setenv("EUROUTE_DATABASE_URL", fresh_url)
        monkeypatch.setenv("EUROUTE_PSEUDONYM_KEY", PSEUDONYM_KEY)
        asked = time.time()
        pending_then = server.gateway.writer.pending
        code = main(["erase", "--subject", subject])
        _until(lambda: sent[-1][0] > asked + 2, 30, "load stopped")
        stop.set()
        for t in threads:
            t.join()
        _until(lambda: run(_count(fresh_url, ledger)) >= len(sent), 30, "rows not written")
    assert code == 0, capsys.readouterr().err
    assert pending_then > 0  # rows were in the buffer when the erasure was asked
    before = {rid for when, rid in sent if when < asked}
    rows = {r["request_id"]: r for r in run(ledger_rows(fresh_url))}
    assert before and all(rows[rid]["end_user"] is None for rid in before)
    # Requests made after the erasure are new processing: their pseudonym stays.
    after = [rows[rid] for when, rid in sent if when > asked + 1.5]
    assert all(r["end_user"] == mark for r in after)
    assert run(_verify(fresh_url))["ok"] is True


# -- backups ----------------------------------------------------------------------------------

def _serving(url: str, tmp_path: Path, scenario: Any) -> Path:
    """Runs `scenario(send)` beside a proxy on `url`; `send(n)` makes n answered requests and
    returns once their rows are written and anchored. Returns the anchor directory."""
    anchors = tmp_path / "anchors"
    settings = proxy_settings(url, copy_policies(tmp_path / "policies"),
                              ledger_key=LEDGER_KEY, anchor_dir=anchors, anchor_interval_s=0.1,
                              ledger_heartbeat_s=0.05)
    with Proxy(settings) as server:
        key = server.key("backed-up")

        def send(n: int) -> None:
            for _ in range(n):
                server.row(httpx.post(f"{server.url}/chat/completions", timeout=30,
                                      headers={"authorization": f"Bearer {key}"},
                                      json={"model": "magistral-small-2509",
                                            "messages": [{"role": "user", "content": "hi"}]}
                                      ).headers["x-request-id"])
            writer = server.gateway.writer
            seq = writer.seq
            _until(lambda: _anchored(anchors, writer.writer_id) >= seq, 10, "no anchor")

        scenario(send)
    return anchors


def _verify_against(url: str, anchors: Path, monkeypatch: pytest.MonkeyPatch,
                    capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    monkeypatch.setenv("EUROUTE_DATABASE_URL", url)
    code = main(["audit", "verify", "--anchors", str(anchors)])
    return code, capsys.readouterr().out


def test_sqlite_backup_includes_the_wal_and_verifies_against_the_anchors(
        tmp_path: Path, upstream: FakeMistral, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    url, _ = new_database("sqlite", tmp_path)
    run(_migrate(url))
    monkeypatch.setenv("EUROUTE_LEDGER_KEY", LEDGER_KEY)
    source = Path(url.split("///", 1)[1])

    def back_up(send: Any) -> None:
        send(5)
        assert Path(f"{source}-wal").stat().st_size > 0
        shutil.copyfile(source, tmp_path / "naive.db")  # the file alone, without its WAL
        monkeypatch.setenv("EUROUTE_DATABASE_URL", url)
        assert main(["backup", str(tmp_path / "backup.db")]) == 0
        assert main(["backup", str(tmp_path / "backup.db")]) == 2  # never overwrites

    anchors = _serving(url, tmp_path, back_up)
    code, out = _verify_against(f"sqlite+aiosqlite:///{tmp_path / 'backup.db'}", anchors,
                                monkeypatch, capsys)
    assert code == 0 and out.startswith("OK: 5 rows in 1 chains verified against"), out
    code, out = _verify_against(f"sqlite+aiosqlite:///{tmp_path / 'naive.db'}", anchors,
                                monkeypatch, capsys)
    assert code == 1 and "FAILED" in out, out


@pytest.mark.skipif(shutil.which("pg_dump") is None, reason="needs PostgreSQL's client tools")
def test_postgresql_dump_and_restore_as_the_readme_says_verifies_against_the_anchors(
        tmp_path: Path, upstream: FakeMistral, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    url, drop = new_database("postgresql", tmp_path)
    try:
        run(_migrate(url))
        monkeypatch.setenv("EUROUTE_LEDGER_KEY", LEDGER_KEY)
        dumps = tmp_path / "stale.dump", tmp_path / "euroute.dump"

        def back_up(send: Any) -> None:  # pg_dump takes a consistent snapshot while euroute writes
            for n, dump in zip((4, 2), dumps, strict=True):
                send(n)
                subprocess.run(["pg_dump", "--format=custom", f"--file={dump}", _libpq(url)],
                               check=True, timeout=60)

        anchors = _serving(url, tmp_path, back_up)
        for dump, complete in ((dumps[1], True), (dumps[0], False)):
            restored, drop_restored = new_database("postgresql", tmp_path)
            try:
                subprocess.run(["pg_restore", "--dbname", _libpq(restored), str(dump)],
                               check=True, timeout=60)
                code, out = _verify_against(restored, anchors, monkeypatch, capsys)
            finally:
                drop_restored()
            if complete:
                assert code == 0 and out.startswith("OK: 6 rows in 1 chains verified"), out
            else:  # taken before the newest anchor: named for what it lost
                assert code == 1 and "rewound" in out, out
    finally:
        drop()


def _libpq(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


def _anchored(directory: Path, writer_id: str) -> int:
    path = directory / f"{writer_id}.jsonl"
    if not path.exists():
        return -1
    return max(orjson.loads(line)["seq"] for line in path.read_bytes().splitlines())


def test_backup_of_postgresql_points_to_pg_dump(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str],
                                                tmp_path: Path) -> None:
    monkeypatch.setenv("EUROUTE_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1/x")
    assert main(["backup", str(tmp_path / "b.db")]) == 2
    assert "pg_dump" in capsys.readouterr().err


@pytest.mark.parametrize("missing", ["EUROUTE_LEDGER_KEY", "EUROUTE_PSEUDONYM_KEY"])
def test_production_refuses_to_serve_without_its_keys(tmp_path: Path, missing: str) -> None:
    env = {**os.environ, "EUROUTE_ENV": "production", "EUROUTE_LEDGER_KEY": "a-ledger-key",
           "EUROUTE_PSEUDONYM_KEY": "a-pseudonym-key", missing: "",
           "EUROUTE_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'p.db'}"}
    done = subprocess.run([sys.executable, "-m", "proxy", "serve", "--port", "0"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and f"{missing} is not set" in done.stderr


# -- recovery takes over only what dead writers left -------------------------------------------

async def _two_writers(url: str) -> tuple[int, list[Any]]:
    engine = make_engine(url, poolclass=NullPool)
    try:
        alive = Writer(engine, heartbeat_s=0.05, grace_s=0.5)
        alive.start()
        row = made_row("open-intent")
        await alive.begin(row, {"result": "allow"}, True)
        other = Writer(engine, heartbeat_s=0.05, grace_s=0.5)
        other.start()
        for _ in range(40):  # two seconds of heartbeats: four times the grace
            await asyncio.sleep(0.05)
        taken_while_alive = other.recovered
        for task in alive._tasks.values():  # the process dies: no flush, no heartbeat
            task.cancel()
        await alive.store.close()  # its connection goes with the process
        while other.recovered == 0:
            await asyncio.sleep(0.05)
        await other.close()
        async with engine.connect() as conn:
            rows = list((await conn.execute(select(ledger).where(
                ledger.c.request_id == row.request_id))).all())
            left = (await conn.execute(select(func.count()).select_from(intents))).scalar()
        assert left == 0
        return taken_while_alive, rows
    finally:
        await engine.dispose()


def test_recovery_leaves_a_live_writers_intents_and_takes_a_dead_ones(fresh_url: str) -> None:
    taken_while_alive, (row,) = run(_two_writers(fresh_url))
    assert taken_while_alive == 0
    assert (row.outcome, row.status, row.usage_missing, row.app) == (
        "outcome_unknown", 0, True, "open-intent")
    assert row.route == "mistral-eu-magistral-small" and row.policy == "eu-standard"
    assert '"recovered_by"' in row.decision


async def _outage(url: str) -> tuple[Writer, list[Any], list[Any], int]:
    """Two writers lose the database for longer than the grace period. The first gets it back
    and beats; the second, still cut off (its writes hang), has an answered row and its intent
    waiting. It gets through a moment later: its row is written as answered, not claimed."""
    engine = make_engine(url, poolclass=NullPool)
    down = make_engine("postgresql+asyncpg://postgres@127.0.0.1:1/none")
    try:
        first = Writer(engine, heartbeat_s=0.05, grace_s=1.0)
        second = Writer(engine, heartbeat_s=0.05, grace_s=1.0)
        first.start()
        second.start()
        answered, stranded = made_row("cut-off"), made_row("cut-off-for-good")
        await second.begin(answered, {"result": "allow"}, True)
        await second.begin(stranded, {"result": "allow"}, True)
        reachable = asyncio.Event()
        _held(second, ("_beat", "_flush"), reachable)
        second.submit(answered)
        healthy = first.engine, first.store
        first.engine, first.store = down, Store(down)
        await asyncio.sleep(1.5)  # both silent for longer than the grace period
        assert first.failures > 0
        first.engine, first.store = healthy
        await _soon(lambda: not first._failing, "the first write since the outage")
        await asyncio.sleep(0.2)  # four of its heartbeats
        taken_on_return = first.recovered
        reachable.set()
        await _soon(lambda: second.pending == 0, "the second writer's row")
        for task in second._tasks.values():  # the second writer dies before `stranded` is booked
            task.cancel()
        await second.store.close()
        # a grace period after the database came back
        await _soon(lambda: first.recovered > 0, "the stranded intent's recovery")
        await first.close()
        rows = []
        for row in (answered, stranded):
            rows.append(await _rows_of(engine, row.request_id))
        letters = await _count(url, dead_letters)
        return first, rows[0], rows[1], taken_on_return + letters
    finally:
        await engine.dispose()
        await down.dispose()


async def _soon(check: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


async def _rows_of(engine: Any, request_id: str) -> list[Any]:
    async with engine.connect() as conn:
        return list((await conn.execute(select(ledger).where(
            ledger.c.request_id == request_id))).all())


def test_an_outage_makes_no_live_writer_look_dead(fresh_url: str) -> None:
    first, answered, stranded, wrongly_taken = run(_outage(fresh_url))
    assert wrongly_taken == 0
    assert [(r.outcome, r.usage_missing, r.prompt_tokens) for r in answered] == [
        ("ok", False, 10)]
    assert [(r.outcome, r.app) for r in stranded] == [("outcome_unknown", "cut-off-for-good")]
    assert first.recovered == 1


def _held(writer: Writer, steps: tuple[str, ...], until: asyncio.Event) -> None:
    """The writer's database steps hang until `until` is set, as when the database is cut off."""
    for step in steps:
        real = getattr(writer, step)

        async def held(real: Any = real) -> None:
            await until.wait()
            await real()
        setattr(writer, step, held)


async def _claimed_then_booked(url: str) -> tuple[Writer, list[Any], int]:
    """A writer cut off from the database for longer than the grace period, alone: another
    claims its intent, and before that one's `outcome_unknown` row is written, the first gets
    through with the answered row."""
    engine = make_engine(url, poolclass=NullPool)
    try:
        cut_off = Writer(engine, heartbeat_s=0.05, grace_s=0.5)
        claimer = Writer(engine, heartbeat_s=0.05, grace_s=0.5)
        cut_off.start()
        row = made_row("cut-off-alone")
        await cut_off.begin(row, {"result": "allow"}, True)
        back, claimer_writes = asyncio.Event(), asyncio.Event()
        _held(cut_off, ("_beat", "_flush"), back)
        cut_off.submit(row)
        _held(claimer, ("_flush",), claimer_writes)
        claimer.start()
        await _soon(lambda: claimer.recovered == 1, "the claim")
        back.set()
        await _soon(lambda: cut_off.pending == 0, "the answered row")
        claimer_writes.set()
        await _soon(lambda: claimer.pending == 0, "the claimer's flush")
        await cut_off.close()
        await claimer.close()
        return claimer, await _rows_of(engine, row.request_id), await _count(url, dead_letters)
    finally:
        await engine.dispose()


def test_a_recovered_row_gives_way_to_the_answered_one(fresh_url: str) -> None:
    claimer, rows, letters = run(_claimed_then_booked(fresh_url))
    assert [(r.outcome, r.prompt_tokens, r.app) for r in rows] == [("ok", 10, "cut-off-alone")]
    assert letters == 0 and claimer.dead_letters == 0 and claimer.written == 0
