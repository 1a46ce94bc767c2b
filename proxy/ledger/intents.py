"""Intents: what the ledger knows of a request before it is forwarded, committed so that a
crash during forwarding still leaves evidence (README, The ledger: durability).

The writer commits them (group commit, proxy/ledger/store.py), deletes each with its row,
and at every heartbeat claims those of writers silent for longer than the grace period;
`claim` turns them into `outcome_unknown` records.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from typing import Any

import orjson
from sqlalchemy import Date, or_, select, update
from sqlalchemy import delete as sql_delete
from sqlalchemy.ext.asyncio import AsyncConnection

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
