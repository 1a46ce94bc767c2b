"""GET /openapi.json is a valid OpenAPI 3 document that names every endpoint, and a property-based
fuzz over it: hostile parameters, headers and bodies against the running proxy never give a
5xx, and every error has the documented shape (issue 11, item 16)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate
from starlette.routing import Route

from proxy.app import FAST
from proxy.openapi import document
from tests.conftest import Proxy

SPEC = document()
OPERATIONS = [(path, method) for path, methods in SPEC["paths"].items() for method in methods]
KNOWN = ["magistral-small-2509", "mistral/magistral-small-2509", "mistral-embed", "user",
         "support-bot", "eu-standard", "app", "json", "csv", "model", "day"]
# Values that broke euroute before (issue 11), and their kin.
HOSTILE = ["", "\x00", "9999-12-31", "0001-01-01T00:00:00+14:00", "²", "-1", "0",
           "99999999999999999999999", "=HYPERLINK(\"x\")", "a" * 500, "zdr, eu", "1e309"]

text = st.one_of(st.sampled_from(HOSTILE), st.sampled_from(HOSTILE), st.sampled_from(KNOWN),
                 st.text(max_size=40))
json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=15)


def from_schema(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values near the schema (often valid, often not), mixed with any JSON at all."""
    if "const" in schema:
        near: st.SearchStrategy[Any] = st.just(schema["const"])
    elif "enum" in schema:
        near = st.sampled_from(schema["enum"])
    else:
        kind = schema.get("type")
        kind = kind[0] if isinstance(kind, list) else kind
        if kind == "object" and "properties" in schema:
            props = {k: from_schema(v) for k, v in schema["properties"].items()}
            required = set(schema.get("required", ()))
            near = st.fixed_dictionaries({k: v for k, v in props.items() if k in required},
                                         optional={k: v for k, v in props.items()
                                                   if k not in required})
        elif kind == "array":
            near = st.lists(from_schema(schema.get("items", {})), max_size=3)
        elif kind == "integer":
            near = st.integers(min_value=-(2**70), max_value=2**70)
        elif kind == "number":
            near = st.floats(allow_nan=False, allow_infinity=False)
        elif kind == "boolean":
            near = st.booleans()
        else:
            near = text
    return st.one_of(near, near, json_value)


def _header_safe(value: str) -> str:
    # What HTTP lets a client send at all: visible ASCII, no whitespace at either end.
    return "".join(c for c in value if " " <= c <= "~").strip(" ")


def request_for(path: str, method: str) -> st.SearchStrategy[dict[str, Any]]:
    op = SPEC["paths"][path][method]
    query, headers, path_params = {}, {}, {}
    for p in op["parameters"]:
        where = {"query": query, "header": headers, "path": path_params}[p["in"]]
        # A valid choice as often as not, so that the parameters after it are reached too.
        valid = st.sampled_from(p["schema"]["enum"]) if "enum" in p["schema"] else text
        where[p["name"]] = st.one_of(valid, valid, text, st.integers().map(str))
    body = (from_schema(op["requestBody"]["content"]["application/json"]["schema"])
            if "requestBody" in op else st.none())
    return st.fixed_dictionaries({
        "query": st.fixed_dictionaries({}, optional=query),
        "headers": st.fixed_dictionaries({}, optional=headers).map(
            lambda h: {k: _header_safe(v) for k, v in h.items()}),
        "path": st.fixed_dictionaries(path_params),
        "body": body,
        "raw": st.none() | st.binary(max_size=64),  # sometimes not JSON at all
        "as_role": st.sampled_from(["own"] * 5 + ["app", "auditor", "admin", "none"]),
    })


@pytest.fixture(scope="module")
def role_keys(proxy: Proxy, app_key: str) -> dict[str, str]:
    keys = {"app": app_key, "auditor": proxy.key("compliance", "eu-standard", "auditor"),
            "admin": proxy.key("platform", "eu-standard", "admin")}
    return {**keys, "any": app_key}


def test_openapi_json_is_valid_and_names_every_endpoint(proxy: Proxy) -> None:
    served = httpx.get(f"{proxy.origin}/openapi.json")
    assert served.status_code == 200 and served.headers["content-type"] == "application/json"
    spec = served.json()
    validate(spec)
    routes = {(m.lower(), r.path) for r in proxy.app.starlette.routes if isinstance(r, Route)
              for m in r.methods or () if m != "HEAD"}
    routes |= {(m.lower(), p) for m, p in FAST}
    documented = {(m, p) for p, ms in spec["paths"].items() for m in ms}
    assert routes == documented


@pytest.mark.parametrize(("path", "method"), OPERATIONS, ids=[f"{m} {p}" for p, m in OPERATIONS])
@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_no_5xx_and_every_error_in_the_documented_shape(
        proxy: Proxy, role_keys: dict[str, str], path: str, method: str, data: Any) -> None:
    op = SPEC["paths"][path][method]
    call = data.draw(request_for(path, method))
    role = op["x-euroute-role"] if call["as_role"] == "own" else call["as_role"]
    headers = dict(call["headers"])
    if role in role_keys:
        headers["authorization"] = f"Bearer {role_keys[role]}"
    url = proxy.origin + path.format(**{k: quote(v, safe="") for k, v in call["path"].items()})
    kwargs: dict[str, Any] = {"params": call["query"], "headers": headers, "timeout": 30}
    if method == "post":
        if call["raw"] is not None:
            kwargs["content"] = call["raw"]
        else:
            kwargs["json"] = call["body"]
    check(op, httpx.request(method.upper(), url, **kwargs))


def check(op: dict[str, Any], r: httpx.Response) -> None:
    assert r.status_code < 500, (r.request.url, r.status_code, r.text[:500])
    if r.status_code >= 400:
        assert str(r.status_code) in op["responses"], r.status_code
        if "text/html" in op["responses"][str(r.status_code)].get("content", {}):
            # The dashboard's pages refuse with a page (proxy/ui.py).
            assert r.headers["content-type"].startswith("text/html"), r.headers
        else:
            ref = op["responses"][str(r.status_code)]["content"]["application/json"]["schema"]
            jsonschema.validate(r.json(), SPEC["components"]["schemas"][ref["$ref"].rsplit("/", 1)[1]])


@pytest.mark.parametrize(("path", "method"), OPERATIONS, ids=[f"{m} {p}" for p, m in OPERATIONS])
def test_every_parameter_takes_every_hostile_value(proxy: Proxy, role_keys: dict[str, str],
                                                   path: str, method: str) -> None:
    """One parameter at a time, each value that broke euroute before, the rest left out: what
    random combinations reach only rarely."""
    op = SPEC["paths"][path][method]
    headers = {"authorization": f"Bearer {role_keys[op['x-euroute-role']]}"} if (
        op["x-euroute-role"] in role_keys) else {}
    body = {"model": "magistral-small-2509", "messages": [{"role": "user", "content": "hi"}]} \
        if path == "/v1/chat/completions" else None
    with httpx.Client(timeout=30) as client:
        for p in op["parameters"]:
            for value in HOSTILE:
                params, sent, ident = {}, dict(headers), "req_x"
                if p["in"] == "query":
                    params[p["name"]] = value
                elif p["in"] == "header":
                    sent[p["name"]] = _header_safe(value)
                else:
                    ident = value
                url = proxy.origin + path.replace("{id}", quote(ident, safe=""))
                check(op, client.request(method.upper(), url, params=params, headers=sent,
                                         json=body))
