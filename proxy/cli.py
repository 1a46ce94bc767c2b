"""The `euroute` command."""

from __future__ import annotations

import argparse
import asyncio
import os

from proxy import audit_cli, keys, metrics, report
from proxy.audit_cli import engine_from, err, policies_or_none
from proxy.ledger.db import migrate
from proxy.policy.decide import parse_narrowing
from proxy.policy.load import PolicyError, read
from proxy.settings import Settings


async def _migrate(settings: Settings, revision: str = "head") -> None:
    async with engine_from(settings) as engine:
        await migrate(engine, revision)


# -- serve, migrate ---------------------------------------------------------------------------

async def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    await _migrate(settings, args.revision)
    err(f"database at revision {args.revision}")
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from proxy import serving

    if policies_or_none(settings) is None:
        return 2
    try:
        settings.keyring()
    except ValueError as exc:
        err(str(exc))
        return 2
    if settings.migrate_on_start:
        # Once, here, not in every worker.
        asyncio.run(_migrate(settings))
        os.environ["EUROUTE_MIGRATE_ON_START"] = "false"
    with metrics.shared_between_workers(args.workers):
        serving.serve(settings, host=args.host, port=args.port, workers=args.workers)
    return 0


# -- keys -------------------------------------------------------------------------------------

async def cmd_keys_create(args: argparse.Namespace, settings: Settings) -> int:
    if (policies := policies_or_none(settings)) is None:
        return 2
    try:
        policy = keys.policy_for(policies, keys.check_app(args.app), args.policy)
    except ValueError as exc:
        err(str(exc))
        return 2

    async with engine_from(settings) as engine:
        secret, record = await keys.create(engine, app=args.app, policy=policy, role=args.role,
                                           actor="cli")
    print(secret)
    err(f"created {record.id}: app={record.app} role={record.role} policy={record.policy}"
         " (the key is shown once; only its SHA-256 is stored)")
    return 0


async def cmd_keys_list(args: argparse.Namespace, settings: Settings) -> int:
    async with engine_from(settings) as engine:
        print(report.render(await keys.listing(engine), args.format))
    return 0


async def cmd_keys_revoke(args: argparse.Namespace, settings: Settings) -> int:
    async with engine_from(settings) as engine:
        revoked = await keys.revoke(engine, args.key_id, actor="cli")
    if revoked:
        err(f"revoked {args.key_id}; every replica refuses it within "
             f"{settings.key_refresh_s:g} s")
        return 0
    err(f"no active key {args.key_id}")
    return 1


# -- policy -----------------------------------------------------------------------------------

async def cmd_policy_check(args: argparse.Namespace, settings: Settings) -> int:
    directory = settings.resolved_policy_dir()
    try:
        policies = read(directory)
    except PolicyError as exc:
        for problem in exc.problems:
            print(f"{directory / problem.file}: {problem.key}: {problem.message}")
        err(f"{len(exc.problems)} problem(s)")
        return 1
    print(f"{directory}: OK, version {policies.version[:12]}: {len(policies.catalog.routes)} "
          f"routes, {len(policies.policies)} policies, {len(policies.apps)} apps")
    return 0


async def cmd_policy_explain(args: argparse.Namespace, settings: Settings) -> int:
    try:
        policies = read(settings.resolved_policy_dir())
        narrowing = parse_narrowing(args.require or "")
    except (PolicyError, ValueError) as exc:
        err(str(exc))
        return 2
    if args.policy not in policies.policies:
        err(f"unknown policy {args.policy!r}; known: {', '.join(sorted(policies.policies))}")
        return 2
    decision = policies.decision(args.policy, args.model, narrowing)
    if decision is None:
        err(f"no route serves model {args.model!r}; known: {', '.join(policies.by_model)}")
        return 2
    if args.format == "json":
        print(report.to_json({**decision.as_dict(), "policy_version": policies.version,
                              "admitted": [r.id for r in decision.routes]}).decode())
        return 0
    rows = []
    for verdict in decision.verdicts:
        if not verdict.enabled:
            rows.append({"route": verdict.route.id, "requirement": "enabled", "result": "FAIL",
                         "why": "route has no base URL configured"})
        for check in verdict.checks:
            rows.append({"route": verdict.route.id, "requirement": check.requirement,
                         "result": "pass" if check.ok else "FAIL", "why": check.detail})
    print(f"policy {args.policy} (version {policies.version[:12]}), model {args.model}"
          + (f", narrowed by {', '.join(sorted(narrowing))}" if narrowing else ""))
    print(f"models rule: {decision.model_check.detail}")
    print(report.table(rows))
    admitted = [r.id for r in decision.routes]
    print(f"admitted, in order of preference: {', '.join(admitted) if admitted else 'none'}")
    return 0


# -- demo -----------------------------------------------------------------------------------

def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from proxy.demo import run

    return int(asyncio.run(run(settings)))


# -- parser -----------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="euroute", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the proxy")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--workers", type=int, default=1)
    p.set_defaults(sync=cmd_serve)

    p = sub.add_parser("migrate", help="apply database migrations")
    p.add_argument("--revision", default="head")
    p.set_defaults(run=cmd_migrate)

    p = sub.add_parser("demo", help="a local end-to-end run: no API key, no internet")
    p.set_defaults(sync=cmd_demo)

    k = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    p = k.add_parser("create", help="create a key; prints it once, alone on stdout")
    p.add_argument("--app", required=True)
    p.add_argument("--policy", help="default: the app's policy in apps.yaml")
    p.add_argument("--role", choices=keys.ROLES, default="app")
    p.set_defaults(run=cmd_keys_create)
    p = k.add_parser("list", help="list keys (never their secrets)")
    p.add_argument("--format", choices=report.FORMATS, default="table")
    p.set_defaults(run=cmd_keys_list)
    p = k.add_parser("revoke", help="revoke a key by id")
    p.add_argument("key_id")
    p.set_defaults(run=cmd_keys_revoke)

    pol = sub.add_parser("policy", help="policy files").add_subparsers(dest="policy_command",
                                                                     required=True)
    p = pol.add_parser("check", help="validate every policy file")
    p.set_defaults(run=cmd_policy_check)
    p = pol.add_parser("explain", help="every route against every requirement")
    p.add_argument("--policy", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--require", help="narrowing, as in x-euroute-require (e.g. zdr,no-training)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(run=cmd_policy_explain)

    audit_cli.add_commands(sub)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    settings = Settings()
    if getattr(args, "sync", None):
        return int(args.sync(args, settings))
    return int(asyncio.run(args.run(args, settings)))
