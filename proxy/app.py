"""The ASGI application: builds every piece once, in the lifespan, and wires the routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy import __version__, audit, openapi, ui
from proxy.access import error_response
from proxy.asgi import new_request_id
from proxy.errors import EurouteError, NotFound
from proxy.gateway import SURFACES, Gateway, missing_credentials
from proxy.keys import KeyCache
from proxy.ledger.anchors import AnchorSink
from proxy.ledger.chain import DEV_KEY, DEV_PSEUDONYM_SECRET
from proxy.ledger.db import make_engine, migrate
from proxy.ledger.writer import Writer
from proxy.limits import Budgets
from proxy.policy.live import LivePolicies
from proxy.settings import Settings, masked_url
from proxy.upstream import Upstream

log = logging.getLogger("euroute")


class _Late:
    """Resolves the handler from the gateway built in the lifespan, at request time."""

    __slots__ = ("app", "name")

    def __init__(self, app: Starlette, name: str) -> None:
        self.app, self.name = app, name

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await getattr(self.app.state.gateway, self.name)(scope, receive, send)


# The request path skips Starlette's middleware and router: measured, they cost more than the
# policy decision. Other methods on these paths still reach the router (405, OpenAI-shaped).
FAST = {**{("POST", m.PATH): m.ENDPOINT for m in SURFACES.values()},
        ("POST", "/v1/embeddings"): "embeddings",
        ("GET", "/v1/models"): "models", ("GET", "/healthz"): "healthz",
        ("GET", "/readyz"): "readyz", ("GET", "/metrics"): "metrics"}


class Euroute:
    """The ASGI app: a dict lookup for the request path, Starlette for everything else."""

    def __init__(self, starlette: Starlette) -> None:
        self.starlette = starlette
        self.state = starlette.state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.starlette(scope, receive, send)
        elif name := FAST.get((scope["method"], scope["path"])):
            await getattr(self.state.gateway, name)(scope, receive, send)
        else:
            # Audit, admin, UI: an id in the answer and the log too (a 401, a 500).
            scope["euroute.request_id"] = request_id = new_request_id()
            header = (b"x-request-id", request_id.encode())

            async def send_with_id(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", ()), header]
                await send(message)
            await self.starlette(scope, receive, send_with_id)


async def _http_error(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    if status == 404:
        return error_response(NotFound(f"no such endpoint: {request.method} {request.url.path}"))
    failure = EurouteError(getattr(exc, "detail", "") or "request refused")
    failure.status, failure.type = status, "invalid_request_error"
    return error_response(failure)


async def _euroute_error(request: Request, exc: Exception) -> Response:
    return error_response(exc if isinstance(exc, EurouteError) else EurouteError(str(exc)))


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s (%s)", request.method, request.url.path,
                  request.scope.get("euroute.request_id"))
    return error_response(EurouteError("internal error; the request id is in x-request-id"))


def _report_start(settings: Settings, policies: LivePolicies, writer_id: str) -> None:
    """One line on what this replica serves, then one per thing it lacks."""
    current = policies.current
    routes = [r.id for r in current.catalog.routes if r.id in current.base_urls]
    log.info("euroute started", extra={"fields": {
        "version": __version__, "ledger": masked_url(settings.database_url),
        "policy_version": current.version[:12], "routes": ",".join(routes) or "none",
        "writer": writer_id}})
    for missing in missing_credentials(current):
        log.error("an enabled route has no credential: it is not tried and /readyz answers 503 "
                  "until it is set",
                  extra={"fields": missing})
    if settings.pseudonym_secret() == DEV_PSEUDONYM_SECRET:
        log.warning("EUROUTE_PSEUDONYM_KEY is not set: end-user pseudonyms use the public "
                    "development key, so anyone who reads the ledger can test a guessed end-user "
                    "id against them; set a key of your own before real users arrive")


def create_app(settings: Settings | None = None) -> Euroute:
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        policies = LivePolicies(settings.resolved_policy_dir(), settings.environment)
        engine = make_engine(settings.database_url)
        if settings.migrate_on_start:
            await migrate(engine)
        keys = KeyCache(engine, settings.key_refresh_s)
        await keys.load()
        keyring = settings.keyring()
        if keyring.current.id == DEV_KEY.id:
            log.warning("EUROUTE_LEDGER_KEY is not set: the ledger chain uses the public "
                        "development key and proves nothing against database writers")
        writer = Writer(engine, keyring=keyring, batch_size=settings.ledger_batch_size,
                        gather_s=settings.ledger_gather_s,
                        buffer_rows=settings.ledger_buffer_rows,
                        max_outage_s=settings.ledger_max_outage_s,
                        durable=settings.ledger_durable,
                        heartbeat_s=settings.ledger_heartbeat_s, grace_s=settings.ledger_grace_s,
                        anchors=AnchorSink(settings.anchor_dir, keyring.current),
                        anchor_s=settings.anchor_interval_s)
        upstream = Upstream(settings)
        budgets = Budgets(engine, settings.budget_cache_s)
        gateway = Gateway(settings, policies, keys, writer, upstream, budgets)
        app.state.gateway, app.state.engine = gateway, engine
        writer.start()
        gateway.sampler.start()
        keys.start()
        policies.start(settings.policy_poll_s)
        # Only the main thread may take signals (not so when a test runs the server).
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, policies.reload)
        _report_start(settings, policies, writer.writer_id)
        try:
            yield
        finally:
            await policies.stop()
            await keys.stop()
            await gateway.sampler.stop()
            try:
                await writer.close()
                await budgets.close()
                await gateway.rates.close()
            finally:
                await upstream.aclose()
                await engine.dispose()

    app = Starlette(lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error, EurouteError: _euroute_error,
                                        Exception: _server_error})
    app.router.routes.extend(Route(path, _Late(app, name), methods=[method])
                             for (method, path), name in FAST.items())
    app.router.routes.extend(audit.routes(app))
    app.router.routes.extend(ui.routes())
    app.router.routes.append(Route("/openapi.json", openapi.endpoint, methods=["GET"]))
    return Euroute(app)
