"""Policies at work over HTTP: narrowing, dry run, reload, decision records."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.cli import main
from tests.conftest import Proxy, copy_policies, proxy_settings
from tests.fake_mistral import UPSTREAM_KEY, FakeMistral
from tests.fake_openai import FakeOpenAI

MODEL = "magistral-small-2509"
HELLO = [{"role": "user", "content": "hi"}]


@pytest.fixture
def own(db_url: str, upstream: FakeMistral, tmp_path: Path) -> Iterator[Proxy]:
    """A proxy with a policy directory of its own, free to rewrite."""
    policy_dir = copy_policies(tmp_path / "policies")
    (policy_dir / "eu-dryrun.policy.yaml").write_text(
        "name: eu-dryrun\nenforcement: dryrun\nrequire:\n  zero_data_retention: true\n")
    with Proxy(proxy_settings(db_url, policy_dir)) as server:
        yield server


def chat(proxy: Proxy, key: str, **extra: object) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}", **extra.pop("headers", {})}  # type: ignore[dict-item]
    return httpx.post(f"{proxy.url}/chat/completions", headers=headers, timeout=30,
                      json={"model": MODEL, "messages": HELLO, **extra})


def test_narrowing_header_can_deny_never_widen(proxy: Proxy, app_key: str,
                                               fake: FakeMistral) -> None:
    assert chat(proxy, app_key, headers={"x-euroute-require": "no-training, dpa"}).status_code == 200
    r = chat(proxy, app_key, headers={"x-euroute-require": "zdr"})
    assert r.status_code == 403
    assert {x["requirement"] for x in r.json()["error"]["reasons"]} >= {"zero_data_retention"}
    assert "narrowed by zdr" in r.json()["error"]["message"]
    row = proxy.row(r.headers["x-request-id"])
    assert json.loads(row["decision"])["input"]["narrowing"] == ["zdr"]
    # eu-strict cannot be widened by asking for less.
    strict = proxy.key("hr-assistant", "eu-strict")
    assert chat(proxy, strict, headers={"x-euroute-require": "eu"}).status_code == 403
    bad = chat(proxy, app_key, headers={"x-euroute-require": "zdr, cheap"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "x-euroute-require"
    assert len(fake.received) == 1


def test_request_needs_are_checked_per_request(proxy: Proxy, app_key: str,
                                               fake: FakeMistral) -> None:
    r = chat(proxy, app_key, max_tokens=9000)
    assert r.status_code == 403
    messages = [x["message"] for x in r.json()["error"]["reasons"]]
    assert "max_tokens 9000 exceeds the route's 8192" in messages
    # An embeddings-only route cannot serve a chat request.
    r = httpx.post(f"{proxy.url}/chat/completions", timeout=30,
                   headers={"authorization": f"Bearer {app_key}"},
                   json={"model": "mistral-embed", "messages": HELLO})
    assert r.status_code == 403
    assert r.json()["error"]["reasons"][0]["message"] == "route lacks chat"
    assert fake.received == []


def test_dryrun_records_the_would_be_denial_and_forwards(own: Proxy, fake: FakeMistral) -> None:
    key = own.key("shadow-app", "eu-dryrun")
    r = chat(own, key)
    assert r.status_code == 200 and len(fake.received) == 1
    row = own.row(r.headers["x-request-id"])
    decision = json.loads(row["decision"])
    assert row["enforcement"] == "dryrun" and decision["result"] == "dryrun_deny"
    # Mistral lacks a ZDR contract; the self-hosted template has no base URL.
    assert row["failed_requirements"] == "enabled,zero_data_retention"
    assert row["outcome"] == "ok" and row["route"] == "mistral-eu-magistral-small"


def test_reload_swaps_valid_files_and_refuses_invalid(own: Proxy, fake: FakeMistral) -> None:
    key = own.key("reloader", "eu-strict")
    before = chat(own, key)
    assert before.status_code == 403
    old_version = own.row(before.headers["x-request-id"])["policy_version"]

    contracts = own.settings.resolved_policy_dir() / "contracts.yaml"
    contracts.write_text(contracts.read_text().replace(
        "    # zdr: {reference: ZDR-MISTRAL-2026-0007",
        "    zdr: {reference: ZDR-MISTRAL-2026-0007"))
    after = _eventually(lambda: chat(own, key), 200)
    row = own.row(after.headers["x-request-id"])
    assert row["policy_version"] != old_version
    assert row["zdr_reference"] == "ZDR-MISTRAL-2026-0007"
    assert row["provider_retention_days"] == 0

    policy = own.settings.resolved_policy_dir() / "eu-strict.policy.yaml"
    policy.write_text(policy.read_text() + "surprise: true\n")
    ready = _eventually(lambda: httpx.get(f"{own.origin}/readyz"), 200,
                        until=lambda r: r.json()["policy_error"] is not None)
    assert "eu-strict.policy.yaml: surprise: Extra inputs are not permitted" in \
        ready.json()["policy_error"]
    still = chat(own, key)  # the old, valid set stays in force
    assert still.status_code == 200
    assert own.row(still.headers["x-request-id"])["policy_version"] == row["policy_version"]
    failed = [s for f in text_string_to_metric_families(httpx.get(f"{own.origin}/metrics").text)
              for s in f.samples if s.name == "euroute_policy_reloads_total"
              and s.labels["result"] == "failed"]
    assert failed and failed[0].value >= 1


def test_decision_is_retrievable_by_id(proxy: Proxy, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    r = chat(proxy, proxy.key("hr-assistant", "eu-strict"), headers={"x-euroute-user": "bob"})
    decision_id = r.json()["error"]["decision_id"]
    proxy.row(r.headers["x-request-id"])
    monkeypatch.setenv("EUROUTE_DATABASE_URL", proxy.settings.database_url)
    assert main(["audit", "decision", decision_id]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["decision"]["result"] == "deny"
    assert found["decision"]["input"]["model"] == MODEL
    assert found["policy"] == "eu-strict" and len(found["policy_version"]) == 64
    assert {x["requirement"] for x in found["decision"]["reasons"]} >= {"zero_data_retention"}
    assert "hi" not in json.dumps(found["decision"])  # no message content
    assert "bob" not in json.dumps(found) and "end_user_salt" not in found
    assert main(["audit", "decision", "dec_missing"]) == 1


def _eventually(call, status, until=lambda r: True, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        r = call()
        if r.status_code == status and until(r):
            return r
        if time.monotonic() > deadline:
            raise AssertionError(f"still {r.status_code}: {r.text}")
        time.sleep(0.1)


@pytest.fixture
def two_routes(db_url: str, upstream: FakeMistral, tmp_path: Path,
               monkeypatch: pytest.MonkeyPatch) -> Iterator[Proxy]:
    """The self-hosted template enabled (served by the same fake), beside Mistral's route."""
    monkeypatch.setenv("SELFHOSTED_BASE_URL", upstream.url)
    monkeypatch.setenv("SELFHOSTED_API_KEY", "sk-upstream-test")
    with Proxy(proxy_settings(db_url, copy_policies(tmp_path / "policies"))) as server:
        yield server


