"""Read and validate a policy directory into an immutable `PolicySet`.

Files: `routes.yaml` (the catalog), `contracts.yaml`, `apps.yaml` and one `<name>.policy.yaml`
per policy. Every problem is reported with its file, key and message; none stops at the first.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from proxy.policy.decide import Decision, Rules, Standing, decide, standing, with_narrowing
from proxy.policy.schema import App, Apps, Catalog, Contracts, Policy, Route

M = TypeVar("M", bound=BaseModel)
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True, slots=True)
class Problem:
    file: str
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.key}: {self.message}"


class PolicyError(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(map(str, problems)))
        self.problems = problems


def _key(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _parse(path: Path, model: type[M], problems: list[Problem], raw: bytes) -> M | None:
    try:
        data = yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "(file)"
        problems.append(Problem(path.name, where, f"invalid YAML: {getattr(exc, 'problem', exc)}"))
        return None
    try:
        return model.model_validate(data if data is not None else {})
    except ValidationError as exc:
        for err in exc.errors():
            problems.append(Problem(path.name, _key(err["loc"]), err["msg"]))
        return None


@dataclass(slots=True)
class PolicySet:
    version: str
    catalog: Catalog
    contracts: Contracts
    policies: dict[str, Policy]
    apps: dict[str, App]
    today: dt.date
    base_urls: dict[str, str]
    api_keys: dict[str, str | None]
    # Enabled routes whose `api_key_env` is unset: route id -> variable. Never tried.
    uncredentialed: dict[str, str]
    standings: dict[str, Standing]
    by_model: dict[str, list[Route]]
    decisions: dict[tuple[str, str], Decision]
    _narrowed: dict[tuple[str, str, frozenset[str]], Decision] = field(default_factory=dict)

    def decision(self, policy: str, model: str, narrowing: frozenset[str] = frozenset()
                 ) -> Decision | None:
        """The precomputed decision; None when no route serves `model`."""
        if not narrowing:
            return self.decisions.get((policy, model))
        key = (policy, model, narrowing)
        found = self._narrowed.get(key)
        if found is None:
            base = self.decisions.get((policy, model))
            if base is None:
                return None
            found = decide(base.policy, with_narrowing(base.rules, narrowing), model,
                           self.by_model[model], set(self.base_urls), self.contracts, self.today)
            self._narrowed[key] = found
        return found

    def models_for(self, policy: str) -> list[str]:
        """Public model ids that `policy` admits on at least one route that has its
        credential."""
        return [m for m in self.by_model if (d := self.decisions.get((policy, m)))
                and any(r.id not in self.uncredentialed for r in d.routes)]


def read(directory: Path, *, today: dt.date | None = None,
         env: Mapping[str, str] = os.environ) -> PolicySet:
    """Load `directory`, or raise PolicyError listing every problem found."""
    problems: list[Problem] = []
    if not directory.is_dir():
        raise PolicyError([Problem(str(directory), "(directory)", "not a directory")])
    files = {p.name: p.read_bytes() for p in sorted(directory.glob("*.yaml"))}
    digest = hashlib.sha256()
    for name, raw in files.items():
        digest.update(name.encode() + b"\0" + raw + b"\0")

    def one(name: str, model: type[M], required: bool) -> M | None:
        if name not in files:
            if required:
                problems.append(Problem(name, "(file)", "missing"))
                return None
            return model()
        return _parse(directory / name, model, problems, files[name])

    catalog = one("routes.yaml", Catalog, required=True)
    contracts = one("contracts.yaml", Contracts, required=False)
    apps = one("apps.yaml", Apps, required=False)
    policies: dict[str, Policy] = {}
    for name in files:
        if name.endswith(".policy.yaml"):
            policy = _parse(directory / name, Policy, problems, files[name])
            if policy is None:
                continue
            if f"{policy.name}.policy.yaml" != name:
                problems.append(Problem(name, "name",
                                        f"policy {policy.name!r} must be in {policy.name}.policy.yaml"))
            policies[policy.name] = policy
    if not any(n.endswith(".policy.yaml") for n in files):
        problems.append(Problem("*.policy.yaml", "(file)", "no policy file"))
    if apps is not None:
        for app_name, app in apps.apps.items():
            if app.policy not in policies:
                problems.append(Problem("apps.yaml", f"apps.{app_name}.policy",
                                        f"unknown policy {app.policy!r}"))
    if catalog is not None and contracts is not None:
        providers = {r.provider for r in catalog.routes}
        for provider in contracts.providers:
            if provider not in providers:
                problems.append(Problem("contracts.yaml", f"providers.{provider}",
                                        "no route in routes.yaml has this provider"))
    if problems or catalog is None or contracts is None or apps is None:
        raise PolicyError(problems)
    return build(catalog, contracts, policies, apps.apps, digest.hexdigest(),
                 today or dt.datetime.now(dt.UTC).date(), env)


def build(catalog: Catalog, contracts: Contracts, policies: dict[str, Policy],
          apps: dict[str, App], version: str, today: dt.date,
          env: Mapping[str, str] = os.environ) -> PolicySet:
    """Precompute every (policy, model) decision, so a request only does a lookup."""
    base_urls: dict[str, str] = {}
    api_keys: dict[str, str | None] = {}
    by_model: dict[str, list[Route]] = {}
    for route in catalog.routes:
        url = (env.get(route.base_url_env) if route.base_url_env else None) or route.base_url
        if url:
            base_urls[route.id] = url.rstrip("/")
        api_keys[route.id] = env.get(route.api_key_env) if route.api_key_env else None
        for model in route.models:
            by_model.setdefault(model, []).append(route)
    enabled = set(base_urls)
    uncredentialed = {r.id: r.api_key_env for r in catalog.routes
                      if r.api_key_env and r.id in enabled and not api_keys[r.id]}
    decisions = {
        (p.name, model): decide(p, Rules.of(p.require), model, routes, enabled, contracts, today)
        for p in policies.values()
        for model, routes in by_model.items()
    }
    return PolicySet(
        version=version, catalog=catalog, contracts=contracts, policies=policies, apps=apps,
        today=today, base_urls=base_urls, api_keys=api_keys, uncredentialed=uncredentialed,
        standings={r.id: standing(r, contracts, today) for r in catalog.routes},
        by_model=by_model, decisions=decisions,
    )

