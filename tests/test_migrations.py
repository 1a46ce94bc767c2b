"""Alembic owns the schema: upgrade from empty, round trip, and no drift from the models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from proxy.ledger.db import make_engine, migrate
from proxy.ledger.tables import metadata
from tests.conftest import new_database, run


@pytest.fixture
def empty(db_url: str, tmp_path: Path) -> Iterator[str]:
    url, drop = new_database("sqlite" if db_url.startswith("sqlite") else "postgresql", tmp_path)
    yield url
    drop()


async def _apply(url: str, revision: str) -> None:
    engine = make_engine(url, poolclass=NullPool)
    try:
        if revision.startswith("-") or revision == "base":
            from alembic import command

            from proxy.ledger.db import alembic_config

            def down(conn: Connection) -> None:
                cfg = alembic_config(url)
                cfg.attributes["connection"] = conn
                command.downgrade(cfg, revision)
            async with engine.begin() as conn:
                await conn.run_sync(down)
        else:
            await migrate(engine, revision)
    finally:
        await engine.dispose()


async def _inspect(url: str) -> tuple[set[str], list[Any]]:
    engine = make_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            def look(sync: Connection) -> tuple[set[str], list[Any]]:
                context = MigrationContext.configure(sync, opts={"compare_type": True})
                return set(inspect(sync).get_table_names()), compare_metadata(context, metadata)
            return await conn.run_sync(look)
    finally:
        await engine.dispose()


def test_upgrade_from_empty_matches_the_models(empty: str) -> None:
    run(_apply(empty, "head"))
    tables, diff = run(_inspect(empty))
    assert {"ledger", "ledger_tombstones", "ledger_chains", "api_keys", "key_events"} <= tables
    assert diff == []


def test_downgrade_and_upgrade_round_trip(empty: str) -> None:
    run(_apply(empty, "head"))
    run(_apply(empty, "base"))
    tables, _ = run(_inspect(empty))
    assert tables <= {"alembic_version"}
    run(_apply(empty, "head"))
    tables, diff = run(_inspect(empty))
    assert "ledger" in tables and diff == []


def test_constraint_names_follow_the_convention() -> None:
    ledger = metadata.tables["ledger"]
    names = {c.name for c in ledger.constraints} | {i.name for i in ledger.indexes}
    assert {"pk_ledger", "uq_ledger_request_id", "uq_ledger_writer_id_seq",
            "ix_ledger_created_at", "ix_ledger_app_created_at"} <= names