def test_fall_over_to_the_next_compliant_route_before_any_byte(two_routes: Proxy,
                                                              fake: FakeMistral) -> None:
    key = two_routes.key("fallover", "eu-standard")  # prefers the lowest price: self-hosted
    assert chat(two_routes, key).headers["x-euroute-route"] == "selfhosted-eu-magistral-small"
    fake.fail_next(503)
    r = chat(two_routes, key)
    assert r.status_code == 200 and r.headers["x-euroute-route"] == "mistral-eu-magistral-small"
    assert len(fake.received) == 3
    row = two_routes.row(r.headers["x-request-id"])
    assert row["route"] == "mistral-eu-magistral-small" and row["outcome"] == "ok"
    fake.fail_next(400)  # the caller's fault: no other route would do better
    assert chat(two_routes, key).status_code == 400
    assert len(fake.received) == 4


@pytest.fixture
def keyless_selfhosted(db_url: str, upstream: FakeMistral, tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Proxy, FakeOpenAI]]:
    """The self-hosted route enabled but SELFHOSTED_API_KEY unset, in front of a server that
    answers anyone: only euroute can keep requests away from it."""
    with FakeOpenAI(api_key=None) as selfhosted:
        monkeypatch.setenv("SELFHOSTED_BASE_URL", selfhosted.url)
        monkeypatch.delenv("SELFHOSTED_API_KEY", raising=False)
        with Proxy(proxy_settings(db_url, copy_policies(tmp_path / "policies"))) as server:
            yield server, selfhosted


