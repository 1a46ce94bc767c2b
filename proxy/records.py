"""The GDPR Art. 30 record of processing, one entry per route: what the policy set says about
the route (processor, sub-processing, purpose, locations, transfer mechanism, retention,
contracts) joined with what the ledger shows went there (requests, under which policies).

A route that left the catalog but still has rows in the range keeps its entry, from the facts
its rows recorded, so the record covers every processing that happened.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.ledger.queries import EVERYTHING, Window
from proxy.ledger.tables import ledger
from proxy.policy.load import PolicySet
from proxy.policy.schema import EEA, EU, Route

PURPOSE = "LLM inference on behalf of the operator's internal applications"
PASSED = "(passed through; euroute stores no content)"
SUBJECTS = "end users of the calling applications, and people named in their prompts"
LEDGER_DATA = [
    "pseudonymous end-user ids (HMAC; euroute's ledger only, never sent upstream)",
    "usage metadata: app, model, route, tokens, cost, timing, policy decision (euroute's ledger)",
]
_FACTS = ("provider", "inference_location", "storage_location", "transfer_mechanism",
          "provider_retention_days", "zdr_reference", "dpa_reference")


def region(country: str | None) -> str:
    if country is None:
        return "unknown"
    return "EU" if country in EU else "EEA" if country in EEA else "third country"


def _content(route: Route) -> list[str]:
    kinds = []
    if route.capabilities & {"chat", "fim"}:
        kinds.append("prompts and completions of end users")
    if "embeddings" in route.capabilities:
        kinds.append("texts submitted for embedding, and their vectors")
    return [f"{k} {PASSED}" for k in kinds]


def _admitting(policies: PolicySet, route_id: str) -> set[str]:
    """Policies under which some model may be sent to this route (enabled or not)."""
    return {d.policy.name for d in policies.decisions.values() if d.model_check.ok
            and any(v.route.id == route_id and all(c.ok for c in v.checks)
                    for v in d.verdicts)}


async def _seen(engine: AsyncEngine, window: Window) -> tuple[dict[str, Any], dict[str, Any]]:
    c = ledger.c
    where = [c.route.is_not(None), *window.where()]
    facts = [func.max(c[name]) for name in _FACTS]
    async with engine.connect() as conn:
        per_route = (await conn.execute(
            select(c.route, func.count(), func.min(c.created_at), func.max(c.created_at), *facts)
            .where(*where).group_by(c.route))).all()
        per_policy = (await conn.execute(
            select(c.route, c.policy, func.count()).where(*where)
            .group_by(c.route, c.policy))).all()
    routes = {r[0]: r for r in per_route}
    policies: dict[str, dict[str, int]] = {}
    for route, policy, n in per_policy:
        policies.setdefault(route, {})[policy] = n
    return routes, policies


async def records(engine: AsyncEngine, policies: PolicySet,
                  window: Window = EVERYTHING) -> dict[str, Any]:
    seen, seen_policies = await _seen(engine, window)
    catalog = {r.id: r for r in policies.catalog.routes}
    out = []
    for route_id in [*catalog, *sorted(set(seen) - set(catalog))]:
        if window.route is not None and route_id != window.route:
            continue
        used = seen_policies.get(route_id, {})
        names = sorted(_admitting(policies, route_id) | set(used))
        if window.policy is not None:
            if window.policy not in names:
                continue
            names = [window.policy]
        entry = (_from_catalog(catalog[route_id], policies) if route_id in catalog
                 else _from_ledger(route_id, seen[route_id]))
        row = seen.get(route_id)
        entry.update(
            data_subjects=SUBJECTS,
            policies=[{"policy": name, "requests": used.get(name, 0),
                       "records_retention_days": policies.policies[name].records.retention_days
                       if name in policies.policies else None} for name in names],
            content_stored_by_euroute=False,
            requests=row[1] if row else 0, first_request=row[2] if row else None,
            last_request=row[3] if row else None)
        out.append(entry)
    return {"generated_at": dt.datetime.now(dt.UTC), "policy_version": policies.version,
            "from": window.start, "to": window.end, "records": out}


def _from_catalog(route: Route, policies: PolicySet) -> dict[str, Any]:
    p, standing = route.posture, policies.standings[route.id]
    return {
        "route": route.id, "in_catalog": True, "description": route.description,
        "processor": route.provider, "upstream_model": route.upstream_model,
        "sub_processing": p.third_party_access or "unknown", "purpose": PURPOSE,
        "provider_logging_purpose": p.logging.purpose if p.logging else "unknown",
        "data_categories": [*_content(route), *LEDGER_DATA],
        "inference_location": p.inference_location,
        "inference_region": region(p.inference_location),
        "storage_location": p.storage_location, "storage_region": region(p.storage_location),
        "transfer_mechanism": p.transfer_mechanism or "unknown",
        "zero_data_retention": p.zero_data_retention or "unknown",
        "zdr_reference": standing.zdr_reference,
        "provider_retention_days": standing.retention_days,
        "dpa_reference": standing.dpa_reference,
    }


def _from_ledger(route_id: str, row: Any) -> dict[str, Any]:
    provider, inference, storage, mechanism, days, zdr, dpa = row[4:]
    return {
        "route": route_id, "in_catalog": False,
        "description": "no longer in the route catalog; facts as recorded in the ledger",
        "processor": provider, "upstream_model": None, "sub_processing": "unknown",
        "purpose": PURPOSE, "provider_logging_purpose": "unknown",
        "data_categories": [f"prompts, completions or texts of end users {PASSED}",
                            *LEDGER_DATA],
        "inference_location": inference, "inference_region": region(inference),
        "storage_location": storage, "storage_region": region(storage),
        "transfer_mechanism": mechanism or "unknown", "zero_data_retention": "unknown",
        "zdr_reference": zdr, "provider_retention_days": days, "dpa_reference": dpa,
    }


def flat(entry: dict[str, Any]) -> dict[str, Any]:
    """One entry as a CSV row: lists joined with '; '."""
    out = dict(entry)
    out["data_categories"] = "; ".join(entry["data_categories"])
    out["policies"] = "; ".join(
        f"{p['policy']} (records kept {p['records_retention_days']} days, "
        f"{p['requests']} requests)" for p in entry["policies"])
    return out


_LABELS = {
    "processor": "Processor (provider)", "description": "Route",
    "upstream_model": "Model at the provider", "purpose": "Purpose of processing",
    "provider_logging_purpose": "Provider's own logging purpose",
    "sub_processing": "Sub-processing (third-party access)",
    "data_subjects": "Categories of data subjects", "data_categories": "Categories of data",
    "inference_location": "Inference location", "storage_location": "Storage location",
    "transfer_mechanism": "Transfer mechanism (outside the EEA)",
    "zero_data_retention": "Zero data retention", "zdr_reference": "ZDR contract",
    "provider_retention_days": "Provider retention (days)", "dpa_reference": "DPA reference",
    "policies": "Policies, and euroute's own record retention",
    "content_stored_by_euroute": "Content stored by euroute",
    "requests": "Requests in range", "first_request": "First request",
    "last_request": "Last request",
}


def _cell(key: str, entry: dict[str, Any]) -> str:
    value = flat(entry)[key]
    if key.endswith("_location") and value:
        value = f"{value} ({entry[key.replace('location', 'region')]})"
    if value is None:
        value = "unknown" if key == "provider_retention_days" else "none"
    if isinstance(value, bool):
        value = "yes" if value else "no"
    if isinstance(value, dt.datetime | dt.date):
        value = value.isoformat()
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown(document: dict[str, Any]) -> Iterator[str]:
    span = (f"{document['from'].isoformat() if document['from'] else 'the beginning'} to "
            f"{document['to'].isoformat() if document['to'] else 'now'}")
    yield "# Records of processing (GDPR Art. 30)\n\n"
    yield (f"Generated {document['generated_at'].isoformat(timespec='seconds')} from policy "
           f"version {document['policy_version'][:12]} and the ledger from {span}.\n")
    for entry in document["records"]:
        yield f"\n## Route `{entry['route']}`\n\n| Item | Record |\n|---|---|\n"
        for key, label in _LABELS.items():
            yield f"| {label} | {_cell(key, entry)} |\n"
