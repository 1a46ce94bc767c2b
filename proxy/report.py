"""Rows out as a table, JSON or CSV, for the CLI and the audit API alike."""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping, Sequence
from decimal import Decimal
from typing import Any

import orjson

FORMATS = ("table", "json", "csv")
# What the csv module writes as is; a check per value that is cheaper than calling _plain.
_NATIVE = frozenset({str, int, float, bool, type(None)})


# A cell starting with one of these is a formula to a spreadsheet: a model id an app chose
# would run as `=HYPERLINK(...)`. OWASP's CSV-injection advice: prefix a single quote.
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    """A value as a CSV cell: text that a spreadsheet would evaluate is neutralised."""
    if type(value) is str:
        return "'" + value if value.startswith(_FORMULA) else value
    return value if type(value) in _NATIVE else _plain(value)


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    return value


def to_json(data: Any) -> bytes:
    return orjson.dumps(data, default=_plain, option=orjson.OPT_INDENT_2)


def csv_lines(rows: Iterable[Mapping[str, Any]],
              columns: Sequence[str] | None = None) -> Iterator[str]:
    """CSV one line at a time, so a large export never sits in memory whole. The header is
    `columns`, else the first row's keys (no rows and no columns: no output). Lines end in
    CRLF (RFC 4180), which also makes the writer quote a CR or LF inside a cell."""
    buffer = io.StringIO()
    writer: csv.DictWriter[str] | None = None
    if columns is not None:
        writer = csv.DictWriter(buffer, fieldnames=list(columns))
        writer.writeheader()
    for row in rows:
        if writer is None:
            writer = csv.DictWriter(buffer, fieldnames=list(row))
            writer.writeheader()
        writer.writerow({k: _cell(v) for k, v in row.items()})
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    if buffer.tell():
        yield buffer.getvalue()


async def csv_chunks(columns: Sequence[str], rows: AsyncIterable[Sequence[Any]],
                     size: int = 1 << 16) -> AsyncIterator[str]:
    """A streamed CSV export: header, then rows, in chunks of about `size` characters (one
    write per chunk, not per row)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    async for row in rows:
        writer.writerow([_cell(v) for v in row])
        if buffer.tell() >= size:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


async def jsonl_chunks(columns: Sequence[str], rows: AsyncIterable[Sequence[Any]],
                       size: int = 1 << 16) -> AsyncIterator[bytes]:
    """A streamed export as JSON lines, one object per row, in chunks of about `size` bytes."""
    chunk = bytearray()
    async for row in rows:
        chunk += orjson.dumps(dict(zip(columns, row, strict=True)), default=_plain)
        chunk += b"\n"
        if len(chunk) >= size:
            yield bytes(chunk)
            chunk.clear()
    yield bytes(chunk)


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return "(no rows)"
    columns = list(rows[0])
    cells = [[("" if r.get(c) is None else str(_plain(r.get(c)))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    def line(values: list[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()
    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, cells)])


def render(rows: Sequence[Mapping[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return to_json(rows).decode()
    if fmt == "csv":
        return "".join(csv_lines(rows))
    return table(rows)


def explain_rows(decision: Any) -> list[dict[str, str]]:
    """A policy decision (proxy.policy.decide.Decision) as rows: every route against every
    requirement, for `euroute policy explain` and the dashboard."""
    rows = []
    for verdict in decision.verdicts:
        if not verdict.enabled:
            rows.append({"route": verdict.route.id, "requirement": "enabled", "result": "FAIL",
                         "why": "route has no base URL configured"})
        for check in verdict.checks:
            rows.append({"route": verdict.route.id, "requirement": check.requirement,
                         "result": "pass" if check.ok else "FAIL", "why": check.detail})
    return rows
