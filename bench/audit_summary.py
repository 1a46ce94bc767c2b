"""Compliance queries on a large ledger: the monthly usage summary and a streamed CSV export of
one month, on SQLite and PostgreSQL, through the real query code (proxy.ledger.queries).

    python bench/audit_summary.py                  # 1,000,000 rows on each database
    python bench/audit_summary.py --smoke          # 10,000 rows, seconds
    python bench/audit_summary.py --rows 200000 --db sqlite

Rows are generated (not hash-chained: the queries never read the chain) over three months,
in time order as the writer appends them, across 8 apps, 3 models on 3 routes, 2 policies,
with 3% denials (no route, no cost). They are inserted with executemany in batches into a
temp SQLite file, and into a throwaway PostgreSQL database created on the server (default
127.0.0.1:5432, user postgres) and dropped afterwards. Both are migrated with Alembic first,
so the indexes are the production ones; then ANALYZE (and VACUUM on PostgreSQL), as autovacuum
would after a bulk load.

Timed, best of three after a first (cold) run:
- monthly summary: usage grouped by month over the whole three months;
- one month by app: usage grouped by app for one month;
- one month, CSV export: every row of that month streamed as CSV (bytes counted, not kept),
  with the process's RSS growth while it runs.
The query plans of the one-month and one-day ranges are recorded to show the index use.
Prints a Markdown table; writes bench/results/audit_summary.json (a smoke run writes to
bench/results/smoke/). Target (issue 5): the monthly summary under 2 s on each database.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sqlalchemy import insert, text  # noqa: E402
from sqlalchemy.ext.asyncio import AsyncEngine  # noqa: E402
from sqlalchemy.pool import NullPool  # noqa: E402

from proxy import report  # noqa: E402
from proxy.ledger import queries  # noqa: E402
from proxy.ledger.db import make_engine, migrate  # noqa: E402
from proxy.ledger.tables import ledger  # noqa: E402

TARGET_S = 2.0
START = dt.datetime(2026, 8, 1, tzinfo=dt.UTC)
END = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)  # three months: August, September, October
MONTH = (dt.datetime(2026, 9, 1, tzinfo=dt.UTC), dt.datetime(2026, 10, 1, tzinfo=dt.UTC))
DAY = (dt.datetime(2026, 9, 15, tzinfo=dt.UTC), dt.datetime(2026, 9, 16, tzinfo=dt.UTC))
APPS = [f"app-{i}" for i in range(8)]
ROUTES = [("mistral-eu-magistral-small", "magistral-small-2509", 500, 1500),
          ("mistral-eu-magistral-medium", "magistral-medium-2509", 2000, 5000),
          ("mistral-eu-embed", "mistral-embed", 100, 0)]
BATCH = 10_000
PG_ADMIN = os.environ.get("EUROUTE_BENCH_PG",
                          "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres")


def rows(n: int, seed: int = 5) -> Any:
    """n ledger rows in time order, BATCH at a time."""
    rng = random.Random(seed)
    step = (END - START) / n
    decision = ('{"input":{"app":"%s","endpoint":"chat","model":"%s","policy":"%s",'
                '"needs":["chat"],"narrowing":[],"stream":false},"result":"%s","reasons":[]}')
    batch = []
    for i in range(n):
        created = START + step * i
        app = APPS[rng.randrange(len(APPS))]
        route, model, price_in, price_out = ROUTES[rng.randrange(len(ROUTES))]
        policy = "eu-strict" if app == "app-7" else "eu-standard"
        denied = rng.random() < 0.03
        pt, ct = rng.randrange(10, 4000), (0 if route.endswith("embed") else rng.randrange(1, 2000))
        batch.append({
            "request_id": f"req_{i:024x}", "created_at": created, "writer_id": "bench",
            "seq": i + 1, "app": app, "key_id": f"key_{app}", "end_user": None,
            "end_user_salt": None, "end_user_commitment": None, "endpoint": "chat",
            "model": model, "route": None if denied else route,
            "provider": None if denied else "mistral", "upstream_model": model,
            "inference_location": None if denied else "FR",
            "storage_location": None if denied else "FR",
            "transfer_mechanism": None if denied else "none_needed", "zdr_reference": None,
            "dpa_reference": None if denied else "DPA-MISTRAL-2025-0042",
            "policy": policy, "policy_version": "0" * 64, "enforcement": "enforce",
            "decision_id": f"dec_{i:024x}",
            "decision": decision % (app, model, policy, "deny" if denied else "allow"),
            "failed_requirements": "zero_data_retention" if denied else None,
            "outcome": "denied" if denied else "ok", "status": 403 if denied else 200,
            "latency_us": rng.randrange(200, 90_000), "ttfb_us": None if denied else 150,
            "prompt_tokens": 0 if denied else pt, "completion_tokens": 0 if denied else ct,
            "usage_missing": False,
            "cost_nanos": 0 if denied else pt * price_in + ct * price_out,
            "currency": None if denied else "USD",
            "provider_retention_days": None if denied else 30,
            "provider_copy_gone_on": None if denied else created.date() + dt.timedelta(days=30),
            "retain_until": created.date() + dt.timedelta(days=400), "content_stored": False,
            "prev_hash": "0" * 64, "row_hash": "0" * 64,
        })
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


async def load(engine: AsyncEngine, n: int) -> float:
    """Insert n rows; returns rows/s."""
    started = time.perf_counter()
    for batch in rows(n):
        async with engine.begin() as conn:
            await conn.execute(insert(ledger), batch)
    elapsed = time.perf_counter() - started
    # VACUUM cannot run inside a transaction.
    async with engine.execution_options(isolation_level="AUTOCOMMIT").connect() as conn:
        await conn.exec_driver_sql("VACUUM ANALYZE ledger" if engine.dialect.name == "postgresql"
                                   else "ANALYZE")
    return n / elapsed


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def timed(work: Callable[[], Awaitable[Any]], runs: int = 3) -> dict[str, Any]:
    times = []
    result = None
    for _ in range(runs + 1):  # the first run is the cold one
        started = time.perf_counter()
        result = await work()
        times.append(time.perf_counter() - started)
    return {"cold_s": round(times[0], 4), "best_s": round(min(times[1:]), 4), "result": result}


async def export_month(engine: AsyncEngine) -> dict[str, Any]:
    window = queries.Window(start=MONTH[0], end=MONTH[1])
    size = lines = 0
    before = peak = rss_mb()
    async with contextlib.aclosing(queries.export(engine, window)) as stream:
        async for chunk in report.csv_chunks(queries.EXPORT_COLUMNS, stream):
            size += len(chunk)
            lines += chunk.count("\n")
            peak = max(peak, rss_mb())
    return {"rows": lines - 1, "mb": round(size / 2**20, 1),
            "rss_growth_mb": round(peak - before, 1)}


async def plans(engine: AsyncEngine) -> dict[str, list[str]]:
    """The plans of usage-by-app over one month and over one day."""
    out = {}
    prefix = "EXPLAIN QUERY PLAN " if engine.dialect.name == "sqlite" else "EXPLAIN "
    for name, (start, end) in (("one_month", MONTH), ("one_day", DAY)):
        sql = ("SELECT app, currency, count(*), sum(cost_nanos) FROM ledger "
               "WHERE created_at >= :start AND created_at < :end GROUP BY app, currency")
        # Bound as stored: naive UTC (a timestamp on PostgreSQL, ISO text on SQLite).
        bounds: dict[str, Any] = {"start": start.replace(tzinfo=None),
                                  "end": end.replace(tzinfo=None)}
        if engine.dialect.name == "sqlite":
            bounds = {k: v.isoformat(" ", "microseconds") for k, v in bounds.items()}
        async with engine.connect() as conn:
            found = await conn.execute(text(prefix + sql), bounds)
            out[name] = [str(r[-1]) for r in found]
    return out


async def measure(backend: str, url: str, n: int) -> dict[str, Any]:
    engine = make_engine(url, poolclass=NullPool)
    try:
        await migrate(engine)
        print(f"{backend}: inserting {n:,} rows ...", file=sys.stderr)
        insert_rate = await load(engine, n)
        print(f"{backend}: {insert_rate:,.0f} rows/s; querying ...", file=sys.stderr)
        month_window = queries.Window(start=MONTH[0], end=MONTH[1])
        summary = await timed(lambda: queries.usage(engine, group_by="month"))
        by_app = await timed(lambda: queries.usage(engine, month_window, group_by="app"))
        export = await timed(lambda: export_month(engine), runs=1)
        return {
            "backend": backend, "rows": n, "insert_rows_per_s": round(insert_rate),
            "monthly_summary": {**summary, "result": len(summary["result"])},
            "one_month_by_app": {**by_app, "result": len(by_app["result"])},
            "one_month_csv_export": {"cold_s": export["cold_s"], "best_s": export["best_s"],
                                     **export["result"]},
            "monthly_summary_rows": json.loads(report.to_json(summary["result"])),
            "plans": await plans(engine),
        }
    finally:
        await engine.dispose()


async def _pg(statement: str) -> None:
    engine = make_engine(PG_ADMIN, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.exec_driver_sql(statement)
    finally:
        await engine.dispose()


async def run(backends: list[str], n: int) -> list[dict[str, Any]]:
    results = []
    if "sqlite" in backends:
        with tempfile.TemporaryDirectory() as tmp:
            results.append(await measure("sqlite", f"sqlite+aiosqlite:///{tmp}/ledger.db", n))
    if "postgresql" in backends:
        name = f"euroute_bench_{os.getpid()}"
        try:
            await _pg(f'CREATE DATABASE "{name}"')
        except OSError as exc:
            print(f"postgresql: skipped, no server at {PG_ADMIN} ({exc})", file=sys.stderr)
            return results
        try:
            results.append(await measure("postgresql", PG_ADMIN.rsplit("/", 1)[0] + f"/{name}",
                                         n))
        finally:
            await _pg(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return results


def markdown(results: list[dict[str, Any]]) -> str:
    header = ("| database | rows | insert rows/s | monthly summary, 3 months by month | "
              "one month by app | one month CSV export |")
    lines = [header, "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        s, a, e = r["monthly_summary"], r["one_month_by_app"], r["one_month_csv_export"]
        verdict = "ok" if s["best_s"] < TARGET_S else "MISSED"
        lines.append(
            f"| {r['backend']} | {r['rows']:,} | {r['insert_rows_per_s']:,} | "
            f"{s['best_s']:.3f} s (cold {s['cold_s']:.3f} s; target < {TARGET_S:g} s: "
            f"{verdict}) | {a['best_s']:.3f} s (cold {a['cold_s']:.3f} s) | "
            f"{e['rows']:,} rows, {e['mb']} MB in {e['best_s']:.2f} s "
            f"({e['rows'] / e['best_s']:,.0f} rows/s), RSS +{e['rss_growth_mb']} MB |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--smoke", action="store_true", help="10,000 rows")
    parser.add_argument("--db", default="sqlite,postgresql", help="comma-separated backends")
    args = parser.parse_args()
    n = 10_000 if args.smoke else args.rows
    results = asyncio.run(run([b.strip() for b in args.db.split(",")], n))
    table = markdown(results)
    print(table)
    out = REPO / "bench" / "results" / ("smoke" if args.smoke else "") / "audit_summary.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "platform": platform.platform()},
        "target_monthly_summary_s": TARGET_S, "results": results, "markdown": table,
    }, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(REPO)}", file=sys.stderr)
    return 0 if all(r["monthly_summary"]["best_s"] < TARGET_S for r in results) else 2


if __name__ == "__main__":
    sys.exit(main())
