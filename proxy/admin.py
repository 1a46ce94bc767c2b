"""Key management over HTTP, for admin keys: list, create (the secret is shown once), revoke.
Each change reloads this replica's key cache; the others see it on their next refresh."""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy import keys
from proxy.access import allow, json_response, query_params
from proxy.errors import BadRequest, NotFound
from proxy.keys import Key


@allow("admin")
async def list_keys(request: Request, key: Key) -> Response:
    query_params(request, frozenset())
    return json_response({"object": "list", "data": await keys.listing(request.app.state.engine)})


@allow("admin")
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
    try:
        policy = keys.policy_for(policies, app, body.get("policy"))
    except ValueError as exc:
        raise BadRequest(str(exc), param="policy") from None
    secret, record = await keys.create(request.app.state.engine, app=app, policy=policy, role=role)
    await request.app.state.gateway.keys.load()
    return json_response({"object": "api_key", "id": record.id, "key": secret,
                          "app": record.app, "role": record.role, "policy": record.policy}, 201)


@allow("admin")
async def revoke_key(request: Request, key: Key) -> Response:
    key_id = request.path_params["id"]
    if not await keys.revoke(request.app.state.engine, key_id):
        raise NotFound(f"no active key {key_id!r}", param="id")
    await request.app.state.gateway.keys.load()
    return json_response({"object": "api_key", "id": key_id, "revoked": True})


def routes() -> list[Route]:
    return [
        Route("/v1/admin/keys", list_keys, methods=["GET"]),
        Route("/v1/admin/keys", create_key, methods=["POST"]),
        Route("/v1/admin/keys/{id}/revoke", revoke_key, methods=["POST"]),
    ]
