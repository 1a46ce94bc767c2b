"""Properties over generated catalogs, contracts, policies and requests.

The oracle below is written independently of proxy/policy/decide.py, from the policy
reference in the README: a chosen route must satisfy it, requirement by requirement.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.policy.decide import NARROWING, Rules, decide, request_checks, with_narrowing
from proxy.policy.schema import (
    EEA,
    EU,
    Contract,
    Contracts,
    Policy,
    ProviderContracts,
    Require,
    Route,
)

TODAY = dt.date(2026, 11, 29)
COUNTRIES = ["FR", "DE", "NL", "NO", "CH", "US", "GB"]
PROVIDERS = ["mistral", "selfhosted", "other"]
CAPS = ["chat", "streaming", "tools", "vision", "json_mode"]

maybe = lambda s: st.none() | s  # noqa: E731
dates = st.dates(min_value=dt.date(2025, 1, 1), max_value=dt.date(2027, 12, 31))
contract = st.builds(lambda r, s, e: Contract(reference=r, signed=s, expires=e),
                     st.sampled_from(["A", "B"]), dates, maybe(dates))
contracts = st.builds(
    lambda d: Contracts(providers=d),
    st.dictionaries(st.sampled_from(PROVIDERS), st.builds(
        ProviderContracts, dpa=maybe(contract), zdr=maybe(contract),
        training_opt_out=maybe(contract)), max_size=3))


@st.composite
def routes(draw: Any, index: int) -> Route:
    posture = {
        "inference_location": draw(maybe(st.sampled_from(COUNTRIES))),
        "storage_location": draw(maybe(st.sampled_from(COUNTRIES))),
        "zero_data_retention": draw(maybe(st.sampled_from(["never", "on_contract", "always"]))),
        "training": draw(maybe(st.sampled_from(["never", "opt_out", "default"]))),
        "logging": draw(maybe(st.builds(lambda d: {"purpose": "abuse", "retention_days": d},
                                        maybe(st.integers(0, 60))))),
        "third_party_access": draw(maybe(st.sampled_from(["none", "subprocessors", "partners"]))),
        "gdpr_dpa": draw(maybe(st.sampled_from(["none", "available"]))),
        "transfer_mechanism": draw(maybe(st.sampled_from(["none_needed", "adequacy", "scc"]))),
    }
    return Route.model_validate({
        "id": f"r{index}", "provider": draw(st.sampled_from(PROVIDERS)), "upstream_model": "m",
        "models": ["m"], "posture": posture,
        "pricing": {"currency": "USD", "input_per_1m": draw(st.decimals(0, 5, places=2)),
                    "output_per_1m": Decimal("1")},
        "limits": {"context_window": 1000,
                   "max_output_tokens": draw(maybe(st.integers(100, 10_000)))},
        "capabilities": draw(st.sets(st.sampled_from(CAPS))) | {"chat"},
    })


catalogs = st.integers(1, 5).flatmap(lambda n: st.tuples(*(routes(i) for i in range(n))))
residency = maybe(st.sampled_from(["EU", "EEA"]) | st.lists(st.sampled_from(COUNTRIES),
                                                            min_size=1, max_size=3))
requires = st.builds(
    Require, inference_residency=residency, storage_residency=residency,
    zero_data_retention=st.booleans(), no_training=st.booleans(), dpa_signed=st.booleans(),
    max_provider_retention_days=maybe(st.integers(0, 40)),
    third_party_access=maybe(st.lists(st.sampled_from(["none", "subprocessors", "partners"]),
                                      min_size=1, unique=True)),
    transfer_mechanisms=maybe(st.lists(st.sampled_from(["none_needed", "adequacy", "scc"]),
                                       min_size=1, unique=True)))
narrowings = st.frozensets(st.sampled_from(sorted(NARROWING)))
needs = st.sets(st.sampled_from(CAPS)).map(lambda s: frozenset(s | {"chat"}))
max_tokens = maybe(st.integers(1, 12_000))


def in_force(c: Contract | None) -> bool:
    return c is not None and c.signed <= TODAY and (c.expires is None or TODAY < c.expires)


def oracle(route: Route, rules: Rules, signed: Contracts) -> bool:
    """Does `route` meet `rules`? Plain reading of the policy reference."""
    p, c = route.posture, signed.providers.get(route.provider, ProviderContracts())
    zdr = p.zero_data_retention == "always" or (p.zero_data_retention == "on_contract"
                                                and in_force(c.zdr))
    kept_days = 0 if zdr else (p.logging.retention_days if p.logging else None)
    ok = True
    if rules.inference is not None:
        ok &= p.inference_location in rules.inference
    if rules.storage is not None and kept_days != 0:
        ok &= p.storage_location in rules.storage
    if rules.zdr:
        ok &= zdr
    if rules.no_training:
        ok &= p.training == "never" or (p.training == "opt_out" and in_force(c.training_opt_out))
    if rules.dpa:
        ok &= p.gdpr_dpa == "available" and in_force(c.dpa)
    if rules.max_retention_days is not None:
        ok &= kept_days is not None and kept_days <= rules.max_retention_days
    if rules.third_party is not None:
        ok &= p.third_party_access in rules.third_party
    if rules.transfer is not None:
        ok &= p.transfer_mechanism in rules.transfer
    return ok


def _decide(catalog: tuple[Route, ...], require: Require, signed: Contracts,
            narrowing: frozenset[str], prefer: str = "listed") -> tuple[Rules, list[Route]]:
    policy = Policy(name="p", require=require, prefer=prefer)  # type: ignore[arg-type]
    rules = with_narrowing(Rules.of(require), narrowing)
    decision = decide(policy, rules, "m", list(catalog), {r.id for r in catalog}, signed, TODAY)
    return rules, list(decision.routes)


@settings(max_examples=300, deadline=None)
@given(catalogs, requires, contracts, narrowings)
def test_admitted_routes_are_exactly_those_meeting_every_requirement(
        catalog: tuple[Route, ...], require: Require, signed: Contracts,
        narrowing: frozenset[str]) -> None:
    rules, admitted = _decide(catalog, require, signed, narrowing)
    assert {r.id for r in admitted} == {r.id for r in catalog if oracle(r, rules, signed)}


@settings(max_examples=300, deadline=None)
@given(catalogs, requires, contracts, narrowings, narrowings)
def test_narrowing_never_widens(catalog: tuple[Route, ...], require: Require, signed: Contracts,
                                first: frozenset[str], more: frozenset[str]) -> None:
    _, base = _decide(catalog, require, signed, frozenset())
    _, narrowed = _decide(catalog, require, signed, first)
    _, narrower = _decide(catalog, require, signed, first | more)
    assert {r.id for r in narrower} <= {r.id for r in narrowed} <= {r.id for r in base}


@settings(max_examples=200, deadline=None)
@given(catalogs, requires, contracts, narrowings, st.sampled_from(["listed", "lowest_price"]),
       needs, max_tokens)
def test_decisions_are_deterministic_and_requests_only_narrow(
        catalog: tuple[Route, ...], require: Require, signed: Contracts,
        narrowing: frozenset[str], prefer: str, need: frozenset[str],
        tokens: int | None) -> None:
    _, once = _decide(catalog, require, signed, narrowing, prefer)
    _, twice = _decide(catalog, require, signed, narrowing, prefer)
    assert [r.id for r in once] == [r.id for r in twice]
    if prefer == "lowest_price":
        prices = [r.pricing.input_per_1m for r in once]
        assert prices == sorted(prices)
    policy = Policy(name="p")
    servable = [r for r in once if not request_checks(r, policy, need, tokens)]
    for route in servable:
        assert need <= route.capabilities
        limit = route.limits.max_output_tokens
        assert tokens is None or limit is None or tokens <= limit


def test_region_sets() -> None:
    assert len(EU) == 27 and EEA - EU == {"IS", "LI", "NO"}
