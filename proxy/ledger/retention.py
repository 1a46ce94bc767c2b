"""euroute's own retention: purging rows past their retain-until date, and erasing a subject's
pseudonym (GDPR Art. 17). Both keep `audit verify` passing on what remains: a purged row
leaves a tombstone holding its chain position and hash, and erasure only clears columns the
row hash does not cover (the hash covers a salted commitment to the pseudonym instead).
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import delete, exists, func, insert, literal, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.ledger.chain import pseudonym
from proxy.ledger.tables import UTCDateTime, ledger, tombstones


async def purge(engine: AsyncEngine, before: dt.date, *, dry_run: bool = False
                ) -> dict[str, int]:
    """Delete every row whose retain_until is before `before`, with a tombstone for each, in
    one transaction. Returns the rows deleted (or, in a dry run, that would be) per writer."""
    expired = ledger.c.retain_until < before
    async with engine.begin() as conn:
        if dry_run:
            rows = await conn.execute(select(ledger.c.writer_id, func.count()).where(expired)
                                      .group_by(ledger.c.writer_id).order_by(ledger.c.writer_id))
            return {writer: n for writer, n in rows.all()}
        now = dt.datetime.now(dt.UTC)
        await conn.execute(insert(tombstones).from_select(
            ["writer_id", "seq", "row_hash", "purged_at"],
            select(ledger.c.writer_id, ledger.c.seq, ledger.c.row_hash,
                   literal(now, UTCDateTime())).where(expired)))
        # Delete exactly the tombstoned rows: on PostgreSQL a row committed by a writer
        # between the two statements would match `expired` here without having a tombstone.
        await conn.execute(delete(ledger).where(expired, exists().where(
            tombstones.c.writer_id == ledger.c.writer_id, tombstones.c.seq == ledger.c.seq)))
        rows = await conn.execute(
            select(tombstones.c.writer_id, func.count()).where(tombstones.c.purged_at == now)
            .group_by(tombstones.c.writer_id).order_by(tombstones.c.writer_id))
        return {writer: n for writer, n in rows.all()}


async def erase(engine: AsyncEngine, key: bytes, subject: str) -> int:
    """Remove a subject's pseudonym (and the salt that would confirm it) from every row.
    Returns the number of rows touched."""
    async with engine.begin() as conn:
        result = await conn.execute(
            update(ledger).where(ledger.c.end_user == pseudonym(key, subject))
            .values(end_user=None, end_user_salt=None))
    return result.rowcount
