"""What compliance asks of the ledger. Every query streams or aggregates in the database."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import ColumnElement, func, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.ledger.chain import first_fault
from proxy.ledger.tables import chains, ledger, tombstones

GROUPS = ("app", "model", "route", "day", "month", "policy", "outcome")
NANO = Decimal(1_000_000_000)


def money(nanos: int | None) -> Decimal:
    return (Decimal(nanos or 0) / NANO).quantize(Decimal("0.000000001"))


def plain(row: Any) -> dict[str, Any]:
    """A result row as a dict with plain str keys (SQLAlchemy's are a str subclass)."""
    return {str(k): v for k, v in row._mapping.items()}


def _group_column(group_by: str, dialect: str) -> ColumnElement[Any]:
    col = ledger.c.created_at
    if group_by == "day":
        return (func.date(col) if dialect == "sqlite"
                else func.to_char(col, "YYYY-MM-DD")).label("day")
    if group_by == "month":
        return (func.strftime("%Y-%m", col) if dialect == "sqlite"
                else func.to_char(col, "YYYY-MM")).label("month")
    return ledger.c[group_by].label(group_by)


def window(start: dt.datetime | None, end: dt.datetime | None,
           **filters: str | None) -> list[ColumnElement[bool]]:
    """The WHERE clauses of a time range [start, end) and equality filters on ledger columns."""
    where: list[ColumnElement[bool]] = []
    if start is not None:
        where.append(ledger.c.created_at >= start)
    if end is not None:
        where.append(ledger.c.created_at < end)
    where += [ledger.c[name] == value for name, value in filters.items() if value is not None]
    return where


async def usage(engine: AsyncEngine, *, start: dt.datetime | None = None,
                end: dt.datetime | None = None, group_by: str = "app",
                **filters: str | None) -> list[dict[str, Any]]:
    """Requests, tokens and exact cost per group (and currency), with a total row per currency."""
    if group_by not in GROUPS:
        raise ValueError(f"group_by must be one of {', '.join(GROUPS)}")
    group = _group_column(group_by, engine.dialect.name)
    stmt = (select(group, ledger.c.currency, func.count().label("requests"),
                   func.sum(ledger.c.prompt_tokens).label("prompt_tokens"),
                   func.sum(ledger.c.completion_tokens).label("completion_tokens"),
                   func.sum(ledger.c.cost_nanos).label("cost_nanos"))
            .where(*window(start, end, **filters))
            .group_by(group, ledger.c.currency).order_by(group, ledger.c.currency))
    async with engine.connect() as conn:
        rows = (await conn.execute(stmt)).all()
    out: list[dict[str, Any]] = []
    totals: dict[str | None, list[int]] = {}
    for key, currency, n, pt, ct, nanos in rows:
        out.append({group_by: key, "requests": n, "prompt_tokens": int(pt or 0),
                    "completion_tokens": int(ct or 0), "cost": money(nanos),
                    "currency": currency})
        t = totals.setdefault(currency, [0, 0, 0, 0])
        for i, v in enumerate((n, pt, ct, nanos)):
            t[i] += int(v or 0)
    for currency, (n, pt, ct, nanos) in sorted(totals.items(), key=lambda kv: str(kv[0])):
        out.append({group_by: "TOTAL", "requests": n, "prompt_tokens": pt,
                    "completion_tokens": ct, "cost": money(nanos), "currency": currency})
    return out


PUBLIC_COLUMNS: Sequence[str] = tuple(
    c.name for c in ledger.columns if c.name not in ("end_user_salt",))


async def find(engine: AsyncEngine, ident: str) -> dict[str, Any] | None:
    """One ledger row by request id or decision id, with its decision record decoded."""
    cols = [ledger.c[n] for n in PUBLIC_COLUMNS]
    async with engine.connect() as conn:
        row = (await conn.execute(select(*cols).where(
            or_(ledger.c.decision_id == ident, ledger.c.request_id == ident)))).first()
    if row is None:
        return None
    found = plain(row)
    found["decision"] = orjson.loads(found["decision"])
    found["cost"] = money(found.pop("cost_nanos"))
    return found


async def verify(engine: AsyncEngine) -> dict[str, Any]:
    """Re-check every writer's hash chain; name the first altered, missing or moved row."""
    async with engine.connect() as conn:
        heads = (await conn.execute(select(chains).order_by(chains.c.started_at))).all()
        writers = {h.writer_id: h for h in heads}
        for (wid,) in (await conn.execute(select(ledger.c.writer_id).distinct())).all():
            if wid not in writers:
                return {"ok": False, "rows": 0, "finding": f"unknown_writer: writer {wid} "
                        "has rows but no chain head"}
        checked = 0
        for head in heads:
            stones = {s.seq: s.row_hash for s in (await conn.execute(
                select(tombstones.c.seq, tombstones.c.row_hash)
                .where(tombstones.c.writer_id == head.writer_id))).all()}
            result = await conn.stream(select(ledger).where(
                ledger.c.writer_id == head.writer_id).order_by(ledger.c.seq)
                .execution_options(yield_per=5000))
            rows = (plain(r) async for r in result)
            n, finding = await first_fault(rows, head.writer_id, stones, head.last_seq,
                                           head.last_hash)
            checked += n
            if finding is not None:
                return {"ok": False, "rows": checked, "finding": str(finding)}
    return {"ok": True, "rows": checked, "writers": len(heads), "finding": None}
