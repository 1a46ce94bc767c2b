"""Off the request path: rows go into an in-memory buffer; one task writes them in batches.

A row that was answered is never dropped. When the database fails, the batch keeps its place
and is retried with backoff; the writer reports unhealthy once rows have waited longer than
`max_outage_s` or the buffer holds more than `buffer_rows`, and policies with
`audit.on_write_failure: reject` then refuse new requests (fail closed). When the database
works but refuses a batch for its values (a number out of a column's range, a NUL byte), the
batch is split until the refused rows are alone; those go to `ledger_dead_letters` with the
error, the others into the chain.

When the database takes rows more slowly than requests bring them, new requests wait in
`room()` for the writer to catch up: back-pressure instead of a buffer that keeps growing.

Durability (README, Ledger): before a request is forwarded, `begin()` commits an intent for
it; requests arriving together share one commit. The batch that writes the row deletes the
intent. Every writer heartbeats its chain head, and takes over the intents of writers silent
for longer than `grace_s` (a crashed process): each becomes an `outcome_unknown` row. A writer
that could not reach the database either claims nothing until it has reached it for `grace_s`
again: an outage silences every writer, and the live ones need that long (retries back off to
5 s at most) to beat again before they look dead; claimed, their answered rows would meet the
claimer's `outcome_unknown` rows as duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
import sqlite3
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from sqlalchemy import insert, select, update
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from proxy.errors import Unavailable
from proxy.ledger import intents
from proxy.ledger.anchors import AnchorSink
from proxy.ledger.chain import DEV_KEYRING, GENESIS, Keyring, head_mac, record_hash
from proxy.ledger.record import FIELDS, RequestRecord
from proxy.ledger.store import Store
from proxy.ledger.tables import chains, dead_letters, erasures, ledger

log = logging.getLogger("euroute.ledger")


def is_outage(exc: BaseException) -> bool:
    """The database (or the way to it) failed, not the values: retry the same rows later.
    Anything else (SQLSTATE class 22 data exception or 23 integrity violation, a value the
    driver cannot encode) is the rows' fault: isolate them."""
    sqlstate = getattr(exc, "sqlstate", None) or getattr(getattr(exc, "orig", None),
                                                         "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate:
        return sqlstate[:2] not in ("22", "23")
    if isinstance(exc, DBAPIError):
        return not isinstance(exc, DataError | IntegrityError)
    if isinstance(exc, sqlite3.Error):  # the store's own SQLite connection
        return isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError
    return isinstance(exc, OSError | TimeoutError)


def _plain(value: Any) -> Any:
    return value if value is None or isinstance(value, str | bool) else str(value)


class Writer:
    def __init__(self, engine: AsyncEngine, *, keyring: Keyring = DEV_KEYRING,
                 batch_size: int = 500, gather_s: float = 0.05, buffer_rows: int = 100_000,
                 max_outage_s: float = 30.0, durable: bool = True, heartbeat_s: float = 2.0,
                 grace_s: float = 30.0, anchors: AnchorSink | None = None,
                 anchor_s: float = 60.0) -> None:
        self.engine = engine
        self.store = Store(engine)
        self.writer_id = uuid.uuid4().hex
        self.keyring = keyring
        self.key = keyring.current
        self.batch_size = batch_size
        self.gather_s = gather_s
        self.buffer_rows = buffer_rows
        self.max_outage_s = max_outage_s
        self.durable = durable
        self.heartbeat_s = heartbeat_s
        self.grace_s = grace_s
        self.anchors = anchors
        self.anchor_s = anchor_s
        self.seq = 0
        self.last_hash = GENESIS
        self.written = 0
        self.batches = 0
        self.failures = 0
        self.dead_letters = 0
        self.restarts = 0
        self.recovered = 0
        self.intent_commits = 0
        self.backlog_rows = 4 * batch_size  # more waiting than this, and new requests wait
        self.waits = 0
        self._failing = False
        self._back_at = -math.inf  # when the database last answered again after failing
        self._progress = asyncio.Event()
        self._buffer: deque[RequestRecord] = deque()
        self._key_use: dict[str, dt.datetime] = {}
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._oldest_waiting: float | None = None
        self._started = dt.datetime.now(dt.UTC)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._closing = False
        self._opened = False
        self._intents: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._intent_wake = asyncio.Event()
        self._intended: set[str] = set()  # request ids whose intent is committed
        self._erased: dict[str, dt.datetime] = {}  # pseudonym -> when its erasure was asked
        self._erasure_seen = 0
        self._next_anchor = 0.0

    def submit(self, row: RequestRecord) -> None:
        if not self._buffer:
            self._oldest_waiting = time.monotonic()
        self._buffer.append(row)
        if not self._wake.is_set():
            self._wake.set()
        if len(self._buffer) >= self.batch_size:
            self._full.set()

    async def begin(self, row: RequestRecord, decision: dict[str, Any], required: bool) -> None:
        """Return once the request's intent is durable, so a crash during forwarding leaves
        evidence. A policy that admits requests it cannot record (`required` false) does not
        wait for a database that is failing; one that rejects them gets 503 instead."""
        if not self.durable or self._closing or (self._failing and not required):
            return  # closing: the committer may be gone; the row still goes through the buffer
        future = asyncio.get_running_loop().create_future()
        self._intents.append((intents.values(row, decision, self.writer_id), future))
        self._intent_wake.set()
        try:
            await future
        except Exception as exc:
            if required:
                raise Unavailable("the audit ledger cannot be written; this policy refuses "
                                  "requests it cannot record") from exc

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
        self._spawn("rows", self._run)
        self._spawn("intents", self._commit_intents)

    def _spawn(self, name: str, work: Callable[[], Awaitable[None]], delay: float = 0.0) -> None:
        async def run() -> None:
            # After a crash, not at once: a fault that repeats must not become a busy loop.
            await asyncio.sleep(delay)
            await work()
        task = asyncio.create_task(run(), name=f"euroute-ledger-{name}")
        self._tasks[name] = task
        task.add_done_callback(lambda t: self._ended(name, work, t))

    def _ended(self, name: str, work: Callable[[], Awaitable[None]],
               task: asyncio.Task[None]) -> None:
        """A writer task that dies of a bug is reported and restarted, never gone silently."""
        if task.cancelled() or task.exception() is None:
            return
        self.restarts += 1
        log.error("ledger: the %s task died; restarting it", name, exc_info=task.exception())
        self._spawn(name, work, min(self.restarts, 10) * 0.1)

    async def close(self, timeout_s: float = 30.0) -> None:
        """Flush everything buffered, publish the last anchor, then stop."""
        self._closing = True
        self._wake.set()
        self._full.set()
        self._intent_wake.set()
        deadline = time.monotonic() + timeout_s
        for name in ("intents", "rows"):
            while (task := self._tasks.get(name)) is not None and not task.done():
                try:
                    await asyncio.wait_for(asyncio.shield(task),
                                           max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    log.error("ledger: %d rows still unwritten at shutdown", len(self._buffer))
                    task.cancel()
                    break
                except Exception:  # noqa: S110 - _ended reported it and started another
                    pass
        await self.store.close()

    # -- the intent committer ---------------------------------------------------------------

    async def _commit_intents(self) -> None:
        """One task owns the commits: whatever arrived while one was running shares the next."""
        while True:
            if not self._intents:
                if self._closing:
                    return
                self._intent_wake.clear()
                await self._intent_wake.wait()
                continue
            group, self._intents = self._intents, []
            try:
                await self.store.commit_intents([values for values, _ in group])
            except Exception as exc:
                log.warning("ledger: %d intents not committed (%s)", len(group),
                            type(exc).__name__)
                for _, future in group:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.intent_commits += 1
            for values, future in group:
                self._intended.add(values["request_id"])
                if not future.done():
                    future.set_result(None)

    # -- the row writer ---------------------------------------------------------------------

    async def _run(self) -> None:
        if not self._opened:
            await self._retrying(self._open)
        next_beat = time.monotonic() + self.heartbeat_s
        while True:
            if time.monotonic() >= next_beat:
                await self._retrying(self._beat)
                next_beat = time.monotonic() + self.heartbeat_s
            if not self._buffer and not self._key_use:
                if self._closing:
                    await self._retrying(self._stop)
                    return
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), next_beat - time.monotonic())
                continue  # close() wakes the writer with nothing to write
            # Gather a batch, after every write too: one transaction per request would cost
            # more than the request (at concurrency 1 the writer would chase single rows).
            if len(self._buffer) < self.batch_size and not self._closing:
                self._full.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), self.gather_s)
            await self._retrying(self._flush)

    async def _retrying(self, step: Callable[[], Awaitable[None]]) -> None:
        backoff = 0.05
        while True:
            try:
                await step()
                if self._failing:
                    self._back_at = time.monotonic()
                self._failing = False
                return
            except Exception as exc:
                if not is_outage(exc):
                    raise
                self.failures += 1
                self._failing = True
                self._progress.set()
                log.warning("ledger: database write failed (%s: %s), retrying in %.1fs",
                            type(exc).__name__, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _flush(self) -> None:
        n = min(self.batch_size, len(self._buffer))
        await self._write_or_isolate([self._buffer[i] for i in range(n)])

    async def _write_or_isolate(self, rows: list[RequestRecord]) -> None:
        """Write rows, isolating the ones the database refuses; pops what is settled."""
        try:
            await self._write(rows)
        except Exception as exc:
            if is_outage(exc):
                raise
            if len(rows) > 1:
                half = len(rows) // 2
                await self._write_or_isolate(rows[:half])
                await self._write_or_isolate(rows[half:])
            elif rows and await self._booked_already(rows[0]):
                self._settled(rows)
            elif rows:
                await self._dead_letter(rows[0], exc)
            else:  # the keys' last use alone: no row to set aside
                raise
            return
        self.written += len(rows)
        self.batches += 1
        self._settled(rows)

    async def _booked_already(self, row: RequestRecord) -> bool:
        """Whether a recovered row was refused because the request's own writer, only cut off
        when this one claimed its intent, has booked it since: its answered row stands."""
        if row.outcome != "outcome_unknown":  # only recovery makes such rows
            return False
        async with self.engine.connect() as conn:
            booked = (await conn.execute(select(ledger.c.id).where(
                ledger.c.request_id == row.request_id))).first() is not None
        if booked:
            log.warning("ledger: request %s was booked by its own writer after all; its "
                        "recovered outcome_unknown row is dropped", row.request_id[:40])
        return booked

    def _settled(self, rows: list[RequestRecord]) -> None:
        for row in rows:
            self._buffer.popleft()
            self._intended.discard(row.request_id)
        self._oldest_waiting = time.monotonic() if self._buffer else None
        self._progress.set()

    def _chain(self, rows: list[RequestRecord]) -> None:
        """Give rows the next places in this writer's chain (again, if a write is retried)."""
        seq, last = self.seq, self.last_hash
        for row in rows:
            if (row.end_user is not None and (erased := self._erased.get(row.end_user))
                    and row.created_at <= erased):
                row.end_user = row.end_user_salt = None
            seq += 1
            row.writer_id, row.seq, row.prev_hash = self.writer_id, seq, last
            row.hash_key_id = self.key.id
            row.row_hash = last = record_hash(last, row, self.key)

    def _head(self, seq: int, last_hash: str, now: dt.datetime) -> dict[str, Any]:
        return {"last_seq": seq, "last_hash": last_hash, "updated_at": now,
                "hash_key_id": self.key.id,
                "head_mac": head_mac(self.key, self.writer_id, seq, last_hash)}

    async def _write(self, rows: list[RequestRecord]) -> None:
        self._chain(rows)
        now = dt.datetime.now(dt.UTC)
        used, self._key_use = self._key_use, {}
        done = [r.request_id for r in rows if r.request_id in self._intended]
        # No rows when only keys were used since the last batch (their requests still running).
        seq, last = (rows[-1].seq or 0, rows[-1].row_hash or GENESIS) if rows else (
            self.seq, self.last_hash)
        try:
            await self.store.write_rows(rows, self.writer_id, self._head(seq, last, now), done,
                                        used)
        except BaseException:
            for k, w in used.items():
                self._key_use.setdefault(k, w)
            raise
        self.seq, self.last_hash = seq, last

    async def _dead_letter(self, row: RequestRecord, exc: Exception) -> None:
        error = f"{type(exc).__name__}: {exc}".replace("\x00", "\\0")[:500]
        request_id = str(row.request_id)
        record = orjson.dumps({k: _plain(getattr(row, k)) for k in FIELDS
                               if k not in ("writer_id", "seq", "prev_hash", "row_hash")})
        async with self.engine.begin() as conn:
            await conn.execute(insert(dead_letters).values(
                request_id=request_id.replace("\x00", "")[:40], writer_id=self.writer_id,
                failed_at=dt.datetime.now(dt.UTC), error=error, record=record.decode()))
            if request_id in self._intended:
                await intents.delete(conn, [request_id])
        self.dead_letters += 1
        log.error("ledger: request %s refused by the database, kept in ledger_dead_letters: %s",
                  request_id[:40], error)
        self._settled([row])

    # -- start, heartbeat, recovery, erasure, anchors ---------------------------------------

    async def _open(self) -> None:
        now = dt.datetime.now(dt.UTC)
        async with self.engine.begin() as conn:
            await conn.execute(insert(chains).values(
                writer_id=self.writer_id, started_at=self._started,
                **self._head(0, GENESIS, now)))
        self._opened = True
        await self._beat()

    async def _stop(self) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(update(chains).where(chains.c.writer_id == self.writer_id)
                               .values(stopped_at=dt.datetime.now(dt.UTC)))
        self._publish()

    async def _beat(self) -> None:
        """Say this writer is alive, take up new erasure requests, recover what dead writers
        left, and publish an anchor when one is due."""
        now = dt.datetime.now(dt.UTC)
        async with self.engine.begin() as conn:
            for eid, end_user, when in (await conn.execute(
                    select(erasures.c.id, erasures.c.end_user, erasures.c.requested_at)
                    .where(erasures.c.id > self._erasure_seen).order_by(erasures.c.id))).all():
                self._erased[end_user] = when
                self._erasure_seen = eid
            await conn.execute(update(chains).where(chains.c.writer_id == self.writer_id)
                               .values(updated_at=now, erasure_seen=self._erasure_seen))
            if (self.durable and not self._failing
                    and time.monotonic() - self._back_at >= self.grace_s):
                await self._recover(conn, now - dt.timedelta(seconds=self.grace_s))
        if time.monotonic() >= self._next_anchor:
            self._publish()

    async def _recover(self, conn: AsyncConnection, silent_since: dt.datetime) -> None:
        for row in await intents.claim(conn, self.writer_id, silent_since):
            self._intended.add(row.request_id)
            self.recovered += 1
            self.submit(row)

    def _publish(self) -> None:
        self._next_anchor = time.monotonic() + self.anchor_s
        if self.anchors is not None and self._opened:
            self.anchors.publish(self.writer_id, self.seq, self.last_hash)
