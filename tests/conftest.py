"""Real servers on loopback: the fake Mistral upstream and euroute under uvicorn, on SQLite
and on PostgreSQL (`--db sqlite`, `--db postgresql`, default both)."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy import select
from sqlalchemy.pool import NullPool

from proxy import keys, serving
from proxy.app import create_app
from proxy.ledger.db import make_engine, migrate
from proxy.ledger.tables import ledger
from proxy.settings import Settings
from tests.fake_mistral import UPSTREAM_KEY, FakeMistral

REPO = Path(__file__).resolve().parent.parent
PG_ADMIN = os.environ.get("EUROUTE_TEST_PG", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres")
PSEUDONYM_KEY = "test-pseudonym-key-not-a-secret"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--db", default=os.environ.get("EUROUTE_TEST_DB", "sqlite,postgresql"),
                     help="comma-separated backends to run database tests on")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "db_url" in metafunc.fixturenames:
        backends = [b.strip() for b in metafunc.config.getoption("db").split(",") if b.strip()]
        metafunc.parametrize("db_url", backends, indirect=True, scope="session")


def run(coro: Any) -> Any:
    """Run a coroutine from a sync test or fixture (each call gets its own loop)."""
    return asyncio.run(coro)


async def _pg(statement: str) -> None:
    engine = make_engine(PG_ADMIN, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.exec_driver_sql(statement)
    finally:
        await engine.dispose()


def new_database(backend: str, tmp: Path) -> tuple[str, Callable[[], None]]:
    """A fresh, empty database: its URL and how to drop it."""
    if backend == "sqlite":
        path = tmp / f"ledger-{secrets.token_hex(4)}.db"
        return f"sqlite+aiosqlite:///{path}", lambda: None
    if backend == "postgresql":
        name = f"euroute_test_{secrets.token_hex(6)}"
        run(_pg(f'CREATE DATABASE "{name}"'))
        url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
        return url, lambda: run(_pg(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    raise ValueError(f"unknown test database backend {backend!r}")


@pytest.fixture(scope="session")
def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[str]:
    url, drop = new_database(request.param, tmp_path_factory.mktemp(request.param))
    run(_migrate(url))
    yield url
    drop()


async def _migrate(url: str) -> None:
    engine = make_engine(url, poolclass=NullPool)
    try:
        await migrate(engine)
    finally:
        await engine.dispose()


@pytest.fixture(scope="session")
def upstream() -> Iterator[FakeMistral]:
    with FakeMistral() as fake:
        yield fake


@pytest.fixture
def fake(upstream: FakeMistral) -> Iterator[FakeMistral]:
    upstream.reset()
    yield upstream
    upstream.reset()


@pytest.fixture(scope="session", autouse=True)
def upstream_env(upstream: FakeMistral) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in ("MISTRAL_BASE_URL", "MISTRAL_API_KEY")}
    os.environ["MISTRAL_BASE_URL"] = upstream.url
    os.environ["MISTRAL_API_KEY"] = UPSTREAM_KEY
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def copy_policies(dest: Path) -> Path:
    shutil.copytree(REPO / "policies", dest, dirs_exist_ok=True)
    return dest


class Proxy:
    """euroute in a real uvicorn server on a loopback port, in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        # The configuration `euroute serve` runs, client limits included.
        config = serving.config(settings, self.app, host="127.0.0.1", port=0, log_config=None,
                                log_level="warning", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="euroute", daemon=True)

    def __enter__(self) -> Proxy:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("euroute did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.origin = f"http://127.0.0.1:{port}"
        self.url = f"{self.origin}/v1"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def gateway(self) -> Any:
        return self.app.state.gateway

    def key(self, app: str = "support-bot", policy: str = "eu-standard", role: str = "app") -> str:
        """A new key, usable once the proxy's key cache has picked it up."""
        secret, _ = run(_create_key(self.settings.database_url, app, policy, role))
        deadline = time.monotonic() + 10
        while self.gateway.keys.get(secret) is None:
            if time.monotonic() > deadline:
                raise RuntimeError("key cache did not pick up the new key")
            time.sleep(0.02)
        return str(secret)

    def row(self, request_id: str, timeout: float = 10.0) -> dict[str, Any]:
        """The ledger row of a request, once the writer has written it."""
        deadline = time.monotonic() + timeout
        while True:
            found = run(ledger_rows(self.settings.database_url, ledger.c.request_id == request_id))
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"no ledger row for {request_id}")
            time.sleep(0.02)


async def _create_key(url: str, app: str, policy: str, role: str) -> tuple[str, keys.Key]:
    engine = make_engine(url, poolclass=NullPool)
    try:
        return await keys.create(engine, app=app, policy=policy, role=role,  # type: ignore[arg-type]
                                 actor="cli")
    finally:
        await engine.dispose()


async def ledger_rows(url: str, *where: Any) -> list[dict[str, Any]]:
    engine = make_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            result = await conn.execute(select(ledger).where(*where).order_by(ledger.c.id))
            return [{str(k): v for k, v in r._mapping.items()} for r in result]
    finally:
        await engine.dispose()


def proxy_settings(db_url: str, policy_dir: Path, **overrides: Any) -> Settings:
    return Settings(**{"database_url": db_url, "policy_dir": policy_dir,
                       "pseudonym_key": PSEUDONYM_KEY, "key_refresh_s": 0.1,
                       "policy_poll_s": 0.1, "budget_cache_s": 0.0, "migrate_on_start": True,
                       **overrides})


@pytest.fixture(scope="session")
def proxy(db_url: str, upstream: FakeMistral, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Proxy]:
    policy_dir = copy_policies(tmp_path_factory.mktemp("policies"))
    with Proxy(proxy_settings(db_url, policy_dir)) as server:
        yield server


@pytest.fixture(scope="session")
def app_key(proxy: Proxy) -> str:
    return proxy.key("support-bot", "eu-standard")


@pytest.fixture
def http(proxy: Proxy, app_key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=proxy.url, headers={"authorization": f"Bearer {app_key}"},
                      timeout=30) as client:
        yield client
