"""Which routes may see a request: every requirement checked, every failure named.

`Rules` is a policy's `require` block in normalised form (country sets, not region names),
so that narrowing a policy per request is plain set intersection and can never widen it.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from proxy.policy.schema import EEA, REGIONS, Contracts, Policy, Require, Residency, Route


def _countries(residency: Residency | None) -> frozenset[str] | None:
    if residency is None:
        return None
    if isinstance(residency, str):
        return REGIONS[residency]
    return frozenset(residency)


def _meet(a: frozenset[str] | None, b: frozenset[str] | None) -> frozenset[str] | None:
    if a is None:
        return b
    return a if b is None else a & b


def _describe(countries: frozenset[str]) -> str:
    for name, members in REGIONS.items():
        if countries == members:
            return name
    return ",".join(sorted(countries)) or "nowhere"


@dataclass(frozen=True, slots=True)
class Rules:
    inference: frozenset[str] | None = None
    storage: frozenset[str] | None = None
    zdr: bool = False
    no_training: bool = False
    dpa: bool = False
    max_retention_days: int | None = None
    third_party: frozenset[str] | None = None
    transfer: frozenset[str] | None = None

    @classmethod
    def of(cls, require: Require) -> Rules:
        return cls(
            inference=_countries(require.inference_residency),
            storage=_countries(require.storage_residency),
            zdr=require.zero_data_retention,
            no_training=require.no_training,
            dpa=require.dpa_signed,
            max_retention_days=require.max_provider_retention_days,
            third_party=None if require.third_party_access is None
            else frozenset(require.third_party_access),
            transfer=None if require.transfer_mechanisms is None
            else frozenset(require.transfer_mechanisms),
        )

    def narrow(self, other: Rules) -> Rules:
        """The stricter of both, requirement by requirement."""
        days = [d for d in (self.max_retention_days, other.max_retention_days) if d is not None]
        return Rules(
            inference=_meet(self.inference, other.inference),
            storage=_meet(self.storage, other.storage),
            zdr=self.zdr or other.zdr,
            no_training=self.no_training or other.no_training,
            dpa=self.dpa or other.dpa,
            max_retention_days=min(days) if days else None,
            third_party=_meet(self.third_party, other.third_party),
            transfer=_meet(self.transfer, other.transfer),
        )


_EU = REGIONS["EU"]
# Names a caller may put in `x-euroute-require`, each the Rules it adds.
NARROWING: dict[str, Rules] = {
    "eu": Rules(inference=_EU, storage=_EU),
    "eea": Rules(inference=EEA, storage=EEA),
    "zdr": Rules(zdr=True),
    "no-training": Rules(no_training=True),
    "dpa": Rules(dpa=True),
    "no-retention": Rules(max_retention_days=0),
    "no-third-party": Rules(third_party=frozenset({"none"})),
    "no-transfer": Rules(transfer=frozenset({"none_needed"})),
}


def parse_narrowing(header: str) -> frozenset[str]:
    """The requirement names of an `x-euroute-require` header; ValueError on an unknown one."""
    names = frozenset(n.strip().lower() for n in header.split(",") if n.strip())
    unknown = sorted(names - NARROWING.keys())
    if unknown:
        raise ValueError(
            f"unknown requirement {', '.join(unknown)} in x-euroute-require; "
            f"known: {', '.join(NARROWING)}"
        )
    return names


@dataclass(frozen=True, slots=True)
class Check:
    requirement: str
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class Standing:
    """What a route's posture amounts to once the operator's contracts are applied."""

    zdr: bool
    zdr_reference: str | None
    dpa_reference: str | None
    retention_days: int | None


def standing(route: Route, contracts: Contracts, today: dt.date) -> Standing:
    posture = route.posture
    signed = contracts.providers.get(route.provider)
    zdr_contract = signed.zdr if signed and signed.zdr and signed.zdr.in_force(today) else None
    dpa_contract = signed.dpa if signed and signed.dpa and signed.dpa.in_force(today) else None
    zdr = posture.zero_data_retention == "always" or (
        posture.zero_data_retention == "on_contract" and zdr_contract is not None
    )
    if zdr:
        days: int | None = 0
    else:
        days = posture.logging.retention_days if posture.logging else None
    return Standing(
        zdr=zdr,
        zdr_reference=zdr_contract.reference
        if zdr_contract and posture.zero_data_retention == "on_contract" else None,
        dpa_reference=dpa_contract.reference
        if dpa_contract and posture.gdpr_dpa == "available" else None,
        retention_days=days,
    )


def evaluate(route: Route, rules: Rules, contracts: Contracts, today: dt.date) -> list[Check]:
    """Every requirement of `rules` against one route; unknown posture fails."""
    p = route.posture
    s = standing(route, contracts, today)
    signed = contracts.providers.get(route.provider)
    checks: list[Check] = []

    if rules.inference is not None:
        where = p.inference_location
        ok = where is not None and where in rules.inference
        checks.append(Check("inference_residency", ok,
                            f"inference in {where or 'an unknown location'}, "
                            f"required {_describe(rules.inference)}"))
    if rules.storage is not None:
        where = p.storage_location
        if s.retention_days == 0:
            checks.append(Check("storage_residency", True, "no content is retained"))
        else:
            ok = where is not None and where in rules.storage
            checks.append(Check("storage_residency", ok,
                                f"content retained in {where or 'an unknown location'}, "
                                f"required {_describe(rules.storage)}"))
    if rules.zdr:
        if s.zdr:
            detail = ("zero data retention always" if p.zero_data_retention == "always"
                      else f"ZDR contract {s.zdr_reference} in force")
        elif p.zero_data_retention == "on_contract":
            detail = f"ZDR is on contract only and no ZDR contract with {route.provider} is in force"
        else:
            detail = f"zero data retention is {p.zero_data_retention or 'unknown'}"
        checks.append(Check("zero_data_retention", s.zdr, detail))
    if rules.no_training:
        opt_out = signed.training_opt_out if signed else None
        if p.training == "never":
            checks.append(Check("no_training", True, "provider never trains on customer data"))
        elif p.training == "opt_out" and opt_out is not None and opt_out.in_force(today):
            checks.append(Check("no_training", True, f"training opt-out {opt_out.reference}"))
        else:
            detail = ("training is opt-out and no opt-out with "
                      f"{route.provider} is in force") if p.training == "opt_out" else (
                f"training is {p.training or 'unknown'}")
            checks.append(Check("no_training", False, detail))
    if rules.dpa:
        if s.dpa_reference:
            checks.append(Check("dpa_signed", True, f"DPA {s.dpa_reference} in force"))
        elif p.gdpr_dpa == "available":
            checks.append(Check("dpa_signed", False,
                                f"a DPA is available but none with {route.provider} is in force"))
        else:
            checks.append(Check("dpa_signed", False, f"GDPR DPA is {p.gdpr_dpa or 'unknown'}"))
    if rules.max_retention_days is not None:
        days = s.retention_days
        ok = days is not None and days <= rules.max_retention_days
        checks.append(Check("max_provider_retention_days", ok,
                            f"provider keeps logs {'an unknown time' if days is None else f'{days} days'}"
                            f", at most {rules.max_retention_days} allowed"))
    if rules.third_party is not None:
        access = p.third_party_access
        checks.append(Check("third_party_access", access in rules.third_party,
                            f"third-party access {access or 'unknown'}, "
                            f"allowed {', '.join(sorted(rules.third_party))}"))
    if rules.transfer is not None:
        mech = p.transfer_mechanism
        checks.append(Check("transfer_mechanism", mech in rules.transfer,
                            f"transfer mechanism {mech or 'unknown'}, "
                            f"allowed {', '.join(sorted(rules.transfer))}"))
    return checks


def model_allowed(policy: Policy, model: str, names: Sequence[str] = ()) -> Check:
    """The models rule for `model`, whose other names (the upstream model and every alias of
    the routes serving it) are `names`. A model denied under one name is denied under all of
    them; an allow rule must match the name asked for, so allowing fewer names never admits
    more."""
    denied = next(((n, g) for g in policy.models.deny for n in (model, *names)
                   if fnmatch.fnmatchcase(n, g)), None)
    if denied:
        also = "" if denied[0] == model else f" (also named {denied[0]})"
        return Check("models", False, f"model {model}{also} matches deny rule {denied[1]!r}")
    allowed = next((g for g in policy.models.allow if fnmatch.fnmatchcase(model, g)), None)
    if allowed is None:
        return Check("models", False, f"model {model} matches no allow rule")
    return Check("models", True, f"model {model} matches allow rule {allowed!r}")


@dataclass(frozen=True, slots=True)
class Verdict:
    route: Route
    enabled: bool
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return self.enabled and all(c.ok for c in self.checks)

    def reasons(self) -> list[dict[str, str]]:
        failed = [c for c in self.checks if not c.ok]
        if not self.enabled:
            failed.insert(0, Check("enabled", False, "route has no base URL configured"))
        return [{"route": self.route.id, "requirement": c.requirement, "message": c.detail}
                for c in failed]


@dataclass(frozen=True, slots=True)
class Decision:
    """For one (policy, model): compliant routes in preference order, and every verdict."""

    policy: Policy
    model: str
    rules: Rules
    model_check: Check
    verdicts: tuple[Verdict, ...]
    # Worked out once, when the policy set loads, not on every request.
    routes: tuple[Route, ...] = field(init=False)
    reasons: tuple[dict[str, str], ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.model_check.ok:
            routes = tuple(v.route for v in self.verdicts if v.ok)
            reasons = tuple(r for v in self.verdicts for r in v.reasons())
        else:
            routes = ()
            reasons = ({"route": "*", "requirement": "models",
                        "message": self.model_check.detail},)
        object.__setattr__(self, "routes", routes)
        object.__setattr__(self, "reasons", reasons)

    def as_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy.name,
            "model": self.model,
            "model_rule": {"ok": self.model_check.ok, "detail": self.model_check.detail},
            "routes": [
                {"route": v.route.id, "provider": v.route.provider, "compliant": v.ok,
                 "enabled": v.enabled,
                 "checks": [{"requirement": c.requirement, "ok": c.ok, "detail": c.detail}
                            for c in v.checks]}
                for v in self.verdicts
            ],
        }


def decide(policy: Policy, rules: Rules, model: str, routes: list[Route], enabled: set[str],
           contracts: Contracts, today: dt.date) -> Decision:
    verdicts = [Verdict(r, r.id in enabled, tuple(evaluate(r, rules, contracts, today)))
                for r in routes]
    if policy.prefer == "lowest_price":
        # A stable sort keeps catalog order among equal prices.
        verdicts.sort(key=lambda v: v.route.pricing.input_per_1m + v.route.pricing.output_per_1m)
    verdicts.sort(key=lambda v: not v.ok)
    names = sorted({n for r in routes for n in (r.upstream_model, *r.models)})
    return Decision(policy, model, rules, model_allowed(policy, model, names), tuple(verdicts))


def with_narrowing(rules: Rules, names: frozenset[str]) -> Rules:
    for name in sorted(names):
        rules = rules.narrow(NARROWING[name])
    return rules



def request_checks(route: Route, policy: Policy, needs: frozenset[str],
                   max_tokens: int | None) -> list[Check]:
    """What this one request asks of a route: capabilities and output length."""
    checks = [Check("capabilities", False, f"route lacks {need}")
              for need in sorted(needs - route.capabilities)]
    if max_tokens is not None:
        limit = route.limits.max_output_tokens
        if limit is not None and max_tokens > limit:
            checks.append(Check("max_tokens", False,
                                f"max_tokens {max_tokens} exceeds the route's {limit}"))
        cap = policy.limits.max_output_tokens
        if cap is not None and max_tokens > cap:
            checks.append(Check("max_tokens", False,
                                f"max_tokens {max_tokens} exceeds the policy's {cap}"))
    return checks
