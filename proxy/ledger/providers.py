"""What reached the providers: transfers outside the EEA, copies a provider may still hold,
and the contracts each request relied on. Only rows with a route count: a denied request
never left euroute.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import ColumnElement, case, func, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.ledger.queries import EVERYTHING, Window, plain
from proxy.ledger.tables import ledger
from proxy.policy.schema import EEA

_EEA = sorted(EEA)
TRANSFER_COLUMNS = ("request_id", "created_at", "app", "model", "route", "provider",
                    "inference_location", "storage_location", "transfer_mechanism", "policy",
                    "policy_version", "decision_id")


def _sent() -> ColumnElement[bool]:
    return ledger.c.route.is_not(None)


async def transfers(engine: AsyncEngine, window: Window = EVERYTHING, *,
                    limit: int = 1000) -> dict[str, Any]:
    """Requests that went to a route processing or storing outside the EEA, or that needed a
    transfer mechanism, with the policy (and its version) that admitted them. Unknown
    location or mechanism counts as a transfer, as unknown posture does in policies.

    `checked` is how many forwarded requests the range holds, so an empty list is a proof
    about that many requests, not the absence of data.
    """
    c = ledger.c
    outside = or_(c.inference_location.is_(None), c.inference_location.not_in(_EEA),
                  c.storage_location.is_(None), c.storage_location.not_in(_EEA),
                  c.transfer_mechanism.is_(None), c.transfer_mechanism != "none_needed")
    where = [_sent(), *window.where()]
    flagged = func.sum(case((outside, 1), else_=0))
    async with engine.connect() as conn:
        checked, found = (await conn.execute(select(func.count(), flagged).where(*where))).one()
        rows = (await conn.execute(
            select(*[c[n] for n in TRANSFER_COLUMNS]).where(outside, *where)
            .order_by(c.created_at, c.id).limit(limit))).all()
    return {"checked": checked, "outside_eea": int(found or 0),
            "truncated": int(found or 0) > len(rows), "data": [plain(r) for r in rows]}


async def retention(engine: AsyncEngine, window: Window = EVERYTHING, *,
                    as_of: dt.date | None = None) -> list[dict[str, Any]]:
    """Per provider and route, the requests whose copy at the provider may still exist on
    `as_of` (default today): its copy is gone only after `as_of`, or the route's retention
    was unknown. `all_gone_on` is the day the last known copy goes; null while any is unknown.
    """
    c = ledger.c
    as_of = as_of or dt.datetime.now(dt.UTC).date()
    next_day = dt.datetime.combine(as_of + dt.timedelta(days=1), dt.time(), dt.UTC)
    unknown = func.sum(case((c.provider_copy_gone_on.is_(None), 1), else_=0))
    stmt = (select(c.provider, c.route, func.count(), func.min(c.created_at),
                   func.max(c.created_at), unknown, func.max(c.provider_copy_gone_on))
            .where(_sent(), c.created_at < next_day,
                   or_(c.provider_copy_gone_on.is_(None), c.provider_copy_gone_on > as_of),
                   *window.where())
            .group_by(c.provider, c.route).order_by(c.provider, c.route))
    async with engine.connect() as conn:
        rows = (await conn.execute(stmt)).all()
    return [{"provider": provider, "route": route, "requests": n, "oldest": oldest,
             "newest": newest, "unknown_retention": int(unknown_n or 0),
             "all_gone_on": None if unknown_n else last_gone}
            for provider, route, n, oldest, newest, unknown_n, last_gone in rows]


async def contracts(engine: AsyncEngine, window: Window = EVERYTHING) -> list[dict[str, Any]]:
    """Which requests relied on which ZDR grant and DPA: counts and first/last use. A null
    reference means the request went out without that contract."""
    c = ledger.c
    keys = (c.provider, c.route, c.zdr_reference, c.dpa_reference)
    stmt = (select(*keys, func.count(), func.min(c.created_at), func.max(c.created_at))
            .where(_sent(), *window.where()).group_by(*keys)
            .order_by(*(k.nulls_first() for k in keys)))
    async with engine.connect() as conn:
        rows = (await conn.execute(stmt)).all()
    return [{"provider": p, "route": r, "zdr_reference": z, "dpa_reference": d, "requests": n,
             "first": first, "last": last} for p, r, z, d, n, first, last in rows]