LEFT_OUT = {"route": "selfhosted-eu-magistral-small", "requirement": "credentials",
            "message": "SELFHOSTED_API_KEY is not set"}


def test_a_route_without_its_credential_is_never_tried(
        keyless_selfhosted: tuple[Proxy, FakeOpenAI], fake: FakeMistral) -> None:
    proxy, selfhosted = keyless_selfhosted
    r = chat(proxy, proxy.key("fallover", "eu-standard"))  # prefers self-hosted: cheapest
    assert r.status_code == 200 and r.headers["x-euroute-route"] == "mistral-eu-magistral-small"
    assert selfhosted.received == []
    assert [x.headers["authorization"] for x in fake.received] == [f"Bearer {UPSTREAM_KEY}"]
    decision = json.loads(proxy.row(r.headers["x-request-id"])["decision"])
    assert LEFT_OUT in decision["reasons"]
    assert decision["candidates"] == ["mistral-eu-magistral-small"]
    assert decision["tried"] == [{"route": "mistral-eu-magistral-small", "outcome": "ok"}]


def test_no_route_with_its_credential_left_is_a_clear_503(
        keyless_selfhosted: tuple[Proxy, FakeOpenAI], fake: FakeMistral) -> None:
    proxy, selfhosted = keyless_selfhosted
    client = openai.OpenAI(base_url=proxy.url, api_key=proxy.key("hr-assistant", "eu-strict"),
                           max_retries=0)
    with pytest.raises(openai.APIStatusError) as refused:  # eu-strict: self-hosted only
        client.chat.completions.create(model=MODEL, messages=HELLO)  # type: ignore[arg-type]
    assert refused.value.status_code == 503
    error = refused.value.response.json()["error"]
    assert (error["type"], error["code"]) == ("service_unavailable", "route_credentials_missing")
    assert "selfhosted-eu-magistral-small" in error["message"]
    assert "SELFHOSTED_API_KEY" in error["message"]
    assert selfhosted.received == [] and fake.received == []
    row = proxy.row(refused.value.response.headers["x-request-id"])
    assert (row["outcome"], row["status"], row["route"]) == ("unavailable", 503, None)
    decision = json.loads(row["decision"])
    assert LEFT_OUT in decision["reasons"] and decision["candidates"] == []
    # Nor is the model listed for this key, while a key whose policy has a credentialed route
    # still sees it.
    assert MODEL not in [m.id for m in client.models.list()]
    standard = openai.OpenAI(base_url=proxy.url, api_key=proxy.key("fallover", "eu-standard"))
    assert MODEL in [m.id for m in standard.models.list()]


def test_strict_policy_admits_the_self_hosted_route(two_routes: Proxy, fake: FakeMistral) -> None:
    r = chat(two_routes, two_routes.key("hr-assistant", "eu-strict"))
    assert r.status_code == 200 and r.headers["x-euroute-route"] == "selfhosted-eu-magistral-small"
    row = two_routes.row(r.headers["x-request-id"])
    assert row["provider_retention_days"] == 0 and row["inference_location"] == "DE"
