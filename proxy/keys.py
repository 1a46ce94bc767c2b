"""API keys: created once, stored only as SHA-256, looked up from an in-memory cache.

The cache reloads the whole (small) key table every few seconds, so a key revoked on one
replica stops working on all of them within that interval, and no request waits on the DB.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import secrets
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.ledger.tables import api_keys
from proxy.policy.load import PolicySet

log = logging.getLogger("euroute.keys")
Role = Literal["app", "auditor", "admin"]
ROLES: tuple[Role, ...] = ("app", "auditor", "admin")
PREFIX = "eur_"


def policy_for(policies: PolicySet, app: str, policy: str | None) -> str:
    """The policy a new key of `app` gets: the one named, else the app's in apps.yaml."""
    chosen = policy or (policies.apps[app].policy if app in policies.apps else None)
    if chosen is None:
        raise ValueError(f"app {app!r} is not in apps.yaml: name a policy")
    if chosen not in policies.policies:
        raise ValueError(f"unknown policy {chosen!r}; known: {', '.join(sorted(policies.policies))}")
    return chosen


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Key:
    id: str
    app: str
    role: Role
    policy: str


async def create(engine: AsyncEngine, *, app: str, policy: str, role: Role) -> tuple[str, Key]:
    """A new key: the secret (shown once) and its record."""
    secret = PREFIX + secrets.token_urlsafe(32)
    record = Key(id="key_" + secrets.token_hex(8), app=app, role=role, policy=policy)
    async with engine.begin() as conn:
        await conn.execute(insert(api_keys).values(
            id=record.id, prefix=secret[: len(PREFIX) + 6], key_hash=digest(secret), app=app,
            role=role, policy=policy, created_at=dt.datetime.now(dt.UTC)))
    return secret, record


async def revoke(engine: AsyncEngine, key_id: str) -> bool:
    async with engine.begin() as conn:
        result = await conn.execute(
            update(api_keys).where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
            .values(revoked_at=dt.datetime.now(dt.UTC)))
    return result.rowcount == 1


async def listing(engine: AsyncEngine) -> list[dict[str, object]]:
    cols = [c for c in api_keys.columns if c.name != "key_hash"]
    async with engine.connect() as conn:
        rows = await conn.execute(select(*cols).order_by(api_keys.c.created_at))
        return [{str(k): v for k, v in r._mapping.items()} for r in rows]


class KeyCache:
    def __init__(self, engine: AsyncEngine, refresh_s: float) -> None:
        self.engine = engine
        self.refresh_s = refresh_s
        self._by_hash: dict[str, Key] = {}
        self._started = self._applied = 0  # load() calls begun; the newest one applied
        self._task: asyncio.Task[None] | None = None

    def get(self, secret: str) -> Key | None:
        return self._by_hash.get(digest(secret))

    def by_id(self, key_id: str) -> tuple[str, Key] | None:
        """A live key's hash and record by its id (the dashboard's session cookie names it)."""
        return next(((h, k) for h, k in self._by_hash.items() if k.id == key_id), None)

    async def load(self) -> None:
        # A background refresh that began before a revocation may finish after the reload the
        # revocation triggered: only a load begun later than the one applied may replace it.
        self._started += 1
        ticket = self._started
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(api_keys.c.id, api_keys.c.key_hash, api_keys.c.app, api_keys.c.role,
                       api_keys.c.policy).where(api_keys.c.revoked_at.is_(None)))
            fresh = {r.key_hash: Key(r.id, r.app, r.role, r.policy) for r in rows}
        if ticket > self._applied:
            self._applied, self._by_hash = ticket, fresh

    def start(self) -> None:
        self._task = asyncio.create_task(self._refresh(), name="euroute-key-cache")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            # Wait for it, so no database call outlives the engine.
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.load()
            except Exception as exc:
                log.warning("key cache refresh failed: %s: %s", type(exc).__name__, exc)
