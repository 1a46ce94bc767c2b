"""Admission limits: per-key requests and tokens per minute, and per-app spend budgets.

Rate windows are per replica (in memory); budgets read spend from the ledger, shared by all
replicas, through a short cache plus what this replica has spent since it was read.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.errors import BudgetExceeded, RateLimited, Unavailable
from proxy.ledger.tables import ledger
from proxy.policy.schema import Budget, PolicyLimits

log = logging.getLogger("euroute.limits")


@dataclass(slots=True)
class _Window:
    minute: int
    requests: int = 0
    tokens: int = 0


class RateLimiter:
    """Fixed one-minute windows per key."""

    def __init__(self) -> None:
        self._windows: dict[str, _Window] = {}

    def _window(self, key_id: str, now: float) -> _Window:
        minute = int(now // 60)
        w = self._windows.get(key_id)
        if w is None or w.minute != minute:
            w = self._windows[key_id] = _Window(minute)
        return w

    def admit(self, key_id: str, limits: PolicyLimits) -> None:
        if limits.requests_per_minute is None and limits.tokens_per_minute is None:
            return
        now = time.time()
        w = self._window(key_id, now)
        retry = max(1, 60 - int(now % 60))
        if limits.requests_per_minute is not None and w.requests >= limits.requests_per_minute:
            raise RateLimited(f"rate limit of {limits.requests_per_minute} requests per minute "
                              "reached for this key", retry_after_s=retry)
        if limits.tokens_per_minute is not None and w.tokens >= limits.tokens_per_minute:
            raise RateLimited(f"rate limit of {limits.tokens_per_minute} tokens per minute "
                              "reached for this key", retry_after_s=retry,
                              code="tokens_rate_limit_exceeded")
        w.requests += 1

    def spent_tokens(self, key_id: str, tokens: int) -> None:
        if key_id in self._windows:
            self._window(key_id, time.time()).tokens += tokens


def period_start(period: str, now: dt.datetime) -> dt.datetime:
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return day if period == "day" else day.replace(day=1)


def period_end(period: str, start: dt.datetime) -> float:
    """When the period that began at `start` ends, as a Unix time."""
    if period == "day":
        return (start + dt.timedelta(days=1)).timestamp()
    return (start.replace(day=28) + dt.timedelta(days=4)).replace(day=1).timestamp()


@dataclass(slots=True)
class _Spend:
    start: dt.datetime
    ends: float
    read_at: float
    db_nanos: int
    local_nanos: int = 0
    refreshing: asyncio.Task[None] | None = None


class Budgets:
    """Spend per (app, period, currency): read from the ledger, then refreshed in the
    background, one read at a time, so no request waits on a scan once the first is done."""

    def __init__(self, engine: AsyncEngine, cache_s: float) -> None:
        self.engine = engine
        self.cache_s = cache_s
        self._spend: dict[tuple[str, str, str], _Spend] = {}
        self._first: dict[tuple[str, str, str], asyncio.Task[_Spend]] = {}

    async def _read(self, app: str, budget: Budget, start: dt.datetime) -> int:
        async with self.engine.connect() as conn:
            total = await conn.scalar(
                select(func.coalesce(func.sum(ledger.c.cost_nanos), 0)).where(
                    ledger.c.app == app, ledger.c.created_at >= start,
                    ledger.c.currency == budget.currency))
        return int(total or 0)

    async def _load(self, key: tuple[str, str, str], app: str, budget: Budget,
                    start: dt.datetime) -> _Spend:
        try:
            spend = _Spend(start, period_end(budget.period, start), time.monotonic(),
                           await self._read(app, budget, start))
            self._spend[key] = spend
            return spend
        finally:
            del self._first[key]

    async def _refresh(self, spend: _Spend, app: str, budget: Budget) -> None:
        local_before = spend.local_nanos
        try:
            total = await self._read(app, budget, spend.start)
        except Exception as exc:  # keep the last known spend
            log.warning("budget refresh for %s failed: %s: %s", app, type(exc).__name__, exc)
        else:
            # What this replica spent while the read ran may not be in the database yet.
            spend.db_nanos, spend.read_at = total, time.monotonic()
            spend.local_nanos -= local_before
        finally:
            spend.refreshing = None

    async def _current(self, app: str, budget: Budget) -> _Spend:
        key = (app, budget.period, budget.currency)
        spend = self._spend.get(key)
        if spend is None or time.time() >= spend.ends:
            task = self._first.get(key)
            if task is None:
                start = period_start(budget.period, dt.datetime.now(dt.UTC))
                task = self._first[key] = asyncio.create_task(self._load(key, app, budget, start))
            return await asyncio.shield(task)
        if spend.refreshing is None and time.monotonic() - spend.read_at >= self.cache_s:
            spend.refreshing = asyncio.create_task(self._refresh(spend, app, budget))
        return spend

    async def close(self) -> None:
        """Let reads in flight finish before the engine goes away."""
        pending = [s.refreshing for s in self._spend.values() if s.refreshing]
        await asyncio.gather(*pending, *self._first.values(), return_exceptions=True)

    async def admit(self, app: str, budget: Budget | None, worst_case_nanos: int) -> None:
        if budget is None:
            return
        try:
            spend = await self._current(app, budget)
        except Exception as exc:  # a budget that cannot be read fails closed
            raise Unavailable(f"the spend of app {app!r} cannot be read, so its budget cannot "
                              "be enforced") from exc
        limit = int(budget.amount * 1_000_000_000)
        if spend.db_nanos + spend.local_nanos + worst_case_nanos > limit:
            raise BudgetExceeded(
                f"the {budget.period}ly budget of {budget.amount} {budget.currency} for app "
                f"{app!r} would be exceeded", retry_after_s=3600)

    def spent(self, app: str, budget: Budget | None, nanos: int) -> None:
        if budget is not None and (spend := self._spend.get((app, budget.period,
                                                             budget.currency))):
            spend.local_nanos += nanos
