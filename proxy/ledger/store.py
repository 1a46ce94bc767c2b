"""The ledger's two writes on the path of every request: intents, committed before forwarding,
and batches of rows (with the chain head, the intents they settle and the keys' last use).

Each goes by the cheapest path its database has (bench/ledger.py measures them):

- SQLite: one thread owns one plain sqlite3 connection (WAL, synchronous=NORMAL: a commit
  survives the process being killed) and runs both writes in turn. With a second connection
  for intents, the two took turns at SQLite's one write lock, and a connection that finds it
  taken sleeps for milliseconds (SQLite's busy handler): streams lost a quarter of their
  throughput to durability. Through the pooled engine, each BEGIN, INSERT and COMMIT was a
  thread hop of its own (about 0.5 ms of CPU per intent group).
- PostgreSQL (asyncpg): intents on a connection of their own, one autocommitted
  INSERT ... SELECT FROM unnest(...) per group; rows through the engine, by binary COPY.
- Any other database: SQLAlchemy Core through the engine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import operator
import sqlite3
from typing import Any

import asyncpg
from sqlalchemy import Date, bindparam, insert, update
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.ledger import intents
from proxy.ledger.db import SQLITE_PRAGMAS
from proxy.ledger.record import RequestRecord
from proxy.ledger.tables import UTCDateTime, api_keys, chains, ledger

_COLS = [c for c in ledger.columns if c.name != "id"]
COLUMNS = tuple(str(c.name) for c in _COLS)
_pick = operator.attrgetter(*COLUMNS)
_TIMES = [i for i, c in enumerate(_COLS) if isinstance(c.type, UTCDateTime)]
_DATES = [i for i, c in enumerate(_COLS) if isinstance(c.type, Date)]
_INTENT_COLUMNS = "(request_id, writer_id, created_at, facts)"
_HEAD = ("last_seq", "last_hash", "updated_at", "hash_key_id", "head_mac")
_SQL = {
    "row": f"INSERT INTO ledger ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
    "intent": f"INSERT INTO ledger_intents {_INTENT_COLUMNS} VALUES (?, ?, ?, ?)",
    "head": f"UPDATE ledger_chains SET {', '.join(f'{c} = ?' for c in _HEAD)} WHERE writer_id = ?",
    "settled": "DELETE FROM ledger_intents WHERE request_id = ?",
    "key_use": "UPDATE api_keys SET last_used_at = ? WHERE id = ?",
}


def _naive(when: dt.datetime) -> dt.datetime:
    return when.astimezone(dt.UTC).replace(tzinfo=None)


def _text(when: dt.datetime) -> str:
    """A time as SQLAlchemy's SQLite dialect stores it (and parses it back): naive UTC text."""
    return _naive(when).isoformat(" ", "microseconds")


def _records(batch: list[RequestRecord], sqlite: bool) -> list[tuple[Any, ...]]:
    """Rows as value lists, times as naive UTC: SQLite gets the text forms SQLAlchemy's
    dialect stores and parses back, asyncpg the objects its binary COPY takes."""
    out = []
    for row in batch:
        values = list(_pick(row))
        for i in _TIMES:
            if (when := values[i]) is not None:
                values[i] = _text(when) if sqlite else _naive(when)
        if sqlite:
            for i in _DATES:
                if (day := values[i]) is not None:
                    values[i] = day.isoformat()
        out.append(tuple(values))
    return out


class Store:
    """The writer's connection(s) for intents and rows (the module docstring says which)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        url = engine.url
        self.sqlite_path = (str(url.database) if url.get_backend_name() == "sqlite"
                            and url.database not in (None, "", ":memory:") else None)
        self.asyncpg = url.get_backend_name() == "postgresql" and url.get_driver_name() == "asyncpg"
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._sqlite: sqlite3.Connection | None = None
        self._pg: Any = None

    async def commit_intents(self, group: list[dict[str, Any]]) -> None:
        """Commit a group of intents (`intents.values()`), in one round trip."""
        if self.sqlite_path is not None:
            rows = [(g["request_id"], g["writer_id"], _text(g["created_at"]), g["facts"])
                    for g in group]
            await self._in_thread(("intent", rows))
        elif self.asyncpg:
            if self._pg is None or self._pg.is_closed():
                self._pg = await asyncpg.connect(
                    self.engine.url.set(drivername="postgresql")
                    .render_as_string(hide_password=False))
            await self._pg.execute(
                f"INSERT INTO ledger_intents {_INTENT_COLUMNS} SELECT * FROM unnest("
                "$1::varchar[], $2::varchar[], $3::timestamp[], $4::text[])",
                [g["request_id"] for g in group], [g["writer_id"] for g in group],
                [_naive(g["created_at"]) for g in group], [g["facts"] for g in group])
        else:
            async with self.engine.begin() as conn:
                await conn.execute(insert(intents.intents), group)

    async def write_rows(self, rows: list[RequestRecord], writer_id: str, head: dict[str, Any],
                         settled: list[str], key_use: dict[str, dt.datetime]) -> None:
        """In one transaction: the rows, the writer's new chain head, the deletion of the
        intents they settle, and when each key was last used."""
        if self.sqlite_path is not None:
            values = [head[c] for c in _HEAD]
            values[_HEAD.index("updated_at")] = _text(head["updated_at"])
            await self._in_thread(
                ("row", _records(rows, sqlite=True)), ("head", [(*values, writer_id)]),
                ("settled", [(r,) for r in settled]),
                ("key_use", [(_text(w), k) for k, w in key_use.items()]))
            return
        async with self.engine.begin() as conn:
            if rows and self.asyncpg:
                raw = (await conn.get_raw_connection()).driver_connection
                await raw.copy_records_to_table(  # type: ignore[union-attr]
                    "ledger", columns=COLUMNS, records=_records(rows, sqlite=False))
            elif rows:
                await conn.execute(insert(ledger), [row.as_dict() for row in rows])
            await conn.execute(update(chains).where(chains.c.writer_id == writer_id)
                               .values(**head))
            if settled:
                await intents.delete(conn, settled)
            if key_use:
                await conn.execute(
                    update(api_keys).where(api_keys.c.id == bindparam("kid"))
                    .values(last_used_at=bindparam("when")),
                    [{"kid": k, "when": w} for k, w in key_use.items()])

    async def close(self) -> None:
        if self._pg is not None:
            await self._pg.close()
            self._pg = None
        if self._thread is not None:
            if (conn := self._sqlite) is not None:
                await asyncio.get_running_loop().run_in_executor(self._thread, conn.close)
                self._sqlite = None
            self._thread.shutdown(wait=True)
            self._thread = None

    # -- SQLite: everything below runs in the store's one thread -----------------------------

    async def _in_thread(self, *steps: tuple[str, list[tuple[Any, ...]]]) -> None:
        """One transaction of `_SQL` statements, each run for its list of parameters."""
        if self._thread is None:
            self._thread = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="euroute-ledger")
        await asyncio.get_running_loop().run_in_executor(self._thread, self._transaction, *steps)

    def _connection(self) -> sqlite3.Connection:
        if self._sqlite is None:
            conn = sqlite3.connect(str(self.sqlite_path), isolation_level=None,
                                   check_same_thread=False)
            for pragma in SQLITE_PRAGMAS:
                conn.execute(pragma)
            self._sqlite = conn
        return self._sqlite

    def _transaction(self, *steps: tuple[str, list[tuple[Any, ...]]]) -> None:
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
            for sql, params in steps:
                if params:
                    conn.executemany(_SQL[sql], params)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

