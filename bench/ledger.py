"""Ledger inserts per second through the real writer (proxy.ledger.writer.Writer).

    python bench/ledger.py                      # SQLite and PostgreSQL, 100,000 rows each
    python bench/ledger.py --db sqlite --rows 20000
    python bench/ledger.py --pg-url postgresql+asyncpg://postgres@127.0.0.1:5432/postgres
    python bench/ledger.py --intents 5000      # also: what durability (intents) costs

Rows are built the way proxy/gateway.py builds them for an answered chat completion (same
keys, same value shapes, a decision JSON like the real one, a pseudonymous end user on a share
of rows). Two measures per database:

- burst: submit N rows at once, then `close()`; rows/s = N / (time until all are written).
  This is the writer's ceiling: batches are full (batch_size rows) from the start.
- paced: submit rows at a fixed offered rate from another task, as request handlers would,
  and check the writer keeps up (rows pending at the end, and the achieved rate).

SQLite: a temp file migrated with proxy.ledger.db.migrate. PostgreSQL: a throwaway database
created on the server (default 127.0.0.1:5432, user postgres) and dropped afterwards; skipped
with a note when no server answers. Prints a table and writes bench/results/ledger-<ts>.json.
Targets (issue 4, item 10): >= 20,000 rows/s on PostgreSQL, >= 10,000 on SQLite.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from proxy.ledger.chain import commitment, pseudonym
from proxy.ledger.db import make_engine, migrate
from proxy.ledger.record import RequestRecord
from proxy.ledger.writer import Writer

TARGETS = {"sqlite": 10_000, "postgresql": 20_000}
PSEUDONYM_KEY = os.urandom(32)


def make_row(i: int, key_id: str, policy_version: str) -> RequestRecord:
    """One ledger row as proxy/gateway.py Gateway._call + _route_facts + _account make it."""
    now = dt.datetime.now(dt.UTC)
    request_id = "req_" + os.urandom(12).hex()
    decision_id = "dec_" + os.urandom(12).hex()
    decision = {"input": {"app": "bench", "key_id": key_id, "endpoint": "chat",
                          "model": "magistral-small-2509", "policy": "eu-standard",
                          "needs": ["chat"], "max_tokens": None, "narrowing": [],
                          "stream": bool(i % 2)},
                "result": "allow",
                "reasons": [{"route": "selfhosted-eu-magistral-small", "requirement": "enabled",
                             "message": "route has no base URL configured"}],
                "candidates": ["mistral-eu-magistral-small"]}
    row: dict[str, Any] = {
        "request_id": request_id, "created_at": now, "app": "bench", "key_id": key_id,
        "end_user": None, "end_user_salt": None, "end_user_commitment": None,
        "endpoint": "chat", "model": "magistral-small-2509",
        "route": "mistral-eu-magistral-small", "provider": "mistral",
        "upstream_model": "magistral-small-2509", "inference_location": "FR",
        "storage_location": "FR", "transfer_mechanism": "none_needed", "zdr_reference": None,
        "dpa_reference": "DPA-MISTRAL-2025-0042 (example)", "policy": "eu-standard",
        "policy_version": policy_version, "enforcement": "enforce", "decision_id": decision_id,
        "failed_requirements": None, "outcome": "ok", "status": 200, "ttfb_us": 1234,
        "prompt_tokens": 12, "completion_tokens": 31, "usage_missing": False,
        "cost_nanos": 52_500, "currency": "USD", "provider_retention_days": 30,
        "provider_copy_gone_on": now.date() + dt.timedelta(days=30),
        "retain_until": now.date() + dt.timedelta(days=400), "content_stored": False,
        "decision": orjson.dumps(decision).decode(), "latency_us": 2345,
    }
    if i % 4 == 0:  # a share of requests name an end user (OpenAI `user` field)
        pseud = pseudonym(PSEUDONYM_KEY, f"user-{i % 1000}@example.com")
        salt = os.urandom(16).hex()
        row.update(end_user=pseud, end_user_salt=salt, end_user_commitment=commitment(salt, pseud))
    return RequestRecord(**row)


async def count_rows(engine: Any) -> int:
    from sqlalchemy import func, select

    from proxy.ledger.tables import ledger
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(ledger)))


async def burst(url: str, rows: int, batch_size: int) -> dict[str, Any]:
    engine = make_engine(url)
    try:
        await migrate(engine)
        writer = Writer(engine, batch_size=batch_size, buffer_rows=rows + 1)
        key_id, version = "key_" + uuid.uuid4().hex[:16], uuid.uuid4().hex * 2
        made = [make_row(i, key_id, version) for i in range(rows)]
        writer.start()
        started = time.perf_counter()
        cpu0 = time.process_time()
        for row in made:
            writer.key_used(key_id, row.created_at)
            writer.submit(row)
        await writer.close(timeout_s=600)
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu0
        stored = await count_rows(engine)
        return {"rows": rows, "written": writer.written, "stored": stored,
                "seconds": round(elapsed, 3), "rows_per_s": round(rows / elapsed),
                "cpu_us_per_row": round(cpu / rows * 1e6, 1), "batch_size": batch_size,
                "failures": writer.failures}
    finally:
        await engine.dispose()


async def paced(url: str, rate: int, seconds: float, batch_size: int) -> dict[str, Any]:
    """Offer `rate` rows/s for `seconds`, in ticks of 1 ms, as handlers would submit them."""
    engine = make_engine(url)
    try:
        await migrate(engine)
        writer = Writer(engine, batch_size=batch_size, buffer_rows=10 ** 9)
        key_id, version = "key_" + uuid.uuid4().hex[:16], uuid.uuid4().hex * 2
        total = int(rate * seconds)
        made = [make_row(i, key_id, version) for i in range(total)]
        writer.start()
        started = time.perf_counter()
        sent, max_pending = 0, 0
        while sent < total:
            due = min(total, int((time.perf_counter() - started) * rate))
            while sent < due:
                writer.submit(made[sent])
                sent += 1
            max_pending = max(max_pending, writer.pending)
            await asyncio.sleep(0.001)
        offered_s = time.perf_counter() - started
        pending_at_end = writer.pending
        await writer.close(timeout_s=600)
        drained_s = time.perf_counter() - started
        return {"offered_rows_per_s": rate, "rows": total, "offered_seconds": round(offered_s, 2),
                "pending_at_end": pending_at_end, "max_pending": max_pending,
                "drained_seconds": round(drained_s, 2),
                "kept_up": pending_at_end <= rate * 0.05, "written": writer.written}
    finally:
        await engine.dispose()


async def intents(url: str, concurrency: int, requests: int, durable: bool) -> dict[str, Any]:
    """Requests as the gateway makes them: `begin()` (the intent, committed before forwarding)
    then `submit()`, `concurrency` at a time. With durable off, `begin()` returns at once: the
    difference is what durability costs per request (CPU of this process, which runs the
    writer too; the wait before forwarding)."""
    engine = make_engine(url)
    try:
        await migrate(engine)
        writer = Writer(engine, buffer_rows=10 ** 9, durable=durable)
        key_id, version = "key_" + uuid.uuid4().hex[:16], uuid.uuid4().hex * 2
        made = [make_row(i, key_id, version) for i in range(requests)]
        decision = orjson.loads(made[0].decision)
        writer.start()
        waits: list[float] = []
        gate = asyncio.Semaphore(concurrency)

        async def one(row: RequestRecord) -> None:
            async with gate:
                t = time.perf_counter()
                await writer.begin(row, decision, True)
                waits.append(time.perf_counter() - t)
                writer.submit(row)
        cpu0, started = time.process_time(), time.perf_counter()
        await asyncio.gather(*(one(row) for row in made))
        await writer.close(timeout_s=600)
        cpu, elapsed = time.process_time() - cpu0, time.perf_counter() - started
        waits.sort()
        return {"durable": durable, "concurrency": concurrency, "requests": requests,
                "cpu_us_per_request": round(cpu / requests * 1e6, 1),
                "begin_p50_ms": round(waits[len(waits) // 2] * 1e3, 3),
                "begin_p99_ms": round(waits[int(len(waits) * 0.99)] * 1e3, 3),
                "intent_commits": writer.intent_commits, "seconds": round(elapsed, 2)}
    finally:
        await engine.dispose()


async def pg_database(base: str) -> tuple[str, Any] | None:
    """Create a throwaway database; return (its URL, a dropper), or None if no server."""
    import asyncpg

    dsn = base.replace("postgresql+asyncpg://", "postgresql://")
    try:
        conn = await asyncpg.connect(dsn, timeout=3)
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        print(f"PostgreSQL: no server at {dsn} ({type(exc).__name__}: {exc}); skipped",
              file=sys.stderr)
        return None
    name = "euroute_bench_" + uuid.uuid4().hex[:10]
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()

    async def drop() -> None:
        c = await asyncpg.connect(dsn, timeout=10)
        try:
            await c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await c.close()

    return base.rsplit("/", 1)[0] + "/" + name, drop


async def bench_db(kind: str, args: argparse.Namespace) -> dict[str, Any] | None:
    result: dict[str, Any] = {"database": kind, "target_rows_per_s": TARGETS[kind]}
    if kind == "sqlite":
        tmp = tempfile.mkdtemp(prefix="euroute-ledger-")

        def url(tag: str) -> str:
            return f"sqlite+aiosqlite:///{tmp}/{tag}.db"
        drop = None
    else:
        made = await pg_database(args.pg_url)
        if made is None:
            return None
        base, drop = made

        def url(tag: str) -> str:
            return base
    try:
        if args.intents:
            result["intents"] = [
                await intents(url(f"intents-{c}-{d}"), c, args.intents, d)
                for c in (1, 32) for d in (False, True)]
        result["burst"] = await burst(url("burst"), args.rows, args.batch_size)
        if not args.no_paced:
            result["paced"] = await paced(url("paced"), TARGETS[kind], args.paced_seconds,
                                          args.batch_size)
    finally:
        if drop is not None:
            await drop()
    result["meets_target"] = result["burst"]["rows_per_s"] >= TARGETS[kind]
    return result


async def amain(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for kind in args.db.split(","):
        kind = {"pg": "postgresql", "postgres": "postgresql"}.get(kind, kind)
        print(f"== {kind}: {args.rows} rows, batch {args.batch_size} ...", file=sys.stderr,
              flush=True)
        r = await bench_db(kind, args)
        if r is not None:
            out.append(r)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description="ledger inserts per second (see docstring)")
    parser.add_argument("--db", default="sqlite,postgresql")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=500,
                        help="Writer batch_size (the server's default is "
                             "EUROUTE_LEDGER_BATCH_SIZE=500)")
    parser.add_argument("--paced-seconds", type=float, default=5.0)
    parser.add_argument("--no-paced", action="store_true")
    parser.add_argument("--intents", type=int, default=0, metavar="N",
                        help="also measure durability: N requests through begin() + submit() "
                             "at concurrency 1 and 32, intents off and on")
    parser.add_argument("--pg-url", default="postgresql+asyncpg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    try:
        import uvloop
        results = uvloop.run(amain(args))
    except ImportError:
        results = asyncio.run(amain(args))
    lines = ["| database | rows | burst rows/s | writer CPU us/row | target | paced: offered "
             "rows/s, kept up | ",
             "|---|---|---|---|---|---|"]
    for r in results:
        b, p = r["burst"], r.get("paced")
        paced_text = (f"{p['offered_rows_per_s']}, {'yes' if p['kept_up'] else 'NO'} "
                      f"(max pending {p['max_pending']})" if p else "n/a")
        lines.append(f"| {r['database']} | {b['rows']} | {b['rows_per_s']:,} | "
                     f"{b['cpu_us_per_row']} | {r['target_rows_per_s']:,} "
                     f"{'PASS' if r['meets_target'] else 'MISS'} | {paced_text} |")
    costs = [(r["database"], m) for r in results for m in r.get("intents", ())]
    if costs:
        lines += ["", "Durability: the intent committed before forwarding (begin), per request",
                  "", "| database | concurrency | intents | CPU us/request | wait before "
                  "forwarding p50 ms | p99 ms | commits |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {db} | {m['concurrency']} | {'on' if m['durable'] else 'off'} | "
                  f"{m['cpu_us_per_request']} | {m['begin_p50_ms']} | {m['begin_p99_ms']} | "
                  f"{m['intent_commits']} |" for db, m in costs]
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    (args.out / f"ledger-{stamp}.json").write_text(json.dumps(results, indent=1, default=str))
    (args.out / "ledger-latest.md").write_text(table + "\n")
    bad = [r for r in results if r["burst"]["stored"] < r["burst"]["rows"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
