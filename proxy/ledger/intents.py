"""Intents: what the ledger knows of a request before it is forwarded, committed so that a
crash during forwarding still leaves evidence (README, The ledger: durability).

The writer commits them (group commit), deletes each with its row, and at every heartbeat
claims those of writers silent for longer than the grace period; `claim` turns them into
`outcome_unknown` records.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import logging
import sqlite3
import uuid
from typing import Any

import asyncpg
import orjson
from sqlalchemy import Date, or_, select, update
from sqlalchemy import delete as sql_delete
from sqlalchemy import insert as sql_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from proxy.ledger.record import FIELDS, RequestRecord
from proxy.ledger.tables import UTCDateTime, chains, intents, ledger

log = logging.getLogger("euroute.ledger")
# Not in an intent: the chain columns come later, and an intent carries no pseudonym (a
# recovered row does without it rather than keep one outside the erasable columns).
INTENDED = tuple(name for name in FIELDS if name not in {
    "writer_id", "seq", "prev_hash", "row_hash", "hash_key_id", "end_user", "end_user_salt",
    "end_user_commitment", "decision"})
# An intent whose facts cannot be read still becomes a row: that a request went out is the
# evidence, and verify then shows who claims what.
_UNREADABLE_INTENT: dict[str, Any] = {
    "app": "unknown", "key_id": None, "endpoint": "unknown", "policy": "unknown",
    "policy_version": "unknown", "retain_until": dt.date.max,
    "outcome": "outcome_unknown", "status": 0, "usage_missing": True}

_TIME_FIELDS = [str(c.name) for c in ledger.columns if isinstance(c.type, UTCDateTime)]
_DATE_FIELDS = [str(c.name) for c in ledger.columns if isinstance(c.type, Date)]


def values(row: RequestRecord, decision: dict[str, Any], writer_id: str) -> dict[str, Any]:
    """The intent of a request about to be forwarded, as a row of `ledger_intents`."""
    facts = {k: getattr(row, k) for k in INTENDED}
    facts["decision"] = decision
    return {"request_id": row.request_id, "writer_id": writer_id,
            "created_at": row.created_at, "facts": orjson.dumps(facts).decode()}


_COLUMNS = "(request_id, writer_id, created_at, facts)"


def _naive(when: dt.datetime) -> dt.datetime:
    return when.astimezone(dt.UTC).replace(tzinfo=None)


class IntentLog:
    """Commits groups of intents on a connection of its own, in one round trip per group.

    Measured (bench/ledger.py --intents), a group through the pooled SQLAlchemy engine cost
    about 0.5 ms of CPU: a pool checkout and one thread hop (aiosqlite) or protocol exchange
    (asyncpg) per BEGIN, INSERT and COMMIT. Here SQLite commits in one hop to a thread that
    owns a plain sqlite3 connection (WAL, synchronous=NORMAL: a commit survives the process
    being killed), and PostgreSQL in one autocommitted INSERT ... SELECT FROM unnest(...).
    Other databases go through the engine.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._sqlite: sqlite3.Connection | None = None
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._pg: Any = None

    async def commit(self, group: list[dict[str, Any]]) -> None:
        url = self.engine.url
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            if self._thread is None:
                self._thread = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix="euroute-intents")
            rows = [(g["request_id"], g["writer_id"],
                     _naive(g["created_at"]).isoformat(" ", "microseconds"), g["facts"])
                    for g in group]
            await asyncio.get_running_loop().run_in_executor(self._thread, self._sqlite_commit,
                                                             rows)
        elif url.get_backend_name() == "postgresql" and url.get_driver_name() == "asyncpg":
            if self._pg is None or self._pg.is_closed():
                self._pg = await asyncpg.connect(
                    url.set(drivername="postgresql").render_as_string(hide_password=False))
            await self._pg.execute(
                f"INSERT INTO ledger_intents {_COLUMNS} SELECT * FROM unnest("
                "$1::varchar[], $2::varchar[], $3::timestamp[], $4::text[])",
                [g["request_id"] for g in group], [g["writer_id"] for g in group],
                [_naive(g["created_at"]) for g in group], [g["facts"] for g in group])
        else:
            async with self.engine.begin() as conn:
                await conn.execute(sql_insert(intents), group)

    def _sqlite_commit(self, rows: list[tuple[str, str, str, str]]) -> None:
        if self._sqlite is None:
            conn = sqlite3.connect(str(self.engine.url.database), isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=10000")
            self._sqlite = conn
        try:
            self._sqlite.execute("BEGIN IMMEDIATE")
            self._sqlite.executemany(f"INSERT INTO ledger_intents {_COLUMNS} VALUES (?, ?, ?, ?)",
                                     rows)
            self._sqlite.execute("COMMIT")
        except BaseException:
            if self._sqlite.in_transaction:
                self._sqlite.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        if self._pg is not None:
            await self._pg.close()
            self._pg = None
        if self._thread is not None:
            sqlite_conn = self._sqlite
            if sqlite_conn is not None:
                await asyncio.get_running_loop().run_in_executor(self._thread, sqlite_conn.close)
                self._sqlite = None
            self._thread.shutdown(wait=True)
            self._thread = None


async def delete(conn: AsyncConnection, request_ids: list[str]) -> None:
    if conn.dialect.name == "sqlite":
        await conn.exec_driver_sql("DELETE FROM ledger_intents WHERE request_id = ?",
                                   [(r,) for r in request_ids])
    elif conn.dialect.name == "postgresql" and conn.dialect.driver == "asyncpg":
        raw = await conn.get_raw_connection()
        await raw.driver_connection.execute(  # type: ignore[union-attr]
            "DELETE FROM ledger_intents WHERE request_id = ANY($1::varchar[])", request_ids)
    else:
        await conn.execute(sql_delete(intents).where(intents.c.request_id.in_(request_ids)))


async def claim(conn: AsyncConnection, writer_id: str, silent_since: dt.datetime
                ) -> list[RequestRecord]:
    """Take over the intents of writers not seen since `silent_since` (or of a process that
    died before its chain head was written), as `outcome_unknown` records.

    Claiming is one UPDATE ... RETURNING, so two replicas never take the same intent: on
    PostgreSQL the second waits for the first's row locks, then finds them claimed."""
    dead = select(chains.c.writer_id).where(chains.c.updated_at < silent_since)
    claimed = (await conn.execute(
        update(intents).where(
            intents.c.writer_id != writer_id,
            or_(intents.c.writer_id.in_(dead),
                (intents.c.writer_id.not_in(select(chains.c.writer_id))
                 & (intents.c.created_at < silent_since))))
        .values(writer_id=writer_id)
        .returning(intents.c.request_id, intents.c.facts))).all()
    if not claimed:
        return []
    # A request whose row did get written (its intent survived a cancelled begin()).
    ids = [rid for rid, _ in claimed]
    written = set((await conn.execute(select(ledger.c.request_id)
                                      .where(ledger.c.request_id.in_(ids)))).scalars())
    if written:
        await delete(conn, list(written))
    log.warning("ledger: recovered %d requests a stopped writer left open",
                len(claimed) - len(written))
    return [recovered(request_id, orjson.loads(facts), writer_id)
            for request_id, facts in claimed if request_id not in written]


def recovered(request_id: str, facts: dict[str, Any], writer_id: str) -> RequestRecord:
    """The row of a request whose intent a stopped writer left: the facts known before
    forwarding; what happened after is unknown."""
    values = {name: facts.get(name) for name in INTENDED}
    for name in _TIME_FIELDS:
        if values[name] is not None:
            values[name] = dt.datetime.fromisoformat(values[name])
    for name in _DATE_FIELDS:
        if values[name] is not None:
            values[name] = dt.date.fromisoformat(values[name])
    decision = facts.get("decision") or {}
    decision["recovered_by"] = writer_id
    # No status, usage or cost to report.
    values.update(request_id=request_id, outcome="outcome_unknown", status=0,
                  latency_us=0, ttfb_us=None, prompt_tokens=0, completion_tokens=0,
                  usage_missing=True, cost_nanos=0,
                  decision=orjson.dumps(decision).decode())
    try:
        return RequestRecord(**values)
    except (TypeError, ValueError) as exc:  # an intent the database was made to hold
        log.error("ledger: intent %s cannot become a row (%s)", request_id[:40], exc)
        return RequestRecord(**{**_UNREADABLE_INTENT, "request_id": request_id[:40],
                                "decision_id": "dec_" + uuid.uuid4().hex[:24],
                                "created_at": dt.datetime.now(dt.UTC), "decision": orjson
                                .dumps({"unreadable_intent": str(facts)[:2000]}).decode()})
