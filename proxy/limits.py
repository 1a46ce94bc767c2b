"""Admission limits: per-key requests and tokens per minute, and per-app spend budgets.

Rate windows are fixed one-minute windows per key: in Redis (`EUROUTE_REDIS_URL`) when several
replicas must share them, else in this process's memory (per replica, per worker). Budgets read
spend from the ledger, shared by all replicas, through a short cache plus what this replica has
spent since it was read.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from dataclasses import dataclass

from pydantic import SecretStr
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy import metrics
from proxy.errors import BudgetExceeded, RateLimited, StoreUnavailable
from proxy.ledger.tables import ledger
from proxy.policy.schema import Budget, Policy, PolicyLimits

log = logging.getLogger("euroute.limits")

# One round trip per admission: read the key's window, refuse or count the request, and let the
# window expire on its own a minute after it ends. Returns one of the three below; a limit of
# -1 is no limit.
_ADMIT = """
local used = redis.call('HMGET', KEYS[1], 'r', 't')
local requests, tokens = tonumber(used[1] or '0'), tonumber(used[2] or '0')
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
if rpm >= 0 and requests >= rpm then return 1 end
if tpm >= 0 and tokens >= tpm then return 2 end
redis.call('HINCRBY', KEYS[1], 'r', 1)
redis.call('EXPIRE', KEYS[1], 120)
return 0
"""
_ADMITTED, _TOO_MANY_REQUESTS, _TOO_MANY_TOKENS = 0, 1, 2
# After a failed call, skip Redis for this long: a dead Redis must not add a connect timeout to
# every request.
_BACKOFF_S = 1.0


@dataclass(slots=True)
class _Window:
    minute: int
    requests: int = 0
    tokens: int = 0


class RateLimiter:
    """Fixed one-minute windows per key, in Redis when `redis_url` is given, else in memory."""

    def __init__(self, redis_url: SecretStr | None = None, *, prefix: str = "euroute:",
                 timeout_s: float = 0.5) -> None:
        self._windows: dict[str, _Window] = {}
        self._prefix = prefix
        self._redis: Redis | None = None
        if redis_url is not None:
            # No retries: an admission waits for one attempt at most, then the outage rule.
            self._redis = Redis.from_url(redis_url.get_secret_value(), socket_timeout=timeout_s,
                                         socket_connect_timeout=timeout_s,
                                         retry=Retry(NoBackoff(), 0))
            self._admit_script = self._redis.register_script(_ADMIT)
        self._down_until = 0.0
        self._metered: set[str] = set()  # keys whose tokens count against a limit
        self._counting: set[asyncio.Task[None]] = set()

    def _window(self, key_id: str, now: float) -> _Window:
        minute = int(now // 60)
        w = self._windows.get(key_id)
        if w is None or w.minute != minute:
            w = self._windows[key_id] = _Window(minute)
        return w

    async def admit(self, key_id: str, policy: Policy) -> None:
        limits = policy.limits
        if limits.requests_per_minute is None and limits.tokens_per_minute is None:
            return
        now = time.time()
        if limits.tokens_per_minute is not None:
            self._metered.add(key_id)
        if self._redis is None:
            refused = self._admit_here(key_id, now, limits)
        else:
            refused = await self._admit_shared(key_id, now, policy)
        retry = max(1, 60 - int(now % 60))
        if refused == _TOO_MANY_REQUESTS:
            raise RateLimited(f"rate limit of {limits.requests_per_minute} requests per minute "
                              "reached for this key", retry_after_s=retry)
        if refused == _TOO_MANY_TOKENS:
            raise RateLimited(f"rate limit of {limits.tokens_per_minute} tokens per minute "
                              "reached for this key", retry_after_s=retry,
                              code="tokens_rate_limit_exceeded")

    def _admit_here(self, key_id: str, now: float, limits: PolicyLimits) -> int:
        """What _ADMIT does, in this process's memory."""
        w = self._window(key_id, now)
        if limits.requests_per_minute is not None and w.requests >= limits.requests_per_minute:
            return _TOO_MANY_REQUESTS
        if limits.tokens_per_minute is not None and w.tokens >= limits.tokens_per_minute:
            return _TOO_MANY_TOKENS
        w.requests += 1
        return _ADMITTED

    async def _admit_shared(self, key_id: str, now: float, policy: Policy) -> int:
        if time.monotonic() >= self._down_until:
            limits = policy.limits
            try:
                return int(await self._admit_script(
                    keys=[self._key(key_id, now)],
                    args=[_or_none(limits.requests_per_minute), _or_none(limits.tokens_per_minute)]))
            except RedisError as exc:
                self._down_until = time.monotonic() + _BACKOFF_S
                log.warning("rate limit store unreachable: %s: %s", type(exc).__name__, exc)
        # The same rule as for an unwritable ledger: a policy that refuses what it cannot record
        # also refuses what it cannot limit.
        refuse = policy.audit.on_write_failure == "reject"
        metrics.rate_store_outage(refused=refuse)
        if refuse:
            raise StoreUnavailable("the shared rate limits cannot be checked (Redis is unreachable); "
                                   "this policy refuses requests it cannot limit",
                                   code="rate_limits_unavailable")
        return _ADMITTED

    def _key(self, key_id: str, now: float) -> str:
        return f"{self._prefix}rate:{key_id}:{int(now // 60)}"

    def spent_tokens(self, key_id: str, tokens: int) -> None:
        if key_id not in self._metered:
            return
        if self._redis is None:
            self._window(key_id, time.time()).tokens += tokens
        elif time.monotonic() >= self._down_until:  # else lost, like the admissions meanwhile
            task = asyncio.create_task(self._count_tokens(self._redis, key_id, tokens))
            self._counting.add(task)
            task.add_done_callback(self._counting.discard)

    async def _count_tokens(self, redis: Redis, key_id: str, tokens: int) -> None:
        key = self._key(key_id, time.time())
        try:
            async with redis.pipeline(transaction=False) as pipe:
                await pipe.hincrby(key, "t", tokens).expire(key, 120).execute()
        except RedisError as exc:
            self._down_until = time.monotonic() + _BACKOFF_S
            log.warning("tokens of %s not counted, rate limit store unreachable: %s: %s",
                        key_id, type(exc).__name__, exc)

    async def close(self) -> None:
        """Let token counts in flight land, then close the connections."""
        await asyncio.gather(*self._counting, return_exceptions=True)
        if self._redis is not None:
            await self._redis.aclose()


def _or_none(limit: int | None) -> int:
    return -1 if limit is None else limit


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
            raise StoreUnavailable(f"the spend of app {app!r} cannot be read, so its budget "
                                   "cannot be enforced", code="budget_unavailable") from exc
        limit = int(budget.amount * 1_000_000_000)
        if spend.db_nanos + spend.local_nanos + worst_case_nanos > limit:
            raise BudgetExceeded(
                f"the {budget.period}ly budget of {budget.amount} {budget.currency} for app "
                f"{app!r} would be exceeded", retry_after_s=3600)

    def spent(self, app: str, budget: Budget | None, nanos: int) -> None:
        if budget is not None and (spend := self._spend.get((app, budget.period,
                                                             budget.currency))):
            spend.local_nanos += nanos
