"""The audit and admin HTTP API. Off the request path, so plain Starlette requests and responses.

Who may call what (separation of duties: whoever manages keys cannot read the ledger, and the
other way round):

    auditor   GET /v1/audit/...   every query, every app
              GET /v1/usage       any app (`app=` to pick one)
    admin     /v1/admin/keys...   list, create, revoke keys
    any key   GET /v1/usage       its own app's usage only

Anything else is 403 permission_error; no key or an unknown one is 401. No response carries a
key hash, the pseudonym key or a pseudonym's salt.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from proxy import keys, records, report
from proxy.endpoints import authenticate
from proxy.errors import BadRequest, EurouteError, Forbidden, LedgerTampered, NotFound
from proxy.keys import Key, Role
from proxy.ledger import providers, queries
from proxy.ledger.queries import Window

Handler = Callable[[Request, Key], Awaitable[Response]]
Endpoint = Callable[[Request], Awaitable[Response]]
RANGE = frozenset({"from", "to", *queries.FILTERS, "format"})


def _error(exc: EurouteError) -> Response:
    return Response(exc.render(), exc.status, media_type="application/json",
                    headers={k.decode(): v.decode() for k, v in exc.headers()})


def _json(data: Any, status: int = 200) -> Response:
    return Response(report.to_json(data), status, media_type="application/json")


def _for(*roles: Role) -> Callable[[Handler], Endpoint]:
    """Authenticate, allow only `roles`, and render every failure in the OpenAI shape."""
    def wrap(handler: Handler) -> Endpoint:
        @functools.wraps(handler)
        async def endpoint(request: Request) -> Response:
            try:
                key = authenticate(request.app.state.gateway.keys, dict(request.scope["headers"]))
                if key.role not in roles:
                    raise Forbidden(f"a key with role {key.role!r} may not use "
                                    f"{request.method} {request.url.path}")
                return await handler(request, key)
            except EurouteError as exc:
                return _error(exc)
        return endpoint
    return wrap


def _params(request: Request, allowed: frozenset[str]) -> dict[str, str]:
    params = dict(request.query_params)
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise BadRequest(f"unknown query parameter {unknown[0]!r}; this endpoint takes "
                         f"{', '.join(sorted(allowed)) or 'none'}", param=unknown[0])
    return params


def _window(params: dict[str, str], **override: str | None) -> Window:
    try:
        start = queries.instant(params["from"]) if "from" in params else None
    except ValueError:
        raise BadRequest("from must be YYYY-MM-DD or an ISO 8601 time", param="from") from None
    try:
        end = queries.until(params["to"]) if "to" in params else None
    except ValueError:
        raise BadRequest("to must be YYYY-MM-DD or an ISO 8601 time", param="to") from None
    filters = {name: params.get(name) for name in queries.FILTERS}
    return Window(start=start, end=end, **{**filters, **override})


def _choice(params: dict[str, str], name: str, allowed: tuple[str, ...], default: str) -> str:
    value = params.get(name, default)
    if value not in allowed:
        raise BadRequest(f"{name} must be one of {', '.join(allowed)}", param=name)
    return value


def _rows(rows: list[dict[str, Any]], fmt: str, **extra: Any) -> Response:
    if fmt == "csv":
        return Response("".join(report.csv_lines(rows)), media_type="text/csv")
    return _json({"object": "list", **extra, "data": rows})


def _engine(request: Request) -> Any:
    return request.app.state.engine


# -- usage ------------------------------------------------------------------------------------

async def _usage(request: Request, window: Window, params: dict[str, str]) -> Response:
    group_by = _choice(params, "group_by", queries.GROUPS, "app")
    fmt = _choice(params, "format", ("json", "csv"), "json")
    rows = await queries.usage(_engine(request), window, group_by=group_by)
    return _rows(rows, fmt)


@_for("auditor")
async def audit_usage(request: Request, key: Key) -> Response:
    params = _params(request, RANGE | {"group_by"})
    return await _usage(request, _window(params), params)


@_for("app", "auditor", "admin")
async def own_usage(request: Request, key: Key) -> Response:
    params = _params(request, RANGE | {"group_by"})
    app = params.get("app")
    if key.role != "auditor":
        if app is not None and app != key.app:
            raise Forbidden("this key may only read its own app's usage", param="app")
        app = key.app
    return await _usage(request, _window(params, app=app), params)


# -- decisions --------------------------------------------------------------------------------

@_for("auditor")
async def decisions(request: Request, key: Key) -> Response:
    params = _params(request, RANGE | {"group_by"})
    group_by = _choice(params, "group_by", queries.DECISION_GROUPS, "policy")
    fmt = _choice(params, "format", ("json", "csv"), "json")
    rows = await queries.decisions(_engine(request), _window(params), group_by=group_by)
    return _rows(rows, fmt)


async def _one(request: Request, by: str) -> Response:
    _params(request, frozenset())
    ident = request.path_params["id"]
    found = await queries.find(_engine(request), ident, by)  # type: ignore[arg-type]
    if found is None:
        raise NotFound(f"no {by} {ident!r} in the ledger", param="id")
    return _json(found)


@_for("auditor")
async def decision(request: Request, key: Key) -> Response:
    return await _one(request, "decision")


@_for("auditor")
async def request_record(request: Request, key: Key) -> Response:
    return await _one(request, "request")


# -- what reached providers -------------------------------------------------------------------

@_for("auditor")
async def transfers(request: Request, key: Key) -> Response:
    params = _params(request, RANGE | {"limit"})
    fmt = _choice(params, "format", ("json", "csv"), "json")
    limit = params.get("limit", "1000")
    if not limit.isdigit() or int(limit) == 0:
        raise BadRequest("limit must be a positive integer", param="limit")
    found = await providers.transfers(_engine(request), _window(params), limit=int(limit))
    if fmt == "csv":
        return Response("".join(report.csv_lines(found["data"], providers.TRANSFER_COLUMNS)),
                        media_type="text/csv")
    return _json({"object": "list", **found})


@_for("auditor")
async def retention(request: Request, key: Key) -> Response:
    params = _params(request, RANGE | {"as_of"})
    fmt = _choice(params, "format", ("json", "csv"), "json")
    try:
        as_of = dt.date.fromisoformat(params["as_of"]) if "as_of" in params else None
    except ValueError:
        raise BadRequest("as_of must be YYYY-MM-DD", param="as_of") from None
    rows = await providers.retention(_engine(request), _window(params), as_of=as_of)
    return _rows(rows, fmt, as_of=as_of or dt.datetime.now(dt.UTC).date())


@_for("auditor")
async def contracts(request: Request, key: Key) -> Response:
    params = _params(request, RANGE)
    fmt = _choice(params, "format", ("json", "csv"), "json")
    return _rows(await providers.contracts(_engine(request), _window(params)), fmt)


@_for("auditor")
async def processing_records(request: Request, key: Key) -> Response:
    params = _params(request, RANGE)
    fmt = _choice(params, "format", ("json", "csv", "markdown"), "json")
    document = await records.records(_engine(request),
                                     request.app.state.gateway.policies.current, _window(params))
    if fmt == "csv":
        return Response("".join(report.csv_lines(map(records.flat, document["records"]))),
                        media_type="text/csv")
    if fmt == "markdown":
        return Response("".join(records.markdown(document)), media_type="text/markdown")
    return _json(document)


@_for("auditor")
async def export(request: Request, key: Key) -> Response:
    params = _params(request, RANGE)
    fmt = _choice(params, "format", ("json", "csv"), "csv")
    window, engine = _window(params), _engine(request)
    chunks = report.csv_chunks if fmt == "csv" else report.jsonl_chunks

    async def body() -> AsyncIterator[str | bytes]:
        # Closing the row stream returns its connection even when the client goes away.
        async with contextlib.aclosing(queries.export(engine, window)) as rows:
            async for chunk in chunks(queries.EXPORT_COLUMNS, rows):
                yield chunk
    return StreamingResponse(body(), media_type="text/csv" if fmt == "csv"
                             else "application/x-ndjson")


@_for("auditor")
async def verify(request: Request, key: Key) -> Response:
    _params(request, frozenset())
    result = await queries.verify(_engine(request))
    if not result["ok"]:
        raise LedgerTampered(result["finding"], rows_verified=result["rows"])
    return _json(result)


# -- keys -------------------------------------------------------------------------------------

@_for("admin")
async def list_keys(request: Request, key: Key) -> Response:
    _params(request, frozenset())
    return _json({"object": "list", "data": await keys.listing(_engine(request))})


@_for("admin")
async def create_key(request: Request, key: Key) -> Response:
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        raise BadRequest("the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = sorted(set(body) - {"app", "policy", "role"})
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; send app, policy and role",
                         param=unknown[0])
    policies = request.app.state.gateway.policies.current
    app, role = body.get("app"), body.get("role", "app")
    if not isinstance(app, str) or not 0 < len(app) <= 100:
        raise BadRequest("app must be a name of 1 to 100 characters", param="app")
    if role not in keys.ROLES:
        raise BadRequest(f"role must be one of {', '.join(keys.ROLES)}", param="role")
    policy = body.get("policy") or (policies.apps[app].policy if app in policies.apps else None)
    if policy is None:
        raise BadRequest(f"app {app!r} is not in apps.yaml: name a policy", param="policy")
    if policy not in policies.policies:
        raise BadRequest(f"unknown policy {policy!r}; known: "
                         f"{', '.join(sorted(policies.policies))}", param="policy")
    secret, record = await keys.create(_engine(request), app=app, policy=policy, role=role)
    # Usable on this replica at once; the others pick it up on their next cache refresh.
    await request.app.state.gateway.keys.load()
    return _json({"object": "api_key", "id": record.id, "key": secret, "app": record.app,
                  "role": record.role, "policy": record.policy}, 201)


@_for("admin")
async def revoke_key(request: Request, key: Key) -> Response:
    key_id = request.path_params["id"]
    if not await keys.revoke(_engine(request), key_id):
        raise NotFound(f"no active key {key_id!r}", param="id")
    await request.app.state.gateway.keys.load()
    return _json({"object": "api_key", "id": key_id, "revoked": True})


def routes(app: Starlette) -> list[Route]:
    """The routes to add to `app`; handlers find the gateway and engine on `app.state`."""
    get = ["GET"]
    return [
        Route("/v1/usage", own_usage, methods=get),
        Route("/v1/audit/usage", audit_usage, methods=get),
        Route("/v1/audit/decisions", decisions, methods=get),
        Route("/v1/audit/decisions/{id}", decision, methods=get),
        Route("/v1/audit/requests/{id}", request_record, methods=get),
        Route("/v1/audit/transfers", transfers, methods=get),
        Route("/v1/audit/retention", retention, methods=get),
        Route("/v1/audit/contracts", contracts, methods=get),
        Route("/v1/audit/records", processing_records, methods=get),
        Route("/v1/audit/export", export, methods=get),
        Route("/v1/audit/verify", verify, methods=get),
        Route("/v1/admin/keys", list_keys, methods=get),
        Route("/v1/admin/keys", create_key, methods=["POST"]),
        Route("/v1/admin/keys/{id}/revoke", revoke_key, methods=["POST"]),
    ]
