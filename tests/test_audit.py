"""The compliance queries over real traffic, by HTTP and by `euroute audit ...`: exact numbers,
and who may read what. Each test reads only its own apps, so the shared proxy's other traffic
does not count."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx
import openai
import orjson
import pytest
from sqlalchemy import select
from sqlalchemy.pool import NullPool

from proxy.cli import main
from proxy.ledger.chain import pseudonym
from proxy.ledger.db import make_engine
from proxy.ledger.queries import EXPORT_COLUMNS
from proxy.ledger.tables import api_keys, ledger
from tests.conftest import PSEUDONYM_KEY, Proxy, run
from tests.made_rows import ROUTE, made_row, write

MODEL = "magistral-small-2509"
HELLO = [{"role": "user", "content": "hello"}]
DPA = "DPA-MISTRAL-2025-0042 (example)"
NINE = Decimal("0.000000001")


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def cost(prompt: int, completion: int) -> Decimal:
    """The seed route's prices: USD 0.50 / 1.50 per 1M input / output tokens."""
    return ((prompt * Decimal("0.50") + completion * Decimal("1.50")) / 1_000_000).quantize(NINE)


def chat(proxy: Proxy, key: str, headers: dict[str, str] | None = None,
         **extra: Any) -> httpx.Response:
    return httpx.post(f"{proxy.url}/chat/completions", timeout=30,
                      headers={"authorization": f"Bearer {key}", **(headers or {})},
                      json={"model": MODEL, "messages": HELLO, **extra})


@dataclass
class Traffic:
    """One app's requests: three answered (JSON, SDK with `user`, stream), two denied."""

    app: str
    user: str
    allowed: list[tuple[str, int, int]] = field(default_factory=list)  # request id, tokens
    denied: list[dict[str, Any]] = field(default_factory=list)  # request id + the 403 error
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def tokens(self) -> tuple[int, int]:
        return sum(p for _, p, _ in self.allowed), sum(c for _, _, c in self.allowed)

    @property
    def day(self) -> str:
        return min(r["created_at"] for r in self.rows.values()).date().isoformat()

    @property
    def failed(self) -> set[str]:
        return {r["requirement"] for d in self.denied for r in d["reasons"]}


def _streamed(proxy: Proxy, key: str) -> tuple[str, int, int]:
    usage: dict[str, int] = {}
    with httpx.stream("POST", f"{proxy.url}/chat/completions", timeout=30,
                      headers={"authorization": f"Bearer {key}"},
                      json={"model": MODEL, "messages": HELLO, "stream": True,
                            "stream_options": {"include_usage": True}}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                usage = orjson.loads(line[6:]).get("usage") or usage
    return r.headers["x-request-id"], usage["prompt_tokens"], usage["completion_tokens"]


@pytest.fixture(scope="module")
def traffic(proxy: Proxy) -> Traffic:
    sent = Traffic(app=unique("audit-app"), user=unique("alice"))
    standard = proxy.key(sent.app, "eu-standard")
    strict = proxy.key(sent.app, "eu-strict")
    r = chat(proxy, standard, {"x-euroute-user": sent.user},
             messages=[{"role": "user", "content": "how many tokens is this one?"}])
    assert r.status_code == 200
    usage = r.json()["usage"]
    sent.allowed.append((r.headers["x-request-id"], usage["prompt_tokens"],
                         usage["completion_tokens"]))
    with openai.OpenAI(base_url=proxy.url, api_key=standard) as client:
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=HELLO, user=sent.user)  # type: ignore[arg-type]
        completion = raw.parse()
        assert completion.usage is not None
        sent.allowed.append((raw.headers["x-request-id"], completion.usage.prompt_tokens,
                             completion.usage.completion_tokens))
    sent.allowed.append(_streamed(proxy, standard))
    for _ in range(2):
        r = chat(proxy, strict)
        assert r.status_code == 403
        sent.denied.append({"request_id": r.headers["x-request-id"], **r.json()["error"]})
    for request_id in [a[0] for a in sent.allowed] + [d["request_id"] for d in sent.denied]:
        sent.rows[request_id] = proxy.row(request_id)
    return sent


