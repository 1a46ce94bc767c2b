"""Key management over HTTP, for admin keys: list, create (the secret is shown once), revoke.
Only `app` keys are created and revoked here: an admin who could mint an auditor key could read
the ledger, so auditor and admin keys are made with the CLI, which needs the database itself.
Each change is recorded in key_events and reloads this replica's key cache; the others see it
on their next refresh."""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy import keys
from proxy.access import allow, json_response, query_params
from proxy.errors import BadRequest, Forbidden, NotFound
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
    role, policy = body.get("role", "app"), body.get("policy")
    try:
        app = keys.check_app(body.get("app"))
    except ValueError as exc:
        raise BadRequest(str(exc), param="app") from None
    if role not in keys.ROLES:
        raise BadRequest(f"role must be one of {', '.join(keys.ROLES)}", param="role")
    if role != "app":
        raise Forbidden(f"{role} keys are created with the CLI (euroute keys create --role "
                        f"{role}); over HTTP only app keys", param="role")
    if policy is not None and not isinstance(policy, str):
        raise BadRequest("policy must be a policy name", param="policy")
    try:
        policy = keys.policy_for(policies, app, policy)
    except ValueError as exc:
        raise BadRequest(str(exc), param="policy") from None
    secret, record = await keys.create(request.app.state.engine, app=app, policy=policy, role=role,
                                       actor=key.id)
    await request.app.state.gateway.keys.load()
    return json_response({"object": "api_key", "id": record.id, "key": secret,
                          "app": record.app, "role": record.role, "policy": record.policy}, 201)


@allow("admin")
async def revoke_key(request: Request, key: Key) -> Response:
    key_id = request.path_params["id"]
    if len(key_id) > 40 or not key_id.isprintable():
        raise BadRequest("id must be at most 40 printable characters", param="id")
    try:
        revoked = await keys.revoke(request.app.state.engine, key_id, actor=key.id,
                                    roles=("app",))
    except keys.RoleNotAllowed as exc:
        raise Forbidden(f"{exc}: auditor and admin keys are revoked with the CLI (euroute keys "
                        "revoke); over HTTP only app keys", param="id") from None
    if not revoked:
        raise NotFound(f"no active key {key_id!r}", param="id")
    await request.app.state.gateway.keys.load()
    return json_response({"object": "api_key", "id": key_id, "revoked": True})


def routes() -> list[Route]:
    return [
        Route("/v1/admin/keys", list_keys, methods=["GET"]),
        Route("/v1/admin/keys", create_key, methods=["POST"]),
        Route("/v1/admin/keys/{id}/revoke", revoke_key, methods=["POST"]),
    ]
