"""What compliance asks of the ledger about requests: usage, decisions, one request, the raw
rows, and whether the chains still verify. Aggregation happens in the database; row listings
stream. What reached providers (transfers, copies, contracts) is in `providers.py`.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

import orjson
from sqlalchemy import ColumnElement, and_, case, func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from proxy.ledger import anchors
from proxy.ledger.chain import (
    DEV_KEY,
    DEV_KEYRING,
    TOMBSTONE_REASONS,
    ChainCheck,
    Keyring,
    head_mac,
    tombstone_mac,
)
from proxy.ledger.tables import chains, dead_letters, ledger, tombstones

FILTERS = ("app", "model", "route", "policy", "outcome")
GROUPS = ("app", "model", "route", "day", "month", "policy", "outcome", "endpoint")
DECISION_GROUPS = ("policy", "requirement", "app", "model", "route", "day", "month")
NANO = Decimal(1_000_000_000)
# Raw rows leave the database without the pseudonym's salt: with it, anyone holding a list of
# candidate pseudonyms could confirm them against the commitments.
EXPORT_COLUMNS: Sequence[str] = tuple(
    str(c.name) for c in ledger.columns if c.name != "end_user_salt")


# What a filter may compare a column with: the column's length, and no control characters
# (PostgreSQL refuses NUL in text; nothing stored has any).
FILTER_LENGTHS = {name: ledger.c[name].type.length for name in FILTERS}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def instant(text: str) -> dt.datetime:
    """A UTC instant from YYYY-MM-DD or an ISO timestamp (naive means UTC). ValueError on
    anything else, including times that do not exist in UTC (year 1 at +14:00)."""
    if not text.isascii():
        raise ValueError(f"not an ISO 8601 date or time: {text!r}")
    try:
        value = dt.datetime.fromisoformat(text)
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)
    except OverflowError:
        raise ValueError(f"{text!r} is outside the years 1 to 9999 in UTC") from None


def until(text: str) -> dt.datetime:
    """The end of a range: a plain date (`--to 2026-11-30`) includes that whole day."""
    value = instant(text)
    try:
        return value + dt.timedelta(days=1) if len(text) == 10 else value
    except OverflowError:
        raise ValueError(f"{text!r} is the last day there is; give a time instead") from None


def filter_value(name: str, text: str) -> str:
    """`text` as a filter on column `name`, or ValueError: no value the column cannot hold."""
    limit = FILTER_LENGTHS[name]
    if len(text) > limit or _CONTROL.search(text):
        raise ValueError(f"{name} must be at most {limit} characters without control characters")
    return text


@dataclass(frozen=True, slots=True, kw_only=True)
class Window:
    """A time range [start, end) and equality filters on ledger columns."""

    start: dt.datetime | None = None
    end: dt.datetime | None = None
    app: str | None = None
    model: str | None = None
    route: str | None = None
    policy: str | None = None
    outcome: str | None = None

    def where(self) -> list[ColumnElement[bool]]:
        where: list[ColumnElement[bool]] = []
        if self.start is not None:
            where.append(ledger.c.created_at >= self.start)
        if self.end is not None:
            where.append(ledger.c.created_at < self.end)
        for name in FILTERS:
            value = getattr(self, name)
            if value is not None:
                where.append(ledger.c[name] == value)
        return where


EVERYTHING = Window()


def money(nanos: int | None) -> Decimal:
    return (Decimal(nanos or 0) / NANO).quantize(Decimal("0.000000001"))


def plain(row: Any) -> dict[str, Any]:
    """A result row as a dict with plain str keys (SQLAlchemy's are a str subclass)."""
    return {str(k): v for k, v in row._mapping.items()}


def group_column(group_by: str, dialect: str) -> ColumnElement[Any]:
    col = ledger.c.created_at
    if group_by in ("day", "month"):
        if dialect == "sqlite":
            # Stored as 'YYYY-MM-DD HH:MM:SS...' in UTC: a prefix is the day or month, and
            # cheaper per row than strftime.
            return func.substr(col, 1, 10 if group_by == "day" else 7).label(group_by)
        return func.to_char(col, "YYYY-MM-DD" if group_by == "day" else "YYYY-MM").label(group_by)
    return ledger.c[group_by].label(group_by)


def _check_group(group_by: str, allowed: Sequence[str]) -> None:
    if group_by not in allowed:
        raise ValueError(f"group_by must be one of {', '.join(allowed)}")


async def usage(engine: AsyncEngine, window: Window = EVERYTHING, *,
                group_by: str = "app") -> list[dict[str, Any]]:
    """Requests (denied and failed among them), tokens and exact cost: one row per group, then
    a TOTAL row per currency.

    Requests that reached no provider (denials, bad input) have no currency; they are counted in
    their group's row, and in the first TOTAL. A group that spent in two currencies has a row
    per currency. Each request is counted once in the group rows and once in the TOTAL rows.
    """
    _check_group(group_by, GROUPS)
    group = group_column(group_by, engine.dialect.name)
    outcome = ledger.c.outcome
    stmt = (select(group, ledger.c.currency, func.count(),
                   func.sum(case((outcome == "denied", 1), else_=0)),
                   func.sum(case((outcome.not_in(("ok", "denied")), 1), else_=0)),
                   func.sum(ledger.c.prompt_tokens), func.sum(ledger.c.completion_tokens),
                   func.sum(ledger.c.cost_nanos))
            .where(*window.where())
            .group_by(group, ledger.c.currency)
            # Per group, the currency-less part first, so it can join the first priced row.
            .order_by(group.nulls_first(), ledger.c.currency.nulls_first()))
    async with engine.connect() as conn:
        found = (await conn.execute(stmt)).all()
    rows: list[dict[str, Any]] = []
    for key, currency, *values in found:
        row = {group_by: key, **dict(zip(_COUNTS, (int(v or 0) for v in values), strict=True)),
               "currency": currency}
        if rows and rows[-1][group_by] == key and rows[-1]["currency"] is None:
            _add(row, rows.pop())
        rows.append(row)
    totals: dict[str | None, dict[str, Any]] = {}
    for row in rows:
        _add(totals.setdefault(row["currency"], {group_by: "TOTAL", **dict.fromkeys(_COUNTS, 0),
                                                 "currency": row["currency"]}), row)
    unpriced = totals.pop(None, None)
    if unpriced is not None:
        if totals:
            _add(totals[min(totals)], unpriced)  # type: ignore[type-var]
        else:
            totals[None] = unpriced
    ordered = [totals[c] for c in sorted(totals, key=lambda c: c or "")]
    return [_priced(r, group_by) for r in [*rows, *ordered]]


_COUNTS = ("requests", "denied", "failed", "prompt_tokens", "completion_tokens", "cost_nanos")


def _add(into: dict[str, Any], row: dict[str, Any]) -> None:
    for name in _COUNTS:
        into[name] += row[name]


def _priced(row: dict[str, Any], group_by: str) -> dict[str, Any]:
    return {group_by: row[group_by], "requests": row["requests"], "denied": row["denied"],
            "failed": row["failed"], "prompt_tokens": row["prompt_tokens"],
            "completion_tokens": row["completion_tokens"], "cost": money(row["cost_nanos"]),
            "currency": row["currency"]}


async def seen(engine: AsyncEngine, column: str, value: str) -> bool:
    """Whether any ledger row has `value` in `column` (one of FILTERS)."""
    if column not in FILTERS:
        raise ValueError(f"column must be one of {', '.join(FILTERS)}")
    async with engine.connect() as conn:
        found = await conn.execute(select(ledger.c.id).where(ledger.c[column] == value).limit(1))
        return found.first() is not None


async def decisions(engine: AsyncEngine, window: Window = EVERYTHING, *,
                    group_by: str = "policy") -> list[dict[str, Any]]:
    """Denials per group: `denied` were refused; `dryrun_denied` failed the policy but were
    forwarded because it runs in dry-run. By requirement, a request that failed two
    requirements counts under each."""
    _check_group(group_by, DECISION_GROUPS)
    denied = func.sum(case((ledger.c.outcome == "denied", 1), else_=0))
    would = func.sum(case((and_(ledger.c.failed_requirements.is_not(None),
                                ledger.c.outcome != "denied"), 1), else_=0))
    if group_by == "requirement":
        return await _by_requirement(engine, window, denied, would)
    group = group_column(group_by, engine.dialect.name)
    stmt = (select(group, func.count(), denied, would).where(*window.where())
            .group_by(group).order_by(group.nulls_first()))
    async with engine.connect() as conn:
        rows = (await conn.execute(stmt)).all()
    out = [{group_by: key, "requests": n, "denied": int(d or 0), "dryrun_denied": int(w or 0)}
           for key, n, d, w in rows]
    out.append({group_by: "TOTAL", "requests": sum(r["requests"] for r in out),
                "denied": sum(r["denied"] for r in out),
                "dryrun_denied": sum(r["dryrun_denied"] for r in out)})
    return out


async def _by_requirement(engine: AsyncEngine, window: Window, denied: Any, would: Any
                          ) -> list[dict[str, Any]]:
    # The database groups by the comma-joined set of failed requirements (a handful of
    # distinct sets); splitting those few rows here keeps the SQL the same on both databases.
    stmt = (select(ledger.c.policy, ledger.c.failed_requirements, denied, would)
            .where(ledger.c.failed_requirements.is_not(None), *window.where())
            .group_by(ledger.c.policy, ledger.c.failed_requirements))
    async with engine.connect() as conn:
        rows = (await conn.execute(stmt)).all()
    counts: Counter[tuple[str, str, str]] = Counter()
    for policy, failed, d, w in rows:
        for requirement in failed.split(","):
            if requirement == "enabled":
                # An unconfigured route (no base URL) is the operator's choice, not a
                # requirement the request failed; older rows still list it.
                continue
            counts[policy, requirement, "denied"] += int(d or 0)
            counts[policy, requirement, "dryrun_denied"] += int(w or 0)
    pairs = sorted({(p, r) for p, r, _ in counts})
    return [{"policy": p, "requirement": r, "denied": counts[p, r, "denied"],
             "dryrun_denied": counts[p, r, "dryrun_denied"]} for p, r in pairs]


async def find(engine: AsyncEngine, ident: str,
               by: Literal["any", "request", "decision"] = "any") -> dict[str, Any] | None:
    """One ledger row by request id or decision id, with its decision record decoded."""
    match = {"request": ledger.c.request_id == ident,
             "decision": ledger.c.decision_id == ident,
             "any": (ledger.c.request_id == ident) | (ledger.c.decision_id == ident)}[by]
    async with engine.connect() as conn:
        row = (await conn.execute(
            select(*[ledger.c[n] for n in EXPORT_COLUMNS]).where(match))).first()
    if row is None:
        return None
    found = plain(row)
    found["decision"] = orjson.loads(found["decision"])
    found["cost"] = money(found.pop("cost_nanos"))
    return found


async def export(engine: AsyncEngine, window: Window = EVERYTHING, *,
                 batch: int = 5000) -> AsyncGenerator[tuple[Any, ...], None]:
    """Raw rows (EXPORT_COLUMNS, in that order) oldest first, fetched `batch` at a time."""
    stmt = (select(*[ledger.c[n] for n in EXPORT_COLUMNS]).where(*window.where())
            .order_by(ledger.c.created_at, ledger.c.id).execution_options(yield_per=batch))
    async with engine.connect() as conn:
        result = await conn.stream(stmt)
        # A batch per await: iterating rows one by one would cross into the driver's
        # greenlet for every row, which costs more than the rest of a CSV export together.
        async for rows in result.partitions():
            for row in rows:
                yield tuple(row)


async def verify(engine: AsyncEngine, keyring: Keyring = DEV_KEYRING,
                 anchored: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Re-check every writer's keyed hash chain, its head and its tombstones; name the first
    altered, missing, moved or forged one. With `anchored` (anchors.read), also check the
    database against every anchor published outside it."""
    result: dict[str, Any] = {"ok": True, "rows": 0, "writers": 0, "finding": None,
                              "unkeyed_rows": 0, "dev_key": keyring.current.id == DEV_KEY.id}
    async with engine.connect() as conn:
        result["dead_letters"] = (await conn.execute(
            select(func.count()).select_from(dead_letters))).scalar_one()
        finding = await _chains(conn, keyring, result)
        if finding is None and anchored is not None:
            found = await anchors.check(conn, anchored, keyring)
            finding = "; ".join(found) if found else None
            result["anchors"] = len(anchored)
    result.update(ok=finding is None, finding=finding)
    return result


async def _chains(conn: AsyncConnection, keyring: Keyring, result: dict[str, Any]
                  ) -> str | None:
    heads = (await conn.execute(select(chains).order_by(chains.c.started_at))).all()
    writers = {h.writer_id: h for h in heads}
    result["writers"] = len(heads)
    for (wid,) in (await conn.execute(select(ledger.c.writer_id).distinct())).all():
        if wid not in writers:
            return f"unknown_writer: writer {wid} has rows but no chain head"
    for head in heads:
        keyed = head.hash_key_id is not None
        if keyed:
            key = keyring.get(head.hash_key_id)
            if key is None:
                return f"unknown_key: writer {head.writer_id} head (key {head.hash_key_id})"
            if head.head_mac != head_mac(key, head.writer_id, head.last_seq, head.last_hash):
                return f"forged_head: writer {head.writer_id} seq {head.last_seq}"
        stones: dict[int, str] = {}
        for s in (await conn.execute(select(tombstones).where(
                tombstones.c.writer_id == head.writer_id))).all():
            if (problem := _tombstone_fault(plain(s), keyring, keyed)) is not None:
                return f"{problem}: writer {head.writer_id} seq {s.seq}"
            stones[s.seq] = s.row_hash
        check = ChainCheck(head.writer_id, stones, keyring, keyed)
        stream = await conn.stream(select(ledger).where(
            ledger.c.writer_id == head.writer_id).order_by(ledger.c.seq)
            .execution_options(yield_per=5000))
        async for row in stream:
            if (found := check.feed(plain(row))) is not None:
                result["rows"] += check.rows
                return str(found)
        result["rows"] += check.rows
        result["unkeyed_rows"] += check.unkeyed
        if (found := check.end(head.last_seq, head.last_hash)) is not None:
            return str(found)
    return None


def _tombstone_fault(stone: dict[str, Any], keyring: Keyring, keyed: bool) -> str | None:
    """A tombstone must be keyed like its chain, name a known reason, and (for a purge) stand
    for a row whose retention period had ended."""
    if stone["hash_key_id"] is None:
        return "unkeyed_tombstone" if keyed else None
    key = keyring.get(stone["hash_key_id"])
    if key is None:
        return "unknown_key"
    if stone["mac"] != tombstone_mac(key, stone) or stone["reason"] not in TOMBSTONE_REASONS:
        return "forged_tombstone"
    if stone["reason"] == "retention_purge" and not (
            stone["retain_until"] < stone["purged_at"].date()):
        return "purged_in_retention"
    return None
