"""The audit HTTP API: every compliance query as GET /v1/audit/..., and each app's own usage
at GET /v1/usage (who may call what: proxy/access.py). Off the request path, so plain
Starlette requests and responses. No answer carries a key hash, the pseudonym key or a
pseudonym's salt.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any, Literal

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from proxy import admin, keys, records, report
from proxy.access import allow, json_response, query_params
from proxy.errors import BadRequest, Forbidden, LedgerTampered, NotFound
from proxy.keys import Key
from proxy.ledger import providers, queries
from proxy.ledger.queries import Window

RANGE = frozenset({"from", "to", *queries.FILTERS, "format"})
MAX_LIMIT = 1_000_000


def _window(params: dict[str, str], **override: str | None) -> Window:
    try:
        start = queries.instant(params["from"]) if "from" in params else None
    except ValueError as exc:
        raise BadRequest(f"from must be YYYY-MM-DD or an ISO 8601 time: {exc}",
                         param="from") from None
    try:
        end = queries.until(params["to"]) if "to" in params else None
    except ValueError as exc:
        raise BadRequest(f"to must be YYYY-MM-DD or an ISO 8601 time: {exc}", param="to") from None
    filters: dict[str, str | None] = {}
    for name in queries.FILTERS:
        try:
            filters[name] = queries.filter_value(name, params[name]) if name in params else None
        except ValueError as exc:
            raise BadRequest(str(exc), param=name) from None
    return Window(start=start, end=end, **{**filters, **override})


def _ident(request: Request) -> str:
    """A request or decision id from the path: ids are short and printable."""
    ident: str = request.path_params["id"]
    if len(ident) > 40 or not ident.isprintable():
        raise BadRequest("id must be at most 40 printable characters", param="id")
    return ident


def _choice(params: dict[str, str], name: str, allowed: tuple[str, ...], default: str) -> str:
    value = params.get(name, default)
    if value not in allowed:
        raise BadRequest(f"{name} must be one of {', '.join(allowed)}", param=name)
    return value


def _rows(rows: list[dict[str, Any]], fmt: str, **extra: Any) -> Response:
    if fmt == "csv":
        return Response("".join(report.csv_lines(rows)), media_type="text/csv")
    return json_response({"object": "list", **extra, "data": rows})


def _engine(request: Request) -> Any:
    return request.app.state.engine


# -- usage ------------------------------------------------------------------------------------

async def _usage(request: Request, window: Window, params: dict[str, str]) -> Response:
    group_by = _choice(params, "group_by", queries.GROUPS, "app")
    fmt = _choice(params, "format", ("json", "csv"), "json")
    rows = await queries.usage(_engine(request), window, group_by=group_by)
    return _rows(rows, fmt)


@allow("auditor")
async def audit_usage(request: Request, key: Key) -> Response:
    params = query_params(request, RANGE | {"group_by"})
    return await _usage(request, _window(params), params)


@allow("app", "auditor", "admin")
async def own_usage(request: Request, key: Key) -> Response:
    params = query_params(request, RANGE | {"group_by"})
    app = params.get("app")
    if key.role != "auditor":
        if app is not None and app != key.app:
            raise Forbidden("this key may only read its own app's usage", param="app")
        app = key.app
    return await _usage(request, _window(params, app=app), params)


# -- decisions --------------------------------------------------------------------------------

@allow("auditor")
async def decisions(request: Request, key: Key) -> Response:
    params = query_params(request, RANGE | {"group_by"})
    group_by = _choice(params, "group_by", queries.DECISION_GROUPS, "policy")
    fmt = _choice(params, "format", ("json", "csv"), "json")
    rows = await queries.decisions(_engine(request), _window(params), group_by=group_by)
    return _rows(rows, fmt)


async def _one(request: Request, by: Literal["request", "decision"]) -> Response:
    query_params(request, frozenset())
    ident = _ident(request)
    found = await queries.find(_engine(request), ident, by)
    if found is None:
        raise NotFound(f"no {by} {ident!r} in the ledger", param="id")
    return json_response(found)


@allow("auditor")
async def decision(request: Request, key: Key) -> Response:
    return await _one(request, "decision")


@allow("auditor")
async def request_record(request: Request, key: Key) -> Response:
    return await _one(request, "request")


# -- what reached providers -------------------------------------------------------------------

@allow("auditor")
async def transfers(request: Request, key: Key) -> Response:
    params = query_params(request, RANGE | {"limit"})
    fmt = _choice(params, "format", ("json", "csv"), "json")
    limit = params.get("limit", "1000")
    # isdigit() alone takes '²' and other digits int() refuses.
    if not (limit.isascii() and limit.isdigit() and 0 < int(limit) <= MAX_LIMIT):
        raise BadRequest(f"limit must be an integer from 1 to {MAX_LIMIT}", param="limit")
    found = await providers.transfers(_engine(request), _window(params), limit=int(limit))
    if fmt == "csv":
        return Response("".join(report.csv_lines(found["data"], providers.TRANSFER_COLUMNS)),
                        media_type="text/csv")
    return json_response({"object": "list", **found})


@allow("auditor")
async def retention(request: Request, key: Key) -> Response:
    params = query_params(request, RANGE | {"as_of"})
    fmt = _choice(params, "format", ("json", "csv"), "json")
    try:
        as_of = dt.date.fromisoformat(params["as_of"]) if "as_of" in params else None
    except ValueError:
        raise BadRequest("as_of must be YYYY-MM-DD", param="as_of") from None
    if as_of == dt.date.max:  # the query looks at the day after
        raise BadRequest("as_of must be before 9999-12-31", param="as_of")
    rows = await providers.retention(_engine(request), _window(params), as_of=as_of)
    return _rows(rows, fmt, as_of=as_of or dt.datetime.now(dt.UTC).date())


@allow("auditor")
async def contracts(request: Request, key: Key) -> Response:
    params = query_params(request, RANGE)
    fmt = _choice(params, "format", ("json", "csv"), "json")
    return _rows(await providers.contracts(_engine(request), _window(params)), fmt)


@allow("auditor")
async def processing_records(request: Request, key: Key) -> Response:
    params = query_params(request, RANGE)
    fmt = _choice(params, "format", ("json", "csv", "markdown"), "json")
    document = await records.records(_engine(request),
                                     request.app.state.gateway.policies.current, _window(params))
    if fmt == "csv":
        return Response("".join(report.csv_lines(map(records.flat, document["records"]))),
                        media_type="text/csv")
    if fmt == "markdown":
        return Response("".join(records.markdown(document)), media_type="text/markdown")
    return json_response(document)


@allow("auditor")
async def export(request: Request, key: Key) -> Response:
    params = query_params(request, RANGE)
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


@allow("auditor")
async def key_events(request: Request, key: Key) -> Response:
    params = query_params(request, frozenset({"from", "to", "format"}))
    fmt = _choice(params, "format", ("json", "csv"), "json")
    window = _window(params)
    return _rows(await keys.events(_engine(request), window.start, window.end), fmt)


@allow("auditor")
async def verify(request: Request, key: Key) -> Response:
    query_params(request, frozenset())
    result = await queries.verify(_engine(request), request.app.state.gateway.writer.keyring)
    if not result["ok"]:
        raise LedgerTampered(result["finding"], rows_verified=result["rows"])
    return json_response(result)


def routes(app: Starlette) -> list[Route]:
    """The audit and admin routes for `app`; handlers find the gateway and the engine on
    `app.state`, set in its lifespan."""
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
        Route("/v1/audit/key-events", key_events, methods=get),
        Route("/v1/audit/verify", verify, methods=get),
        *admin.routes(),
    ]
