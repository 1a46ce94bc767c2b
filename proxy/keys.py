"""API keys: created once, stored only as SHA-256, looked up from an in-memory cache, and the
authentication of every request by them.

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
from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy import metrics
from proxy.asgi import Scope, single_header
from proxy.errors import BadRequest, Unauthorized
from proxy.ledger.tables import api_keys, key_events
from proxy.logs import log_unauthorized
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


def check_app(app: object) -> str:
    """An app name as the key table holds it, or ValueError."""
    if not isinstance(app, str) or not 0 < len(app) <= 100 or not app.isprintable():
        raise ValueError("app must be a name of 1 to 100 printable characters")
    return app


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Key:
    id: str
    app: str
    role: Role
    policy: str


class RoleNotAllowed(ValueError):
    """The key exists, but its role is not one the caller may revoke."""


async def create(engine: AsyncEngine, *, app: str, policy: str, role: Role, actor: str
                 ) -> tuple[str, Key]:
    """A new key: the secret (shown once) and its record. `actor` (the admin key's id, or
    `cli`) is recorded in key_events in the same transaction."""
    secret = PREFIX + secrets.token_urlsafe(32)
    record = Key(id="key_" + secrets.token_hex(8), app=app, role=role, policy=policy)
    now = dt.datetime.now(dt.UTC)
    async with engine.begin() as conn:
        await conn.execute(insert(api_keys).values(
            id=record.id, prefix=secret[: len(PREFIX) + 6], key_hash=digest(secret), app=app,
            role=role, policy=policy, created_at=now))
        await conn.execute(insert(key_events).values(
            at=now, actor=actor, action="created", key_id=record.id, role=role, app=app))
    return secret, record


async def revoke(engine: AsyncEngine, key_id: str, *, actor: str,
                 roles: Collection[Role] = ROLES) -> bool:
    """Revoke an active key; False when there is none. RoleNotAllowed when its role is not in
    `roles` (over HTTP only app keys may be revoked)."""
    now = dt.datetime.now(dt.UTC)
    async with engine.begin() as conn:
        found = (await conn.execute(
            select(api_keys.c.role, api_keys.c.app)
            .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None)))).first()
        if found is None:
            return False
        if found.role not in roles:
            raise RoleNotAllowed(f"key {key_id} has role {found.role!r}")
        result = await conn.execute(
            update(api_keys).where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
            .values(revoked_at=now))
        if result.rowcount != 1:  # revoked meanwhile, by someone else
            return False
        await conn.execute(insert(key_events).values(
            at=now, actor=actor, action="revoked", key_id=key_id, role=found.role,
            app=found.app))
    return True


async def events(engine: AsyncEngine, start: dt.datetime | None = None,
                 end: dt.datetime | None = None) -> list[dict[str, object]]:
    """Key creations and revocations in [start, end), oldest first."""
    where = [key_events.c.at >= start] if start is not None else []
    if end is not None:
        where.append(key_events.c.at < end)
    cols = [c for c in key_events.columns if c.name != "id"]
    async with engine.connect() as conn:
        rows = await conn.execute(select(*cols).where(*where)
                                  .order_by(key_events.c.at, key_events.c.id))
        return [{str(k): v for k, v in r._mapping.items()} for r in rows]


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


def authenticate(keys: KeyCache, scope: Scope) -> Key:
    """The key a request presents, or Unauthorized (401), counted and logged by `refused`."""
    headers = scope["headers"]
    try:
        auth = single_header(headers, b"authorization")
        # Anthropic's SDK sends its key in x-api-key.
        api_key = single_header(headers, b"x-api-key") if auth is None else None
    except BadRequest as exc:
        refused(scope, "malformed")
        raise Unauthorized(exc.message) from None
    if api_key:
        secret = api_key.strip()
    elif auth and auth.lower().startswith(b"bearer "):
        secret = auth[7:].strip()
    else:
        refused(scope, "missing")
        raise Unauthorized("missing API key: send 'Authorization: Bearer <euroute key>' "
                           "(or 'x-api-key: <euroute key>')")
    key = keys.get(secret.decode("latin-1"))
    if key is None:
        refused(scope, "invalid")
        raise Unauthorized("invalid or revoked API key")
    return key


def refused(scope: Scope, reason: metrics.Refusal) -> None:
    """A request refused for want of a valid key: counted and logged, never any part of the
    key. No ledger row: a client without a key must not be able to grow the ledger."""
    metrics.UNAUTHORIZED.labels(reason).inc()
    log_unauthorized(scope, reason)
