"""euroute's own retention: purging rows past their retain-until date, and erasing a subject's
pseudonym (GDPR Art. 17). Both keep `audit verify` passing on what remains: a purged row
leaves a keyed tombstone holding its chain position, hash, reason and retain-until date, and
erasure only clears columns the row hash does not cover (the hash covers a salted commitment
to the pseudonym instead).

Erasure also reaches rows still buffered in running proxies: the request is recorded in
`ledger_erasures`; every writer takes it up at its next heartbeat and clears the pseudonym of
every row it writes from then on; `erase` waits until each live writer has acknowledged,
then clears what they wrote in between.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time

from sqlalchemy import delete, exists, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.ledger.chain import Keyring, pseudonym, tombstone_mac
from proxy.ledger.tables import chains, erasures, ledger, tombstones


async def purge(engine: AsyncEngine, before: dt.date, keyring: Keyring, *,
                dry_run: bool = False) -> dict[str, int]:
    """Delete every row whose retain_until is before `before` (today at the latest), with a
    keyed tombstone for each, in one transaction. Returns the rows deleted (or, in a dry run,
    that would be) per writer."""
    now = dt.datetime.now(dt.UTC)
    if before > now.date():
        raise ValueError(f"{before} is in the future: that would delete rows still within "
                         "their retention period")
    expired = ledger.c.retain_until < before
    async with engine.begin() as conn:
        if dry_run:
            rows = await conn.execute(select(ledger.c.writer_id, func.count()).where(expired)
                                      .group_by(ledger.c.writer_id).order_by(ledger.c.writer_id))
            return {writer: n for writer, n in rows.all()}
        key = keyring.current
        stones = []
        for writer_id, seq, row_hash, retain_until in (await conn.execute(
                select(ledger.c.writer_id, ledger.c.seq, ledger.c.row_hash,
                       ledger.c.retain_until).where(expired))).all():
            stone = {"writer_id": writer_id, "seq": seq, "row_hash": row_hash,
                     "purged_at": now, "reason": "retention_purge",
                     "retain_until": retain_until, "hash_key_id": key.id}
            stone["mac"] = tombstone_mac(key, stone)
            stones.append(stone)
        if not stones:
            return {}
        await conn.execute(insert(tombstones), stones)
        # Delete exactly the tombstoned rows: on PostgreSQL a row committed by a writer
        # between the two statements would match `expired` here without having a tombstone.
        await conn.execute(delete(ledger).where(expired, exists().where(
            tombstones.c.writer_id == ledger.c.writer_id, tombstones.c.seq == ledger.c.seq)))
    counts: dict[str, int] = {}
    for stone in stones:
        counts[stone["writer_id"]] = counts.get(stone["writer_id"], 0) + 1
    return dict(sorted(counts.items()))


async def erase(engine: AsyncEngine, key: bytes, subject: str, *, grace_s: float = 30.0,
                timeout_s: float = 60.0) -> tuple[int, list[str]]:
    """Remove a subject's pseudonym (and the salt that would confirm it) from every row,
    including rows running proxies still hold. Returns the rows touched and the live writers
    that did not acknowledge within `timeout_s` (empty when the erasure is complete)."""
    mark = pseudonym(key, subject)
    clear = update(ledger).where(ledger.c.end_user == mark).values(end_user=None,
                                                                   end_user_salt=None)
    async with engine.begin() as conn:
        request = (await conn.execute(insert(erasures).values(
            end_user=mark, requested_at=dt.datetime.now(dt.UTC))
            .returning(erasures.c.id))).scalar_one()
        touched = (await conn.execute(clear)).rowcount
    deadline = time.monotonic() + timeout_s
    while True:
        silent_since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=grace_s)
        async with engine.connect() as conn:
            behind = list((await conn.execute(select(chains.c.writer_id).where(
                chains.c.updated_at >= silent_since, chains.c.stopped_at.is_(None),
                chains.c.erasure_seen < request))).scalars())
        if not behind or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)  # polling the writers' acknowledgements in the database
    async with engine.begin() as conn:
        touched += (await conn.execute(clear)).rowcount
    return touched, behind
