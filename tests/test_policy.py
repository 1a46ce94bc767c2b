"""Policy decisions, one requirement kind at a time, from the seed route's real posture."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.cli import main
from proxy.policy.decide import Rules, decide, parse_narrowing, request_checks, with_narrowing
from proxy.policy.load import PolicyError, PolicySet, read
from proxy.policy.schema import Contract, Contracts, Policy, ProviderContracts, Require, Route
from tests.conftest import REPO

TODAY = dt.date(2026, 11, 29)
ENV = {"MISTRAL_BASE_URL": "http://127.0.0.1:9/v1"}


def seed() -> Route:
    return next(r for r in read(REPO / "policies", today=TODAY, env=ENV).catalog.routes
                if r.id == "mistral-eu-magistral-small")


def checks(route: Route, contracts: Contracts | None = None, **require: Any) -> dict[str, bool]:
    rules = Rules.of(Require(**require))
    policy = Policy(name="p", require=Require(**require))
    decision = decide(policy, rules, "m", [route], {route.id}, contracts or signed(), TODAY)
    return {c.requirement: c.ok for c in decision.verdicts[0].checks}


def signed(zdr: Contract | None = None, dpa: Contract | None = None) -> Contracts:
    return Contracts(providers={"mistral": ProviderContracts(
        dpa=dpa or Contract(reference="DPA-1", signed=dt.date(2025, 1, 1)), zdr=zdr)})


def with_posture(route: Route, **posture: Any) -> Route:
    return route.model_copy(update={"posture": route.posture.model_copy(update=posture)})


def test_shipped_files_strict_denies_seed_standard_admits() -> None:
    policies = read(REPO / "policies", today=TODAY, env=ENV)
    strict = policies.decision("eu-strict", "magistral-small-2509")
    standard = policies.decision("eu-standard", "magistral-small-2509")
    assert strict is not None and standard is not None
    assert strict.routes == ()
    assert [r.id for r in standard.routes] == ["mistral-eu-magistral-small"]
    assert {"route": "mistral-eu-magistral-small", "requirement": "zero_data_retention",
            "message": "ZDR is on contract only and no ZDR contract with mistral is in force"
            } in strict.reasons


def test_strict_admits_seed_once_zdr_contract_in_force(tmp_path: Path) -> None:
    policy_dir = _copy(tmp_path)
    contracts = yaml.safe_load((policy_dir / "contracts.yaml").read_text())
    contracts["providers"]["mistral"]["zdr"] = {"reference": "ZDR-7", "signed": "2026-01-15",
                                                "expires": "2027-01-15"}
    (policy_dir / "contracts.yaml").write_text(yaml.safe_dump(contracts))
    allowed = read(policy_dir, today=TODAY, env=ENV).decision("eu-strict", "magistral-small-2509")
    assert allowed is not None and [r.id for r in allowed.routes] == ["mistral-eu-magistral-small"]
    expired = read(policy_dir, today=dt.date(2027, 1, 15), env=ENV)
    assert expired.decision("eu-strict", "magistral-small-2509").routes == ()  # type: ignore[union-attr]


def test_inference_and_storage_residency() -> None:
    route = seed()
    assert checks(route, inference_residency="EU", storage_residency="EEA") == {
        "inference_residency": True, "storage_residency": True}
    assert checks(route, inference_residency=["DE", "AT"])["inference_residency"] is False
    us = with_posture(route, inference_location="US", storage_location="US")
    assert checks(us, inference_residency="EU", storage_residency="EU") == {
        "inference_residency": False, "storage_residency": False}
    # Content is retained (30-day logs) but nobody says where: storage fails.
    unknown = with_posture(route, storage_location=None)
    assert checks(unknown, storage_residency="EU")["storage_residency"] is False
    # With ZDR in force nothing is retained, so where it would be stored does not matter.
    zdr = signed(zdr=Contract(reference="Z", signed=dt.date(2026, 1, 1)))
    assert checks(unknown, zdr, storage_residency="EU")["storage_residency"] is True


def test_zero_data_retention_needs_a_contract_in_force() -> None:
    route = seed()
    assert checks(route, zero_data_retention=True)["zero_data_retention"] is False
    future = signed(zdr=Contract(reference="Z", signed=dt.date(2027, 1, 1)))
    assert checks(route, future, zero_data_retention=True)["zero_data_retention"] is False
    ended = signed(zdr=Contract(reference="Z", signed=dt.date(2025, 1, 1),
                                expires=dt.date(2026, 6, 1)))
    assert checks(route, ended, zero_data_retention=True)["zero_data_retention"] is False
    live = signed(zdr=Contract(reference="Z", signed=dt.date(2026, 1, 1)))
    assert checks(route, live, zero_data_retention=True)["zero_data_retention"] is True
    always = with_posture(route, zero_data_retention="always")
    assert checks(always, zero_data_retention=True)["zero_data_retention"] is True
    unknown = with_posture(route, zero_data_retention=None)
    assert checks(unknown, live, zero_data_retention=True)["zero_data_retention"] is False


def test_no_training() -> None:
    route = seed()
    assert checks(route, no_training=True)["no_training"] is True
    assert checks(with_posture(route, training="default"), no_training=True)["no_training"] is False
    opt_out = with_posture(route, training="opt_out")
    assert checks(opt_out, no_training=True)["no_training"] is False
    opted = Contracts(providers={"mistral": ProviderContracts(
        training_opt_out=Contract(reference="OPT", signed=dt.date(2025, 1, 1)))})
    assert checks(opt_out, opted, no_training=True)["no_training"] is True
    assert checks(with_posture(route, training=None), no_training=True)["no_training"] is False


def test_dpa_signed_and_expired() -> None:
    route = seed()
    assert checks(route, dpa_signed=True)["dpa_signed"] is True
    gone = signed(dpa=Contract(reference="D", signed=dt.date(2024, 1, 1),
                               expires=dt.date(2026, 1, 1)))
    assert checks(route, gone, dpa_signed=True)["dpa_signed"] is False
    assert checks(route, Contracts(), dpa_signed=True)["dpa_signed"] is False
    assert checks(with_posture(route, gdpr_dpa="none"), dpa_signed=True)["dpa_signed"] is False


def test_max_provider_retention_days() -> None:
    route = seed()
    assert checks(route, max_provider_retention_days=30)["max_provider_retention_days"] is True
    assert checks(route, max_provider_retention_days=29)["max_provider_retention_days"] is False
    unknown = with_posture(route, logging=None)
    assert checks(unknown, max_provider_retention_days=365)["max_provider_retention_days"] is False


def test_third_party_access_and_transfer_mechanism() -> None:
    route = seed()
    assert checks(route, third_party_access=["none"])["third_party_access"] is False
    assert checks(route, third_party_access=["none", "subprocessors"])["third_party_access"] is True
    assert checks(route, transfer_mechanisms=["none_needed"])["transfer_mechanism"] is True
    scc = with_posture(route, transfer_mechanism="scc")
    assert checks(scc, transfer_mechanisms=["none_needed"])["transfer_mechanism"] is False
    assert checks(with_posture(route, third_party_access=None),
                  third_party_access=["subprocessors"])["third_party_access"] is False


def test_model_globs() -> None:
    route = seed()
    policy = Policy(name="p", models={"allow": ["mistral/*"], "deny": ["*embed*"]})
    def admitted(model: str) -> bool:
        return bool(decide(policy, Rules(), model, [route], {route.id}, signed(), TODAY).routes)
    assert admitted("mistral/magistral-small-2509")
    assert not admitted("magistral-small-2509")
    assert not admitted("mistral/mistral-embed")


def test_request_capabilities_and_max_tokens() -> None:
    route, policy = seed(), Policy(name="p", limits={"max_output_tokens": 4000})
    assert request_checks(route, policy, frozenset({"chat", "tools", "vision"}), 100) == []
    failed = request_checks(route, policy, frozenset({"chat", "embeddings"}), 9000)
    assert {c.requirement for c in failed} == {"capabilities", "max_tokens"}
    assert any("8192" in c.detail for c in failed) and any("4000" in c.detail for c in failed)
    no_tools = route.model_copy(update={"capabilities": frozenset({"chat"})})
    assert [c.requirement for c in request_checks(no_tools, Policy(name="p"),
                                                  frozenset({"chat", "tools"}), None)] == [
        "capabilities"]


def test_preference_listed_or_lowest_price() -> None:
    cheap = seed().model_copy(update={"id": "cheap", "pricing": seed().pricing.model_copy(
        update={"input_per_1m": 0, "output_per_1m": 0})})
    routes = [seed(), cheap]
    ids = {r.id for r in routes}
    listed = decide(Policy(name="p"), Rules(), "m", routes, ids, signed(), TODAY)
    cheapest = decide(Policy(name="p", prefer="lowest_price"), Rules(), "m", routes, ids,
                      signed(), TODAY)
    assert [r.id for r in listed.routes] == ["mistral-eu-magistral-small", "cheap"]
    assert [r.id for r in cheapest.routes] == ["cheap", "mistral-eu-magistral-small"]


def test_narrowing_names() -> None:
    assert parse_narrowing(" zdr, No-Training ,dpa") == {"zdr", "no-training", "dpa"}
    with pytest.raises(ValueError, match="unknown requirement maybe"):
        parse_narrowing("zdr,maybe")
    narrowed = with_narrowing(Rules.of(Require(max_provider_retention_days=30)),
                              frozenset({"no-retention", "eu"}))
    assert narrowed.max_retention_days == 0 and narrowed.inference is not None


def test_narrowing_in_a_loaded_set() -> None:
    policies = read(REPO / "policies", today=TODAY, env=ENV)
    narrowed = policies.decision("eu-standard", "magistral-small-2509", frozenset({"zdr"}))
    assert narrowed is not None and narrowed.routes == ()
    assert policies.decision("eu-standard", "magistral-small-2509",
                             frozenset({"no-training"})).routes  # type: ignore[union-attr]


# -- files: validation, check and explain ------------------------------------------------------


def _copy(tmp_path: Path) -> Path:
    from tests.conftest import copy_policies

    return copy_policies(tmp_path / "policies")


def test_invalid_files_report_file_key_and_message(tmp_path: Path) -> None:
    policy_dir = _copy(tmp_path)
    strict = policy_dir / "eu-strict.policy.yaml"
    strict.write_text(strict.read_text().replace("no_training: true", "no_trainin: true"))
    routes = policy_dir / "routes.yaml"
    routes.write_text(routes.read_text().replace("zero_data_retention: on_contract",
                                                 "zero_data_retention: sometimes", 1))
    apps = policy_dir / "apps.yaml"
    apps.write_text(apps.read_text().replace("policy: eu-strict", "policy: eu-lax"))
    with pytest.raises(PolicyError) as caught:
        read(policy_dir)
    found = {(p.file, p.key) for p in caught.value.problems}
    assert ("eu-strict.policy.yaml", "require.no_trainin") in found
    assert ("routes.yaml", "routes[0].posture.zero_data_retention") in found
    assert ("apps.yaml", "apps.hr-assistant.policy") in found


def test_price_with_too_many_decimals_is_refused(tmp_path: Path) -> None:
    policy_dir = _copy(tmp_path)
    routes = policy_dir / "routes.yaml"
    routes.write_text(routes.read_text().replace('input_per_1m: "0.50"', 'input_per_1m: "0.5001"'))
    with pytest.raises(PolicyError, match="decimal places"):
        read(policy_dir)


def test_policy_check_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture[str]) -> None:
    policy_dir = _copy(tmp_path)
    monkeypatch.setenv("EUROUTE_POLICY_DIR", str(policy_dir))
    assert main(["policy", "check"]) == 0
    assert "OK" in capsys.readouterr().out
    (policy_dir / "eu-standard.policy.yaml").write_text("name: eu-standard\nrequire: {eu: yes}\n")
    assert main(["policy", "check"]) == 1
    out = capsys.readouterr().out
    assert "eu-standard.policy.yaml: require.eu: Extra inputs are not permitted" in out


def test_policy_explain_cli(monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("EUROUTE_POLICY_DIR", str(REPO / "policies"))
    monkeypatch.setenv("MISTRAL_BASE_URL", "http://127.0.0.1:9/v1")
    assert main(["policy", "explain", "--policy", "eu-strict", "--model",
                 "magistral-small-2509"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"mistral-eu-magistral-small +zero_data_retention +FAIL +ZDR is on contract", out)
    assert re.search(r"mistral-eu-magistral-small +dpa_signed +pass +DPA DPA-MISTRAL", out)
    assert "admitted, in order of preference: none" in out
    assert main(["policy", "explain", "--policy", "eu-standard", "--model",
                 "magistral-small-2509", "--format", "json"]) == 0
    import json

    explained = json.loads(capsys.readouterr().out)
    assert explained["admitted"] == ["mistral-eu-magistral-small"]
    route = explained["routes"][0]
    assert {c["requirement"] for c in route["checks"]} >= {"inference_residency", "dpa_signed"}


def loaded(policy_dir: Path) -> PolicySet:
    return read(policy_dir, today=TODAY, env=ENV)
