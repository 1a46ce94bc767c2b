"""GET /openapi.json: euroute's own endpoints as an OpenAPI 3.1 document.

Written from one table below, not generated from the handlers: it is the contract clients and
the fuzz suite (tests/test_openapi_fuzz.py) hold euroute to, including the one error shape.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from proxy.ledger import queries

_STR = {"type": "string"}
_NULLABLE_STR = {"type": ["string", "null"]}
ERROR = {
    "type": "object", "required": ["error"], "additionalProperties": False,
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        # Denials add decision_id and reasons; a failed verification adds its finding.
        "additionalProperties": True,
        "properties": {"message": _STR, "type": _STR, "param": _NULLABLE_STR,
                       "code": _NULLABLE_STR},
    }},
}
# /v1/messages answers errors as Anthropic does, for Anthropic's SDK.
MESSAGES_ERROR = {
    "type": "object", "required": ["type", "error"], "additionalProperties": False,
    "properties": {"type": {"const": "error"}, "error": {
        "type": "object", "required": ["type", "message"],
        # Denials add decision_id and reasons.
        "additionalProperties": True,
        "properties": {"type": _STR, "message": _STR},
    }},
}
_ANY_OBJECT = {"type": "object"}
_LIST = {"type": "object", "required": ["object", "data"],
         "properties": {"object": {"const": "list"}, "data": {"type": "array"}}}


def _query(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": schema or _STR}


_RANGE = [
    _query("from", "start, YYYY-MM-DD or ISO 8601 time (UTC when naive)"),
    _query("to", "end; a plain date includes that day"),
    *(_query(f, f"only rows with this {f}") for f in queries.FILTERS),
]


def _format(*formats: str) -> dict[str, Any]:
    return _query("format", "answer format", {"enum": list(formats)})


_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "maxLength": 40}}
_CHAT = {
    "type": "object", "required": ["model", "messages"],
    "properties": {
        "model": {"type": "string", "maxLength": 200},
        "messages": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["role"],
            "properties": {"role": _STR, "content": {"type": ["string", "array", "null"]}}}},
        "max_tokens": {"type": "integer", "minimum": 1},
        "max_completion_tokens": {"type": "integer", "minimum": 1,
                                  "description": "the same limit as max_tokens; both given "
                                                 "and different is a 400"},
        "stream": {"type": "boolean"}, "temperature": {"type": "number"},
        "top_p": {"type": "number"}, "tools": {"type": "array"}, "user": _STR,
    },
}
_RESPONSES = {  # OpenAI's Responses API; nothing is stored
    "type": "object", "required": ["model", "input"],
    "properties": {
        "model": {"type": "string", "maxLength": 200},
        "input": {"type": ["string", "array"]}, "instructions": _STR,
        "max_output_tokens": {"type": "integer", "minimum": 1}, "stream": {"type": "boolean"},
        "store": {"const": False}, "tools": {"type": "array"},
    },
}
_MESSAGES = {  # Anthropic's Messages API; the key may also come in x-api-key
    "type": "object", "required": ["model", "max_tokens", "messages"],
    "properties": {
        "model": {"type": "string", "maxLength": 200},
        "max_tokens": {"type": "integer", "minimum": 1},
        "messages": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["role", "content"],
            "properties": {"role": {"enum": ["user", "assistant"]},
                           "content": {"type": ["string", "array"]}}}},
        "system": {"type": ["string", "array"]}, "stream": {"type": "boolean"},
        "stop_sequences": {"type": "array", "items": _STR}, "tools": {"type": "array"},
    },
}
_EMBEDDINGS = {"type": "object", "required": ["model", "input"],
               "properties": {"model": {"type": "string", "maxLength": 200},
                              "input": {"type": ["string", "array"]}}}
_NEW_KEY = {"type": "object", "required": ["app"], "additionalProperties": False,
            "properties": {"app": {"type": "string", "minLength": 1, "maxLength": 100},
                           "policy": _STR, "role": {"const": "app"}}}
_HEADERS = [
    {"name": "x-euroute-require", "in": "header", "required": False, "schema": _STR,
     "description": "comma-separated narrowing (eu, eea, zdr, no-training, dpa, no-retention, "
                    "no-third-party, no-transfer); every copy of the header applies"},
    {"name": "x-euroute-user", "in": "header", "required": False, "schema": _STR,
     "description": "end-user id, recorded only as a pseudonym"},
]

# path, method, summary, who may call it, parameters, request body schema, 200 schema
_TABLE: list[tuple[str, str, str, str, list[dict[str, Any]], dict[str, Any] | None,
                   dict[str, Any] | None]] = [
    ("/v1/chat/completions", "post", "OpenAI chat completions, routed by policy", "app",
     _HEADERS, _CHAT, _ANY_OBJECT),
    ("/v1/responses", "post", "OpenAI Responses API over chat completions, routed by policy",
     "app", _HEADERS, _RESPONSES, _ANY_OBJECT),
    ("/v1/messages", "post", "Anthropic Messages API over chat completions, routed by policy",
     "app", _HEADERS, _MESSAGES, _ANY_OBJECT),
    ("/v1/embeddings", "post", "embeddings, routed by policy", "app", _HEADERS, _EMBEDDINGS,
     _ANY_OBJECT),
    ("/v1/models", "get", "the models the key's policy admits", "app", [], None, _LIST),
    ("/v1/usage", "get", "usage of the key's own app (an auditor: any app)", "any",
     [*_RANGE, _query("group_by", "grouping", {"enum": list(queries.GROUPS)}),
      _format("json", "csv")], None, None),
    ("/v1/audit/usage", "get", "requests, tokens and cost", "auditor",
     [*_RANGE, _query("group_by", "grouping", {"enum": list(queries.GROUPS)}),
      _format("json", "csv")], None, None),
    ("/v1/audit/decisions", "get", "denials by group", "auditor",
     [*_RANGE, _query("group_by", "grouping", {"enum": list(queries.DECISION_GROUPS)}),
      _format("json", "csv")], None, None),
    ("/v1/audit/decisions/{id}", "get", "one decision", "auditor", [_ID], None, _ANY_OBJECT),
    ("/v1/audit/requests/{id}", "get", "one request's ledger row", "auditor", [_ID], None,
     _ANY_OBJECT),
    ("/v1/audit/transfers", "get", "requests processed or stored outside the EEA", "auditor",
     [*_RANGE, _query("limit", "list at most this many (1 to 1000000)", {"type": "integer"}),
      _format("json", "csv")], None, None),
    ("/v1/audit/retention", "get", "requests a provider may still hold a copy of", "auditor",
     [*_RANGE, _query("as_of", "YYYY-MM-DD, default today"), _format("json", "csv")], None,
     None),
    ("/v1/audit/contracts", "get", "which requests relied on which contract", "auditor",
     [*_RANGE, _format("json", "csv")], None, None),
    ("/v1/audit/records", "get", "GDPR Art. 30 records of processing", "auditor",
     [*_RANGE, _format("json", "csv", "markdown")], None, None),
    ("/v1/audit/export", "get", "raw ledger rows, streamed", "auditor",
     [*_RANGE, _format("csv", "json")], None, None),
    ("/v1/audit/key-events", "get", "every key created or revoked: who, when, which",
     "auditor", [_RANGE[0], _RANGE[1], _format("json", "csv")], None, None),
    ("/v1/audit/verify", "get", "check every writer's hash chain", "auditor", [], None,
     _ANY_OBJECT),
    ("/v1/admin/keys", "get", "list keys (never their secrets)", "admin", [], None, _LIST),
    ("/v1/admin/keys", "post", "create an app key; the secret is shown once", "admin", [],
     _NEW_KEY, None),
    ("/v1/admin/keys/{id}/revoke", "post", "revoke an app key", "admin", [_ID], None,
     _ANY_OBJECT),
    ("/healthz", "get", "liveness, no database", "none", [], None, _ANY_OBJECT),
    ("/readyz", "get", "readiness: ledger writer healthy", "none", [], None, _ANY_OBJECT),
    ("/metrics", "get", "Prometheus metrics", "none", [], None, None),
    ("/openapi.json", "get", "this document", "none", [], None, _ANY_OBJECT),
]
_ERRORS = {"400": "bad request", "401": "no key, or an unknown one",
           "403": "the key's role or policy does not allow it", "404": "not found",
           "405": "method not allowed", "408": "the request arrived too slowly",
           "413": "body too large",
           "422": "the upstream refused the request (an upstream error keeps its status)",
           "429": "a rate or budget limit",
           "431": "request headers too large",
           "502": "the upstream failed", "503": "unavailable", "504": "the upstream timed out"}


def _operation(summary: str, who: str, parameters: list[dict[str, Any]],
               body: dict[str, Any] | None, ok: dict[str, Any] | None,
               error_schema: str = "Error") -> dict[str, Any]:
    error = {"description": "", "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{error_schema}"}}}}
    responses: dict[str, Any] = {"200": {"description": "OK"}}
    if ok is not None:
        responses["200"]["content"] = {"application/json": {"schema": ok}}
    if body is not None and summary.startswith("create"):
        responses["201"] = {"description": "created", "content": {"application/json": {
            "schema": _ANY_OBJECT}}}
    for status, description in _ERRORS.items():
        responses[status] = {**error, "description": description}
    op: dict[str, Any] = {"summary": summary, "parameters": parameters, "responses": responses,
                          "x-euroute-role": who}
    if who == "none":
        op["security"] = []
    if body is not None:
        op["requestBody"] = {"required": True,
                             "content": {"application/json": {"schema": body}}}
    return op


# The auditors' dashboard (proxy/ui.py): pages for a browser, its refusals pages too. The
# session is a cookie set by POST /ui/login (form field `key`), not a bearer key.
_HTML = {"text/html": {"schema": _STR}}
_PAGES = [
    ("/ui", "get", "the dashboard for a signed-in auditor, else the sign-in page",
     [_query("from", "first day, YYYY-MM-DD"), _query("to", "last day, YYYY-MM-DD")],
     {"200": "a page", "400": "an invalid period"}),
    ("/ui/login", "post", "sign in with an auditor key: 303 to /ui with a session cookie", [],
     {"303": "signed in", "400": "not a key", "401": "an unknown or revoked key",
      "403": "not an auditor key, or a form from another site"}),
    ("/ui/logout", "post", "sign out: 303 to /ui without the session cookie", [],
     {"303": "signed out"}),
]


def _page(summary: str, parameters: list[dict[str, Any]],
          answers: dict[str, str]) -> dict[str, Any]:
    return {"summary": summary, "parameters": parameters, "security": [],
            "x-euroute-role": "none",
            "responses": {status: ({"description": what} if status == "303"
                                   else {"description": what, "content": _HTML})
                          for status, what in answers.items()}}


def document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for path, method, summary, who, parameters, body, ok in _TABLE:
        errors = "MessagesError" if path == "/v1/messages" else "Error"
        paths.setdefault(path, {})[method] = _operation(summary, who, parameters, body, ok,
                                                        errors)
    for path, method, summary, parameters, answers in _PAGES:
        paths.setdefault(path, {})[method] = _page(summary, parameters, answers)
    return {
        "openapi": "3.1.0",
        "info": {"title": "euroute", "version": "1",
                 "description": "EU-compliant LLM routing proxy. Every error has the shape of "
                                "components.schemas.Error (on /v1/messages, Anthropic's: "
                                "MessagesError). Roles: x-euroute-role per operation "
                                "(see SECURITY.md)."},
        "paths": paths,
        "components": {
            "schemas": {"Error": ERROR, "MessagesError": MESSAGES_ERROR},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


_BODY = orjson.dumps(document())


async def endpoint(request: Request) -> Response:
    return Response(_BODY, media_type="application/json")
