"""The `euroute` command."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import typing
from typing import Any

from pydantic import SecretStr, ValidationError
from sqlalchemy.exc import SQLAlchemyError

from proxy import __version__, audit_cli, keys, metrics, report
from proxy.audit_cli import CommandError, engine_from, err, policies_or_none, positive, reason
from proxy.ledger.db import migrate
from proxy.policy.decide import parse_narrowing
from proxy.policy.load import PolicyError, read
from proxy.settings import Settings, masked_url


async def _migrate(settings: Settings, revision: str = "head") -> None:
    async with engine_from(settings, migrated=False) as engine:
        await migrate(engine, revision)


async def _check_schema(settings: Settings) -> None:
    async with engine_from(settings):
        pass


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
        settings.pseudonym_secret()
    except ValueError as exc:
        err(str(exc))
        return 2
    if settings.migrate_on_start:
        # Once, here, not in every worker.
        asyncio.run(_migrate(settings))
        os.environ["EUROUTE_MIGRATE_ON_START"] = "false"
    else:
        # Fail here in a line, not in every worker's start-up with a traceback.
        asyncio.run(_check_schema(settings))
    # The gateway logs one line per request (proxy/logs.py): uvicorn's access log is off.
    with metrics.shared_between_workers(args.workers):
        serving.serve(settings, host=args.host, port=args.port, workers=args.workers)
    return 0


# -- config -----------------------------------------------------------------------------------

def _shown(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return "(set, hidden)"
    if isinstance(value, str) and "://" in value:
        return masked_url(value)
    return value


def cmd_config(args: argparse.Namespace, settings: Settings) -> int:
    """The settings in effect (environment over `.env` over defaults), secrets hidden."""
    rows = [{"variable": f"EUROUTE_{name.upper()}", "value": _shown(getattr(settings, name))}
            for name in type(settings).model_fields]
    rows[[r["variable"] for r in rows].index("EUROUTE_POLICY_DIR")]["value"] = str(
        settings.resolved_policy_dir())
    policies = policies_or_none(settings)
    if policies is None:
        return 2
    env = settings.environment()
    named: dict[str, bool] = {}
    for route in policies.catalog.routes:
        if route.base_url_env:
            named.setdefault(route.base_url_env, False)
        if route.api_key_env:
            named[route.api_key_env] = True
    for variable, secret in named.items():
        value = env.get(variable)
        rows.append({"variable": variable, "value": "(set, hidden)" if secret and value
                     else (masked_url(value) if value and "://" in value else value)})
    print(report.render(rows, args.format).rstrip("\n"))
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
        print(report.render(await keys.listing(engine), args.format).rstrip("\n"))
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
        policies = read(directory, env=settings.environment())
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
        policies = read(settings.resolved_policy_dir(), env=settings.environment())
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
    rows = report.explain_rows(decision)
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

    return int(asyncio.run(run(settings, args.database_url)))


# -- parser -----------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="euroute", description=__doc__)
    top.add_argument("--version", action="version", version=f"euroute {__version__}")
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the proxy")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port, default=8080)
    p.add_argument("--workers", type=positive, default=1)
    p.set_defaults(sync=cmd_serve)

    p = sub.add_parser("config", help="the settings in effect, secrets hidden")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(sync=cmd_config)

    p = sub.add_parser("migrate", help="apply database migrations")
    p.add_argument("--revision", default="head")
    p.set_defaults(run=cmd_migrate)

    p = sub.add_parser("demo", help="a local end-to-end run: no API key, no internet")
    p.add_argument("--database-url", help="keep the demo's ledger and keys here "
                   "(default: a temporary database, deleted afterwards)")
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


def port(text: str) -> int:
    """A TCP port; 0 lets the system pick a free one."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (0 to 65535)")
    return value


def settings_problems(exc: ValidationError) -> str:
    """Each invalid setting by its variable name, what it must be, and (unless it may be a
    secret or hold one) what it was."""
    lines = []
    for problem in exc.errors():
        name = str(problem["loc"][0]) if problem["loc"] else ""
        field = Settings.model_fields.get(name)
        shown = (field is not None and (typing.get_origin(field.annotation) is typing.Literal
                                        or field.annotation in (int, float, bool)))
        message = problem["msg"].removeprefix("Value error, ")
        lines.append(f"invalid setting EUROUTE_{name.upper()}: {message}"
                     + (f" (got {problem['input']!r})" if shown else ""))
    return "\n".join(lines)


def failure(exc: BaseException) -> tuple[int, str] | None:
    """The exit status and the few lines an operator needs, for every failure that is not a
    bug in euroute (those keep their traceback)."""
    if isinstance(exc, CommandError):
        return exc.code, str(exc)
    if isinstance(exc, ValidationError):
        return 2, settings_problems(exc)
    if isinstance(exc, BrokenPipeError):
        # The reader (`| head`) has all it wanted: nothing to say. 141 is a shell's SIGPIPE exit.
        return 141, ""
    if isinstance(exc, KeyboardInterrupt):
        return 130, "interrupted"
    if isinstance(exc, SQLAlchemyError):
        return 1, f"database error: {reason(exc)}"
    if isinstance(exc, OSError):
        return 1, str(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = Settings()
        if getattr(args, "sync", None):
            code = int(args.sync(args, settings))
        else:
            code = int(asyncio.run(args.run(args, settings)))
        sys.stdout.flush()  # here, where a closed pipe is caught, not at interpreter exit
        return code
    except BaseException as exc:  # KeyboardInterrupt too; a bug is re-raised
        found = failure(exc)
        if found is None:
            raise
        code, message = found
        if isinstance(exc, BrokenPipeError):
            # Python would flush stdout at exit into the closed pipe and complain.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        elif message:
            err(f"euroute: {message}".replace("\n", "\neuroute: "))
        return code
