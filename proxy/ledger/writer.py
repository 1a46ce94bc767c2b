"""Off the request path: rows go into an in-memory buffer; one task writes them in batches.

A row that was answered is never dropped. When the database fails, the batch keeps its chain
position and is retried with backoff; the writer reports unhealthy once rows have waited
longer than `max_outage_s` or the buffer holds more than `buffer_rows`, and policies with
`audit.on_write_failure: reject` then refuse new requests (fail closed).

When the database works but takes rows more slowly than requests bring them (one saturated
worker on SQLite), new requests wait in `room()` for the writer to catch up: back-pressure on
the callers, instead of a buffer that grows for as long as the overload lasts.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import operator
import time
import uuid
from collections import deque
from typing import Any

from sqlalchemy import Date, bindparam, insert, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from proxy.ledger.chain import GENESIS, record_hash
from proxy.ledger.record import RequestRecord
from proxy.ledger.tables import UTCDateTime, api_keys, chains, ledger

log = logging.getLogger("euroute.ledger")
_COLS = [c for c in ledger.columns if c.name != "id"]
COLUMNS = tuple(str(c.name) for c in _COLS)
_pick = operator.attrgetter(*COLUMNS)
_TIMES = [i for i, c in enumerate(_COLS) if isinstance(c.type, UTCDateTime)]
_DATES = [i for i, c in enumerate(_COLS) if isinstance(c.type, Date)]
_SQLITE_INSERT = (f"INSERT INTO ledger ({', '.join(COLUMNS)}) "
                  f"VALUES ({', '.join('?' * len(COLUMNS))})")


def _records(batch: list[RequestRecord], sqlite: bool) -> list[tuple[Any, ...]]:
    """Rows as value lists, times as naive UTC: SQLite gets the text forms SQLAlchemy's
    dialect stores and parses back, asyncpg the objects its binary COPY takes."""
    out = []
    for row in batch:
        values = list(_pick(row))
        for i in _TIMES:
            if (when := values[i]) is not None:
                naive = when.astimezone(dt.UTC).replace(tzinfo=None)
                values[i] = naive.isoformat(" ", "microseconds") if sqlite else naive
        if sqlite:
            for i in _DATES:
                if (day := values[i]) is not None:
                    values[i] = day.isoformat()
        out.append(tuple(values))
    return out


async def _insert(conn: AsyncConnection, batch: list[RequestRecord]) -> None:
    """Insert a batch by the fastest path each database has: SQLAlchemy's per-row parameter
    processing costs more than everything else the writer does (bench/ledger.py)."""
    dialect = conn.dialect.name
    if dialect == "sqlite":
        await conn.exec_driver_sql(_SQLITE_INSERT, _records(batch, sqlite=True))
    elif dialect == "postgresql" and conn.dialect.driver == "asyncpg":
        raw = await conn.get_raw_connection()
        await raw.driver_connection.copy_records_to_table(  # type: ignore[union-attr]
            "ledger", columns=COLUMNS, records=_records(batch, sqlite=False))
    else:
        await conn.execute(insert(ledger), [row.as_dict() for row in batch])


class Writer:
    def __init__(self, engine: AsyncEngine, *, batch_size: int = 500, gather_s: float = 0.05,
                 buffer_rows: int = 100_000, max_outage_s: float = 30.0) -> None:
        self.engine = engine
        self.writer_id = uuid.uuid4().hex
        self.batch_size = batch_size
        self.gather_s = gather_s
        self.buffer_rows = buffer_rows
        self.max_outage_s = max_outage_s
        self.seq = 0
        self.last_hash = GENESIS
        self.written = 0
        self.batches = 0
        self.failures = 0
        self.backlog_rows = 4 * batch_size  # more waiting than this, and new requests wait
        self.waits = 0
        self._failing = False
        self._progress = asyncio.Event()
        self._buffer: deque[RequestRecord] = deque()
        self._key_use: dict[str, dt.datetime] = {}
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._oldest_waiting: float | None = None
        self._started = dt.datetime.now(dt.UTC)
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def submit(self, row: RequestRecord) -> None:
        if not self._buffer:
            self._oldest_waiting = time.monotonic()
        self._buffer.append(row)
        if not self._wake.is_set():
            self._wake.set()
        if len(self._buffer) >= self.batch_size:
            self._full.set()

    async def room(self) -> None:
        """Return once the writer keeps up: at once, unless more than `backlog_rows` rows wait
        while the database is taking them (a failing database is the health check's case)."""
        if len(self._buffer) < self.backlog_rows or self._failing:
            return
        self.waits += 1
        while len(self._buffer) >= self.backlog_rows and not self._failing:
            self._progress.clear()
            await self._progress.wait()

    def key_used(self, key_id: str, when: dt.datetime) -> None:
        self._key_use[key_id] = when

    @property
    def pending(self) -> int:
        return len(self._buffer)

    @property
    def healthy(self) -> bool:
        if len(self._buffer) >= self.buffer_rows:
            return False
        waited = self._oldest_waiting
        return waited is None or time.monotonic() - waited < self.max_outage_s

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="euroute-ledger-writer")

    async def close(self, timeout_s: float = 30.0) -> None:
        """Flush everything buffered, then stop."""
        self._closing = True
        self._wake.set()
        self._full.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
            except TimeoutError:
                log.error("ledger: %d rows still unwritten at shutdown", len(self._buffer))
                self._task.cancel()

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            if not self._buffer and not self._key_use:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue  # close() wakes the writer with nothing to write
            # Gather a batch, after every write too: one transaction per request would cost
            # more than the request (at concurrency 1 the writer would chase single rows).
            if len(self._buffer) < self.batch_size and not self._closing:
                self._full.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), self.gather_s)
            batch = self._chain(min(self.batch_size, len(self._buffer)))
            while True:
                try:
                    await self._write(batch)
                    self._failing = False
                    break
                except Exception as exc:
                    self.failures += 1
                    self._failing = True
                    self._progress.set()
                    log.warning("ledger: write of %d rows failed (%s: %s), retrying in %.1fs",
                                len(batch), type(exc).__name__, exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
            backoff = 0.05
            for _ in batch:
                self._buffer.popleft()
            self.written += len(batch)
            self.batches += 1
            self._oldest_waiting = time.monotonic() if self._buffer else None
            self._progress.set()

    def _chain(self, n: int) -> list[RequestRecord]:
        """Give the next n buffered rows their place in this writer's chain (once only)."""
        batch = []
        for i in range(n):
            row = self._buffer[i]
            if row.row_hash is None:
                self.seq += 1
                row.writer_id = self.writer_id
                row.seq = self.seq
                row.prev_hash = self.last_hash
                row.row_hash = self.last_hash = record_hash(self.last_hash, row)
            batch.append(row)
        return batch

    async def _write(self, batch: list[RequestRecord]) -> None:
        now = dt.datetime.now(dt.UTC)
        used, self._key_use = self._key_use, {}
        try:
            async with self.engine.begin() as conn:
                if batch:
                    await _insert(conn, batch)
                    head = {"last_seq": batch[-1].seq, "last_hash": batch[-1].row_hash,
                            "updated_at": now}
                    if batch[0].seq == 1:
                        await conn.execute(insert(chains).values(
                            writer_id=self.writer_id, started_at=self._started, **head))
                    else:
                        await conn.execute(update(chains)
                                           .where(chains.c.writer_id == self.writer_id)
                                           .values(**head))
                if used:
                    await conn.execute(
                        update(api_keys).where(api_keys.c.id == bindparam("kid"))
                        .values(last_used_at=bindparam("when")),
                        [{"kid": k, "when": w} for k, w in used.items()])
        except BaseException:
            for k, w in used.items():
                self._key_use.setdefault(k, w)
            raise
