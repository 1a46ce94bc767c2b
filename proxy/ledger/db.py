"""Engines and migrations for SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from proxy.settings import bundled

# Every SQLite connection: WAL lets readers (audit queries) run while the writer appends, and a
# commit survives the process being killed (synchronous=NORMAL); a locked database is waited for.
SQLITE_PRAGMAS = ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL",
                  "PRAGMA busy_timeout=10000")


def make_engine(url: str, **kwargs: Any) -> AsyncEngine:
    # Errors must not carry row values (pseudonyms, references) into logs.
    engine = create_async_engine(url, hide_parameters=True, **kwargs)
    if engine.dialect.name == "sqlite":
        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            for pragma in SQLITE_PRAGMAS:
                cursor.execute(pragma)
            cursor.close()
    return engine


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(bundled("migrations")))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _upgrade(connection: Connection, url: str, revision: str) -> None:
    cfg = alembic_config(url)
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, revision)


async def migrate(engine: AsyncEngine, revision: str = "head") -> None:
    """Apply migrations on `engine`'s database, sharing its connection with Alembic."""
    async with engine.begin() as conn:
        await conn.run_sync(_upgrade, engine.url.render_as_string(hide_password=False), revision)
