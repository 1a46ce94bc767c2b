"""Who may call the audit and admin API, and how its answers and failures are rendered.

Separation of duties: whoever manages keys cannot read the ledger, and the other way round.

    app       the models (chat, embeddings, models list); nothing else calls them
    auditor   GET /v1/audit/...   every query, every app, and every key created or revoked
              GET /v1/usage       any app (`app=` to pick one)
    admin     /v1/admin/keys...   list keys; create and revoke app keys (auditor and admin
                                  keys only with the CLI, which needs the database)
    any key   GET /v1/usage       its own app's usage only

Anything else is 403 permission_error; no key or an unknown one is 401.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from proxy import report
from proxy.errors import BadRequest, EurouteError, Forbidden
from proxy.keys import Key, Role, authenticate

Handler = Callable[[Request, Key], Awaitable[Response]]
Endpoint = Callable[[Request], Awaitable[Response]]


def json_response(data: Any, status: int = 200) -> Response:
    return Response(report.to_json(data), status, media_type="application/json")


def error_response(exc: EurouteError) -> Response:
    return Response(exc.render(), exc.status, media_type="application/json",
                    headers={k.decode(): v.decode() for k, v in exc.headers()})


def allow(*roles: Role) -> Callable[[Handler], Endpoint]:
    """Authenticate, admit only `roles`, and render every failure in the OpenAI shape."""
    def wrap(handler: Handler) -> Endpoint:
        @functools.wraps(handler)
        async def endpoint(request: Request) -> Response:
            try:
                key = authenticate(request.app.state.gateway.keys, request.scope)
                if key.role not in roles:
                    raise Forbidden(f"a key with role {key.role!r} may not use "
                                    f"{request.method} {request.url.path}")
                return await handler(request, key)
            except EurouteError as exc:
                return error_response(exc)
        return endpoint
    return wrap


def query_params(request: Request, allowed: frozenset[str]) -> dict[str, str]:
    params = dict(request.query_params)
    if len(params) != len(request.query_params.multi_items()):
        repeated = next(k for k in params if len(request.query_params.getlist(k)) > 1)
        raise BadRequest(f"query parameter {repeated!r} is given more than once", param=repeated)
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise BadRequest(f"unknown query parameter {unknown[0]!r}; this endpoint takes "
                         f"{', '.join(sorted(allowed)) or 'none'}", param=unknown[0])
    return params