@pytest.fixture(scope="module")
def auditor(proxy: Proxy) -> str:
    return proxy.key("compliance", "eu-standard", "auditor")


@pytest.fixture(scope="module")
def admin(proxy: Proxy) -> str:
    return proxy.key("platform", "eu-standard", "admin")


async def _secrets(url: str) -> set[str]:
    engine = make_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            hashes = (await conn.execute(select(api_keys.c.key_hash))).scalars().all()
            salts = (await conn.execute(select(ledger.c.end_user_salt).where(
                ledger.c.end_user_salt.is_not(None)))).scalars().all()
    finally:
        await engine.dispose()
    return {"key_hash", "end_user_salt", PSEUDONYM_KEY, *hashes, *salts}


class Api:
    """HTTP calls to the proxy; every answer is checked for key hashes, salts and the
    pseudonym key."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def get(self, path: str, key: str | None, **params: Any) -> httpx.Response:
        return self._checked(httpx.get(f"{self.proxy.origin}{path}", params=params,
                                       headers=self._auth(key), timeout=30))

    def post(self, path: str, key: str | None, body: Any = None) -> httpx.Response:
        return self._checked(httpx.post(f"{self.proxy.origin}{path}", json=body,
                                        headers=self._auth(key), timeout=30))

    @staticmethod
    def _auth(key: str | None) -> dict[str, str]:
        return {"authorization": f"Bearer {key}"} if key else {}

    def _checked(self, r: httpx.Response) -> httpx.Response:
        leaked = {s for s in run(_secrets(self.proxy.settings.database_url)) if s in r.text}
        assert not leaked, f"{r.request.url} leaked {leaked}"
        return r


@pytest.fixture(scope="module")
def api(proxy: Proxy) -> Api:
    return Api(proxy)


@pytest.fixture
def cli(proxy: Proxy, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
        ) -> Iterator[Any]:
    monkeypatch.setenv("EUROUTE_DATABASE_URL", proxy.settings.database_url)
    monkeypatch.setenv("EUROUTE_POLICY_DIR", str(proxy.settings.policy_dir))

    def call(*argv: str) -> tuple[int, str]:
        code = main(list(argv))
        return code, capsys.readouterr().out
    yield call


def data(r: httpx.Response) -> Any:
    assert r.status_code == 200, r.text
    return r.json()["data"]


def from_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


# -- usage ------------------------------------------------------------------------------------

def _usage(group: str, forwarded: Any, denied: Any, t: Traffic) -> list[dict[str, Any]]:
    pt, ct = t.tokens
    priced = {"prompt_tokens": pt, "completion_tokens": ct, "cost": str(cost(pt, ct)),
              "currency": "USD"}
    total = {group: "TOTAL", "requests": 5, "denied": 2, "failed": 0, **priced}
    if forwarded == denied:
        return [{**total, group: forwarded}, total]
    return [{group: denied, "requests": 2, "denied": 2, "failed": 0, "prompt_tokens": 0,
             "completion_tokens": 0, "cost": "0.000000000", "currency": None},
            {group: forwarded, "requests": 3, "denied": 0, "failed": 0, **priced}, total]


def test_usage_by_each_grouping_with_exact_cost(traffic: Traffic, api: Api, auditor: str) -> None:
    t = traffic
    pt, ct = t.tokens
    assert sum(r["cost_nanos"] for r in t.rows.values()) == pt * 500 + ct * 1500
    expected = {"app": (t.app, t.app), "route": (ROUTE, None), "model": (MODEL, MODEL),
                "day": (t.day, t.day), "month": (t.day[:7], t.day[:7])}
    for group, (forwarded, denied) in expected.items():
        got = data(api.get("/v1/audit/usage", auditor, app=t.app, group_by=group))
        assert got == _usage(group, forwarded, denied, t), group
    by_policy = data(api.get("/v1/audit/usage", auditor, app=t.app, group_by="policy"))
    assert [(r["policy"], r["requests"], r["denied"], r["currency"]) for r in by_policy] == [
        ("eu-standard", 3, 0, "USD"), ("eu-strict", 2, 2, None), ("TOTAL", 5, 2, "USD")]
    ok_only = data(api.get("/v1/audit/usage", auditor, app=t.app, outcome="ok"))
    assert ok_only[0] == _usage("app", t.app, None, t)[1]
    tomorrow = (dt.date.fromisoformat(t.day) + dt.timedelta(days=1)).isoformat()
    assert data(api.get("/v1/audit/usage", auditor, app=t.app, **{"from": tomorrow})) == []
    assert data(api.get("/v1/audit/usage", auditor, app=t.app, to=t.day))[-1]["requests"] == 5
    r = api.get("/v1/audit/usage", auditor, app=t.app, group_by="route", format="csv")
    assert r.headers["content-type"].startswith("text/csv")
    rows = from_csv(r.text)
    assert rows[1] == {"route": ROUTE, "requests": "3", "denied": "0", "failed": "0",
                       "prompt_tokens": str(pt), "completion_tokens": str(ct),
                       "cost": str(cost(pt, ct)), "currency": "USD"}


def test_usage_one_row_per_group_failed_apart_one_total_per_currency(
        proxy: Proxy, api: Api, auditor: str) -> None:
    """Denied and failed requests are columns of their group's row, not rows of their own; a
    second currency gets its own row and TOTAL; every request is counted once per part."""
    app, other = unique("ledgered"), unique("ledgered")
    run(write(proxy.settings.database_url, [
        made_row(app),
        made_row(app, outcome="upstream_error", status=502, prompt_tokens=0,
                 completion_tokens=0, cost_nanos=0),
        made_row(app, outcome="denied", status=403, route=None, provider=None, currency=None,
                 prompt_tokens=0, completion_tokens=0, cost_nanos=0),
        made_row(app, outcome="invalid_request", status=400, route=None, provider=None,
                 currency=None, prompt_tokens=0, completion_tokens=0, cost_nanos=0),
        made_row(app, currency="EUR", cost_nanos=7),
        made_row(other, outcome="denied", status=403, route=None, provider=None, currency=None,
                 prompt_tokens=0, completion_tokens=0, cost_nanos=0),
    ]))
    got = [(r["app"], r["requests"], r["denied"], r["failed"], r["prompt_tokens"], r["cost"],
            r["currency"]) for r in data(api.get("/v1/audit/usage", auditor,
                                                 **{"from": "2000-01-01"}))
           if r["app"] in (app, other, "TOTAL")]
    # The currency-less requests (denied, invalid) join the group's first priced row.
    assert sorted(g for g in got if g[0] != "TOTAL") == sorted([
        (app, 3, 1, 1, 10, "0.000000007", "EUR"),
        (app, 2, 0, 1, 10, "0.000035000", "USD"),
        (other, 1, 1, 0, 0, "0.000000000", None)])
    totals = [g for g in got if g[0] == "TOTAL"]
    assert [t[-1] for t in totals] == sorted({t[-1] for t in totals})  # one per currency
    mine = data(api.get("/v1/audit/usage", auditor, app=app))
    assert [(r["app"], r["requests"], r["failed"], r["currency"]) for r in mine] == [
        (app, 3, 1, "EUR"), (app, 2, 1, "USD"), ("TOTAL", 3, 1, "EUR"), ("TOTAL", 2, 1, "USD")]
    theirs = data(api.get("/v1/audit/usage", auditor, app=other))
    assert [(r["app"], r["requests"], r["denied"], r["currency"]) for r in theirs] == [
        (other, 1, 1, None), ("TOTAL", 1, 1, None)]


def test_usage_cli_matches_the_api(traffic: Traffic, api: Api, auditor: str, cli: Any) -> None:
    for group in ("app", "route", "day"):
        code, out = cli("audit", "usage", "--app", traffic.app, "--group-by", group,
                        "--format", "json")
        assert code == 0
        assert json.loads(out) == data(api.get("/v1/audit/usage", auditor, app=traffic.app,
                                                group_by=group))
    code, out = cli("audit", "usage", "--app", traffic.app, "--to", traffic.day)
    assert code == 0 and "TOTAL" in out and str(cost(*traffic.tokens)) in out
    assert out.count("TOTAL") == 1 and out.count(traffic.app) == 1


# -- decisions --------------------------------------------------------------------------------

def test_denials_by_policy_and_by_requirement(traffic: Traffic, api: Api, auditor: str,
                                              cli: Any) -> None:
    t = traffic
    assert t.failed >= {"zero_data_retention"}
    assert data(api.get("/v1/audit/decisions", auditor, app=t.app)) == [
        {"policy": "eu-standard", "requests": 3, "denied": 0, "dryrun_denied": 0},
        {"policy": "eu-strict", "requests": 2, "denied": 2, "dryrun_denied": 0},
        {"policy": "TOTAL", "requests": 5, "denied": 2, "dryrun_denied": 0},
    ]
    assert data(api.get("/v1/audit/decisions", auditor, app=t.app, group_by="requirement")) == [
        {"policy": "eu-strict", "requirement": name, "denied": 2, "dryrun_denied": 0}
        for name in sorted(t.failed - {"enabled"})]
    assert data(api.get("/v1/audit/decisions", auditor, app=t.app, outcome="denied",
                        group_by="day")) == [
        {"day": t.day, "requests": 2, "denied": 2, "dryrun_denied": 0},
        {"day": "TOTAL", "requests": 2, "denied": 2, "dryrun_denied": 0}]
    code, out = cli("audit", "decisions", "--app", t.app, "--group-by", "requirement",
                    "--format", "csv")
    assert code == 0 and from_csv(out) == [
        {"policy": "eu-strict", "requirement": name, "denied": "2", "dryrun_denied": "0"}
        for name in sorted(t.failed - {"enabled"})]


def test_dryrun_would_be_denials_are_counted_apart(proxy: Proxy, api: Api, auditor: str) -> None:
    app = unique("shadow")
    run(write(proxy.settings.database_url, [
        made_row(app, policy="eu-dryrun", enforcement="dryrun",
                 failed_requirements="enabled,zero_data_retention"),
        made_row(app, policy="eu-dryrun", enforcement="dryrun", outcome="denied", status=403,
                 failed_requirements="capabilities", route=None, provider=None),
        made_row(app, policy="eu-dryrun", enforcement="dryrun"),
    ]))
    assert data(api.get("/v1/audit/decisions", auditor, app=app)) == [
        {"policy": "eu-dryrun", "requests": 3, "denied": 1, "dryrun_denied": 1},
        {"policy": "TOTAL", "requests": 3, "denied": 1, "dryrun_denied": 1}]
    # A route left unconfigured (`enabled`) is no requirement the request failed.
    assert data(api.get("/v1/audit/decisions", auditor, app=app, group_by="requirement")) == [
        {"policy": "eu-dryrun", "requirement": "capabilities", "denied": 1, "dryrun_denied": 0},
        {"policy": "eu-dryrun", "requirement": "zero_data_retention", "denied": 0,
         "dryrun_denied": 1}]


def test_one_decision_and_one_request_by_id(traffic: Traffic, api: Api, auditor: str,
                                            cli: Any) -> None:
    denial = traffic.denied[0]
    found = api.get(f"/v1/audit/decisions/{denial['decision_id']}", auditor).json()
    assert found["request_id"] == denial["request_id"] and found["outcome"] == "denied"
    assert found["decision"]["result"] == "deny"
    assert found["decision"]["reasons"] == denial["reasons"]
    assert found["failed_requirements"] == ",".join(sorted(traffic.failed))
    request_id, pt, ct = traffic.allowed[0]
    found = api.get(f"/v1/audit/requests/{request_id}", auditor).json()
    assert (found["outcome"], found["route"], found["cost"]) == ("ok", ROUTE, str(cost(pt, ct)))
    assert found["end_user"] == pseudonym(PSEUDONYM_KEY.encode(), traffic.user)
    assert "end_user_salt" not in found
    # Each path looks up its own kind of id only.
    missing = api.get(f"/v1/audit/decisions/{request_id}", auditor)
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "invalid_request_error"
    assert api.get("/v1/audit/requests/req_none", auditor).status_code == 404
    code, out = cli("audit", "decision", denial["decision_id"])
    assert code == 0 and json.loads(out)["decision"]["reasons"] == denial["reasons"]


# -- what reached providers -------------------------------------------------------------------

def test_no_transfer_outside_the_eea_and_the_proof_says_how_many_were_checked(
        traffic: Traffic, api: Api, auditor: str, cli: Any) -> None:
    found = api.get("/v1/audit/transfers", auditor, app=traffic.app).json()
    assert found == {"object": "list", "checked": 3, "outside_eea": 0, "truncated": False,
                     "data": []}
    r = api.get("/v1/audit/transfers", auditor, app=traffic.app, format="csv")
    assert r.text.startswith("request_id,created_at,app,") and r.text.count("\n") == 1
    code, out = cli("audit", "transfers", "--app", traffic.app)
    assert code == 0 and out.startswith("3 forwarded requests checked, 0 processed or stored")


def test_transfers_list_every_request_that_left_the_eea(proxy: Proxy, api: Api,
                                                        auditor: str, cli: Any) -> None:
    app = unique("lax")
    rows = [made_row(app, inference_location="US", storage_location="US", policy="lax",
                     transfer_mechanism="dpf"),
            made_row(app, storage_location="NO"),  # Norway is in the EEA
            made_row(app, transfer_mechanism="scc", policy="lax"),
            made_row(app, storage_location=None, policy="lax"),  # unknown counts as outside
            made_row(app, route=None, provider=None, outcome="denied", inference_location="US")]
    run(write(proxy.settings.database_url, rows))
    found = api.get("/v1/audit/transfers", auditor, app=app).json()
    assert (found["checked"], found["outside_eea"], found["truncated"]) == (4, 3, False)
    assert [r["request_id"] for r in found["data"]] == [rows[i].request_id for i in (0, 2, 3)]
    assert found["data"][0]["policy"] == "lax"
    assert found["data"][0]["decision_id"] == rows[0].decision_id
    assert found["data"][0]["inference_location"] == "US"
    short = api.get("/v1/audit/transfers", auditor, app=app, limit=2).json()
    assert short["truncated"] is True and len(short["data"]) == 2
    code, out = cli("audit", "transfers", "--app", app, "--format", "json")
    assert code == 0 and json.loads(out)["outside_eea"] == 3


def test_provider_copies_that_may_still_exist(traffic: Traffic, proxy: Proxy, api: Api,
                                              auditor: str, cli: Any) -> None:
    forwarded = [traffic.rows[a[0]] for a in traffic.allowed]
    gone = max(r["provider_copy_gone_on"] for r in forwarded)
    today = dt.date.fromisoformat(traffic.day)
    assert gone == today + dt.timedelta(days=30)
    expected = [{"provider": "mistral", "route": ROUTE, "requests": 3,
                 "oldest": min(r["created_at"] for r in forwarded).isoformat(),
                 "newest": max(r["created_at"] for r in forwarded).isoformat(),
                 "unknown_retention": 0, "all_gone_on": gone.isoformat()}]
    for as_of in (today, gone - dt.timedelta(days=1)):
        r = api.get("/v1/audit/retention", auditor, app=traffic.app, as_of=as_of.isoformat())
        assert data(r) == expected and r.json()["as_of"] == as_of.isoformat()
    for as_of in (gone, today - dt.timedelta(days=1)):  # all gone; not yet sent
        assert data(api.get("/v1/audit/retention", auditor, app=traffic.app,
                            as_of=as_of.isoformat())) == []
    app = unique("unknown-retention")
    run(write(proxy.settings.database_url, [
        made_row(app), made_row(app, provider_retention_days=None, provider_copy_gone_on=None)]))
    [row] = data(api.get("/v1/audit/retention", auditor, app=app))
    assert (row["requests"], row["unknown_retention"], row["all_gone_on"]) == (2, 1, None)
    code, out = cli("audit", "retention", "--app", traffic.app, "--as-of", today.isoformat())
    assert code == 0 and f"may still exist on {today}" in out and gone.isoformat() in out


def test_contracts_each_request_relied_on(traffic: Traffic, proxy: Proxy, api: Api,
                                          auditor: str, cli: Any) -> None:
    forwarded = [traffic.rows[a[0]] for a in traffic.allowed]
    assert data(api.get("/v1/audit/contracts", auditor, app=traffic.app)) == [
        {"provider": "mistral", "route": ROUTE, "zdr_reference": None, "dpa_reference": DPA,
         "requests": 3, "first": min(r["created_at"] for r in forwarded).isoformat(),
         "last": max(r["created_at"] for r in forwarded).isoformat()}]
    app = unique("zdr")
    run(write(proxy.settings.database_url, [
        made_row(app, zdr_reference="ZDR-MISTRAL-2026-0007"),
        made_row(app, zdr_reference="ZDR-MISTRAL-2026-0007"), made_row(app)]))
    got = data(api.get("/v1/audit/contracts", auditor, app=app))
    assert [(r["zdr_reference"], r["dpa_reference"], r["requests"]) for r in got] == [
        (None, DPA, 1), ("ZDR-MISTRAL-2026-0007", DPA, 2)]
    code, out = cli("audit", "contracts", "--app", app, "--format", "csv")
    assert code == 0 and [r["requests"] for r in from_csv(out)] == ["1", "2"]


def test_records_of_processing(traffic: Traffic, api: Api, auditor: str, cli: Any) -> None:
    document = api.get("/v1/audit/records", auditor, app=traffic.app).json()
    entries = {e["route"]: e for e in document["records"]}
    assert set(entries) == {ROUTE, "mistral-eu-embed", "selfhosted-eu-magistral-small"}
    entry = entries[ROUTE]
    assert {k: entry[k] for k in (
        "processor", "sub_processing", "provider_logging_purpose", "inference_location",
        "inference_region", "storage_location", "transfer_mechanism", "zero_data_retention",
        "zdr_reference", "provider_retention_days", "dpa_reference", "requests",
        "content_stored_by_euroute")} == {
        "processor": "mistral", "sub_processing": "subprocessors",
        "provider_logging_purpose": "abuse_monitoring", "inference_location": "FR",
        "inference_region": "EU", "storage_location": "FR", "transfer_mechanism": "none_needed",
        "zero_data_retention": "on_contract", "zdr_reference": None,
        "provider_retention_days": 30, "dpa_reference": DPA, "requests": 3,
        "content_stored_by_euroute": False}
    assert entry["policies"] == [
        {"policy": "eu-standard", "requests": 3, "records_retention_days": 400}]
    assert any("pseudonymous end-user ids" in c for c in entry["data_categories"])
    assert any(c.startswith("prompts and completions") for c in entry["data_categories"])
    selfhosted = entries["selfhosted-eu-magistral-small"]
    assert (selfhosted["provider_retention_days"], selfhosted["sub_processing"],
            selfhosted["requests"]) == (0, "none", 0)
    assert {p["policy"] for p in selfhosted["policies"]} == {"eu-standard", "eu-strict"}
    rows = from_csv(api.get("/v1/audit/records", auditor, app=traffic.app, format="csv").text)
    assert rows[0]["route"] == ROUTE
    assert rows[0]["policies"] == "eu-standard (records kept 400 days, 3 requests)"
    r = api.get("/v1/audit/records", auditor, format="markdown", route=ROUTE)
    assert r.headers["content-type"].startswith("text/markdown")
    assert r.text.startswith("# Records of processing (GDPR Art. 30)")
    assert f"## Route `{ROUTE}`" in r.text and "## Route `mistral-eu-embed`" not in r.text
    assert "| Processor (provider) | mistral |" in r.text
    assert "| Inference location | FR (EU) |" in r.text
    code, out = cli("audit", "records", "--app", traffic.app)
    assert code == 0 and f"| DPA reference | {DPA} |" in out


# -- raw rows, integrity ----------------------------------------------------------------------

def test_export_streams_raw_rows_without_salts(traffic: Traffic, api: Api, auditor: str,
                                               cli: Any) -> None:
    r = api.get("/v1/audit/export", auditor, app=traffic.app)
    rows = from_csv(r.text)
    assert list(rows[0]) == list(EXPORT_COLUMNS) and "end_user_salt" not in rows[0]
    assert sorted(x["request_id"] for x in rows) == sorted(traffic.rows)
    lines = api.get("/v1/audit/export", auditor, app=traffic.app, format="json").text.splitlines()
    objects = [json.loads(line) for line in lines]
    assert [o["request_id"] for o in objects] == [x["request_id"] for x in rows]
    assert sum(o["cost_nanos"] for o in objects) == sum(
        x["cost_nanos"] for x in traffic.rows.values())
    subject = pseudonym(PSEUDONYM_KEY.encode(), traffic.user)
    assert sum(o["end_user"] == subject for o in objects) == 2
    code, out = cli("audit", "export", "--app", traffic.app, "--outcome", "denied")
    assert code == 0 and len(from_csv(out)) == 2


def test_verify_over_http_and_cli(traffic: Traffic, api: Api, auditor: str, cli: Any) -> None:
    r = api.get("/v1/audit/verify", auditor)
    assert r.status_code == 200 and r.json()["ok"] is True and r.json()["rows"] >= 5
    code, out = cli("audit", "verify")
    assert code == 0 and out.startswith("OK: ")


def test_bad_parameters_are_openai_shaped_400s(api: Api, auditor: str) -> None:
    for path, params, param in [
        ("/v1/audit/usage", {"group_by": "weekday"}, "group_by"),
        ("/v1/audit/usage", {"from": "last tuesday"}, "from"),
        ("/v1/audit/decisions", {"to": "2026-13-01"}, "to"),
        ("/v1/audit/usage", {"format": "xml"}, "format"),
        ("/v1/audit/usage", {"start": "2026-01-01"}, "start"),
        ("/v1/audit/retention", {"as_of": "soon"}, "as_of"),
        ("/v1/audit/transfers", {"limit": "-1"}, "limit"),
        ("/v1/audit/records", {"format": "pdf"}, "format"),
    ]:
        r = api.get(path, auditor, **params)
        assert r.status_code == 400, (path, params)
        error = r.json()["error"]
        assert (error["type"], error["param"]) == ("invalid_request_error", param)


# -- who may read what ------------------------------------------------------------------------

AUDIT_PATHS = ["/v1/audit/usage", "/v1/audit/decisions", "/v1/audit/decisions/dec_x",
               "/v1/audit/requests/req_x", "/v1/audit/transfers", "/v1/audit/retention",
               "/v1/audit/contracts", "/v1/audit/records", "/v1/audit/export",
               "/v1/audit/verify"]


def _refused(r: httpx.Response, status: int) -> None:
    assert r.status_code == status, (r.request.url, r.text)
    error = r.json()["error"]
    assert error["type"] == ("permission_error" if status == 403 else "authentication_error")


def test_an_app_key_reads_only_its_own_usage(traffic: Traffic, proxy: Proxy, api: Api) -> None:
    own = proxy.key(traffic.app, "eu-standard")
    other_app = unique("other-app")
    other = proxy.key(other_app, "eu-standard")
    assert chat(proxy, other).status_code == 200
    for path in AUDIT_PATHS:
        _refused(api.get(path, own), 403)
    _refused(api.get("/v1/admin/keys", own), 403)
    _refused(api.post("/v1/admin/keys", own, {"app": traffic.app, "role": "auditor"}), 403)
    _refused(api.post("/v1/admin/keys/key_x/revoke", own), 403)
    _refused(api.get("/v1/usage", own, app="other-app"), 403)
    mine = data(api.get("/v1/usage", own, group_by="policy"))
    assert [(r["policy"], r["requests"]) for r in mine] == [
        ("eu-standard", 3), ("eu-strict", 2), ("TOTAL", 5)]
    assert data(api.get("/v1/usage", own, app=traffic.app)) == data(api.get("/v1/usage", own))
    assert {r["app"] for r in data(api.get("/v1/usage", other))} == {other_app, "TOTAL"}
    _refused(api.get("/v1/usage", other, app=traffic.app), 403)


def test_auditor_reads_everything_and_manages_nothing(traffic: Traffic, api: Api,
                                                      auditor: str) -> None:
    assert data(api.get("/v1/usage", auditor, app=traffic.app))[-1]["requests"] == 5
    for path in AUDIT_PATHS:
        if not path.endswith("_x"):
            assert api.get(path, auditor).status_code == 200, path
    _refused(api.get("/v1/admin/keys", auditor), 403)
    _refused(api.post("/v1/admin/keys", auditor, {"app": "x", "role": "admin"}), 403)


def test_no_key_or_an_unknown_key_is_401(api: Api) -> None:
    for path in [*AUDIT_PATHS, "/v1/usage", "/v1/admin/keys"]:
        _refused(api.get(path, None), 401)
        _refused(api.get(path, "eur_not-a-key"), 401)


def test_admin_manages_keys_and_reads_no_ledger(proxy: Proxy, api: Api, admin: str) -> None:
    for path in AUDIT_PATHS:
        _refused(api.get(path, admin), 403)
    app = unique("new-app")
    r = api.post("/v1/admin/keys", admin, {"app": app, "policy": "eu-standard"})
    assert r.status_code == 201, r.text
    created = r.json()
    assert (created["app"], created["role"], created["policy"]) == (app, "app", "eu-standard")
    new_key = created["key"]
    answered = chat(proxy, new_key)
    assert answered.status_code == 200
    proxy.row(answered.headers["x-request-id"])
    assert data(api.get("/v1/usage", new_key))[0]["app"] == app
    listed = {k["id"]: k for k in data(api.get("/v1/admin/keys", admin))}
    assert listed[created["id"]]["revoked_at"] is None
    assert new_key not in json.dumps(listed, default=str)
    # An app in apps.yaml gets its policy from there.
    r = api.post("/v1/admin/keys", admin, {"app": "hr-assistant"})
    assert (r.status_code, r.json()["policy"], r.json()["role"]) == (201, "eu-strict", "app")
    for body, param in [({"app": app}, "policy"), ({"app": app, "policy": "nope"}, "policy"),
                        ({"app": "", "policy": "eu-standard"}, "app"),
                        ({"app": app, "policy": "eu-standard", "role": "root"}, "role"),
                        ({"app": app, "policy": "eu-standard", "expires": "never"}, "expires")]:
        r = api.post("/v1/admin/keys", admin, body)
        assert (r.status_code, r.json()["error"]["param"]) == (400, param), body
    assert api.post(f"/v1/admin/keys/{created['id']}/revoke", admin).json()["revoked"] is True
    _refused(chat(proxy, new_key), 401)
    assert api.post(f"/v1/admin/keys/{created['id']}/revoke", admin).status_code == 404
