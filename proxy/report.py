"""Rows out as a table, JSON or CSV, for the CLI and the audit API alike."""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Iterable, Iterator, Mapping
from decimal import Decimal
from typing import Any

import orjson

FORMATS = ("table", "json", "csv")


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    return value


def to_json(data: Any) -> bytes:
    return orjson.dumps(data, default=_plain, option=orjson.OPT_INDENT_2)


def csv_lines(rows: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    """CSV one line at a time, so a large export never sits in memory whole."""
    buffer = io.StringIO()
    writer: csv.DictWriter[str] | None = None
    for row in rows:
        if writer is None:
            writer = csv.DictWriter(buffer, fieldnames=list(row), lineterminator="\n")
            writer.writeheader()
        writer.writerow({k: _plain(v) for k, v in row.items()})
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()


def table(rows: list[Mapping[str, Any]]) -> str:
    if not rows:
        return "(no rows)"
    columns = list(rows[0])
    cells = [[("" if r.get(c) is None else str(_plain(r.get(c)))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    def line(values: list[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()
    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, cells)])


def render(rows: list[Mapping[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return to_json(rows).decode()
    if fmt == "csv":
        return "".join(csv_lines(rows))
    return table(rows)
