"""`euroute audit ...`, `purge`, `erase` and `backup`: the compliance commands."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy import keys, records, report
from proxy.ledger import anchors, providers, queries, retention
from proxy.ledger.chain import DEV_PSEUDONYM_SECRET
from proxy.ledger.db import alembic_config, make_engine
from proxy.ledger.queries import Window
from proxy.ledger.record import OUTCOMES
from proxy.policy.load import PolicyError, PolicySet, read
from proxy.settings import Settings, masked_url


class CommandError(Exception):
    """A failure the operator can fix, told in a line or two; `euroute` exits with `code`."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def err(*parts: Any) -> None:
    print(*parts, file=sys.stderr)


def policies_or_none(settings: Settings) -> PolicySet | None:
    """The policy set, or None after saying on stderr why the files are invalid."""
    try:
        return read(settings.resolved_policy_dir(), env=settings.environment())
    except PolicyError as exc:
        err(f"policy files are invalid:\n{exc}")
        return None


def _schema_revisions(connection: Connection, url: str) -> tuple[str | None, str | None, bool]:
    """(the database's revision, euroute's newest, whether euroute knows the database's)."""
    scripts = ScriptDirectory.from_config(alembic_config(url))
    current = MigrationContext.configure(connection).get_current_revision()
    known = current is None or scripts.get_revision(current) is not None
    return current, scripts.get_current_head(), known


@contextlib.asynccontextmanager
async def engine_from(settings: Settings, *, migrated: bool = True) -> AsyncIterator[AsyncEngine]:
    """An engine on the ledger database, once it answers and (when `migrated`) holds the schema
    this euroute expects; otherwise CommandError saying what to do."""
    where = masked_url(settings.database_url)
    url = make_url(settings.database_url)
    if (migrated and url.get_backend_name() == "sqlite" and url.database
            and url.database != ":memory:" and not Path(url.database).exists()):
        # Connecting would create an empty file.
        raise CommandError(f"no database at {url.database}: run `euroute migrate` to create it")
    engine = make_engine(settings.database_url)
    try:
        try:
            async with engine.connect() as conn:
                current, head, known = await conn.run_sync(_schema_revisions,
                                                               settings.database_url)
        except (OSError, TimeoutError, DBAPIError) as exc:
            raise CommandError(f"cannot open the database {where}: {reason(exc)}") from None
        if migrated and current != head:
            if not known:
                raise CommandError(f"the database {where} is at schema revision {current}, which "
                                   "this euroute does not know: upgrade euroute")
            raise CommandError(f"the database {where} is at schema revision {current or 'none'}, "
                               f"not {head}: run `euroute migrate`")
        yield engine
    finally:
        await engine.dispose()


def reason(exc: BaseException) -> str:
    """A driver's complaint without its class name, SQL or documentation link."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        exc = exc.orig
    text = str(exc).strip().split("\n", 1)[0]
    return text.rsplit(">: ", 1)[-1] or type(exc).__name__


def positive(text: str) -> int:
    """An argparse type: a whole number from 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def _show(rows: list[dict[str, Any]], fmt: str) -> None:
    print(report.render(rows, fmt).rstrip("\n"))


def _known(settings: Settings) -> dict[str, set[str]]:
    """Filter values the policy files name (none when the files cannot be read)."""
    try:
        p = read(settings.resolved_policy_dir(), env=settings.environment())
    except PolicyError:
        return {}
    return {"app": set(p.apps), "model": set(p.by_model), "policy": set(p.policies),
            "route": {r.id for r in p.catalog.routes}}


async def _window(args: argparse.Namespace, settings: Settings, engine: AsyncEngine) -> Window:
    """The range and filters asked for, refused when they cannot match anything: a range that
    ends before it starts, or a value neither the policy files nor the ledger know (which
    would otherwise print "(no rows)" as if it were an answer)."""
    window = Window(start=args.start, end=args.end,
                    **{name: getattr(args, name) for name in queries.FILTERS})
    if window.start and window.end and window.start >= window.end:
        raise CommandError(f"empty range: --from {window.start.isoformat()} is not before "
                           f"--to (which ends at {window.end.isoformat()})", 2)
    known = _known(settings)
    for name, names in (("app", "apps"), ("model", "models"), ("route", "routes"),
                        ("policy", "policies")):
        value = getattr(window, name)
        if value is None or value in known.get(name, ()) or await queries.seen(engine, name,
                                                                                value):
            continue
        listed = sorted(known.get(name, ()))
        raise CommandError(f"--{name} {value!r}: no {name} of that name in the policy files or "
                           "the ledger" + (f"; {names} known: {', '.join(listed)}" if listed
                                           else ""), 2)
    return window


# -- the queries ------------------------------------------------------------------------------

async def usage(args: argparse.Namespace, settings: Settings) -> int:
    async with engine_from(settings) as engine:
        window = await _window(args, settings, engine)
        rows = await queries.usage(engine, window, group_by=args.group_by)
    _show(rows, args.format)
    return 0


async def decisions(args: argparse.Namespace, settings: Settings) -> int:
    async with engine_from(settings) as engine:
        window = await _window(args, settings, engine)
        rows = await queries.decisions(engine, window, group_by=args.group_by)
    _show(rows, args.format)
    return 0


async def decision(args: argparse.Namespace, settings: Settings) -> int:
    async with engine_from(settings) as engine:
        found = await queries.find(engine, args.id)
    if found is None:
        err(f"no decision or request {args.id}")
        return 1
    print(report.to_json(found).decode())
    return 0


async def transfers(args: argparse.Namespace, settings: Settings) -> int:
    async with engine_from(settings) as engine:
        window = await _window(args, settings, engine)
        found = await providers.transfers(engine, window, limit=args.limit)
    if args.format == "json":
        print(report.to_json(found).decode())
    elif args.format == "csv":
        print("".join(report.csv_lines(found["data"], providers.TRANSFER_COLUMNS)), end="")
    else:
        print(f"{found['checked']} forwarded requests checked, {found['outside_eea']} processed "
              "or stored outside the EEA or under a transfer mechanism"
              + (f" (first {len(found['data'])} listed)" if found["truncated"] else ""))
        if found["data"]:
            print(report.table(found["data"]))
    return 0


async def provider_copies(args: argparse.Namespace, settings: Settings) -> int:
    as_of = args.as_of or dt.datetime.now(dt.UTC).date()
    async with engine_from(settings) as engine:
        window = await _window(args, settings, engine)
        rows = await providers.retention(engine, window, as_of=as_of)
    if args.format == "table":
        print(f"requests whose copy at the provider may still exist on {as_of}:")
    _show(rows, args.format)
    return 0


async def contracts(args: argparse.Namespace, settings: Settings) -> int:
    async with engine_from(settings) as engine:
        window = await _window(args, settings, engine)
        rows = await providers.contracts(engine, window)
    _show(rows, args.format)
    return 0


async def processing_records(args: argparse.Namespace, settings: Settings) -> int:
    if (policies := policies_or_none(settings)) is None:
        return 2
    async with engine_from(settings) as engine:
        window = await _window(args, settings, engine)
        document = await records.records(engine, policies, window)
    if args.format == "json":
        print(report.to_json(document).decode())
    elif args.format == "csv":
        print("".join(report.csv_lines(map(records.flat, document["records"]))), end="")
    else:
        print("".join(records.markdown(document)), end="")
    return 0


async def export(args: argparse.Namespace, settings: Settings) -> int:
    chunks = report.csv_chunks if args.format == "csv" else report.jsonl_chunks
    async with engine_from(settings) as engine:
        window = await _window(args, settings, engine)
        async with contextlib.aclosing(queries.export(engine, window)) as rows:
            async for chunk in chunks(queries.EXPORT_COLUMNS, rows):
                sys.stdout.write(chunk if isinstance(chunk, str) else chunk.decode())
    sys.stdout.flush()
    return 0


async def key_events(args: argparse.Namespace, settings: Settings) -> int:
    async with engine_from(settings) as engine:
        rows = await keys.events(engine, args.start, args.end)
    _show(rows, args.format)
    return 0


async def verify(args: argparse.Namespace, settings: Settings) -> int:
    try:
        keyring = settings.keyring()
        anchored = anchors.read(args.anchors) if args.anchors else None
    except (ValueError, OSError) as exc:
        err(str(exc))
        return 2
    async with engine_from(settings) as engine:
        result = await queries.verify(engine, keyring, anchored)
    if args.format == "json":
        print(report.to_json(result).decode())
        return 0 if result["ok"] else 1
    if result["ok"]:
        print(f"OK: {result['rows']} rows in {result['writers']} chains verified"
              + (f" against {result['anchors']} anchors" if anchored is not None else ""))
    else:
        print(f"FAILED after {result['rows']} good rows: {result['finding']}")
    if result["unkeyed_rows"]:
        print(f"NOTE: {result['unkeyed_rows']} rows are unkeyed (written before keyed "
              "chains): anyone with database access could have rewritten them")
    if result["dev_key"]:
        print("NOTE: verified with the public development key: it proves nothing against "
              "database writers (set EUROUTE_LEDGER_KEY)")
    if result["dead_letters"]:
        print(f"DEAD LETTERS: {result['dead_letters']} rows the database refused are kept in "
              "ledger_dead_letters, outside the chains")
    return 0 if result["ok"] else 1


# -- retention, erasure, backup ---------------------------------------------------------------

async def purge(args: argparse.Namespace, settings: Settings) -> int:
    before = args.before or dt.datetime.now(dt.UTC).date()
    try:
        keyring = settings.keyring()
        async with engine_from(settings) as engine:
            counts = await retention.purge(engine, before, keyring, dry_run=args.dry_run)
    except ValueError as exc:
        err(f"--before {exc}" if "future" in str(exc) else str(exc))
        return 2
    rows = [{"writer_id": w, "rows": n} for w, n in counts.items()]
    if args.format != "table":
        _show(rows, args.format)
        return 0
    print(f"{'would delete' if args.dry_run else 'deleted'} {sum(counts.values())} rows with "
          f"retain_until before {before}"
          + (", leaving a tombstone for each" if counts and not args.dry_run else ""))
    if rows:
        print(report.table(rows))
    return 0


async def erase(args: argparse.Namespace, settings: Settings) -> int:
    try:
        key = settings.pseudonym_secret()
    except ValueError as exc:
        err(str(exc))
        return 2
    if key == DEV_PSEUDONYM_SECRET:
        err("EUROUTE_PSEUDONYM_KEY is not set: looking for the pseudonym the proxy makes in "
            "development, with the public development key")
    async with engine_from(settings) as engine:
        touched, behind = await retention.erase(
            engine, key, args.subject,
            grace_s=settings.ledger_grace_s, timeout_s=args.timeout)
    if not touched and not behind:
        # Success here would tell a data subject their data is gone when nothing was found.
        raise CommandError("no ledger row carries this subject's pseudonym: check the id the app "
                           "sent, and that EUROUTE_PSEUDONYM_KEY is the proxy's key")
    print(f"erased the subject's pseudonym from {touched} rows")
    if behind:
        err(f"incomplete: {len(behind)} running writers did not acknowledge within "
            f"{args.timeout:g}s ({', '.join(behind)}); run erase again")
        return 1
    return 0


async def backup(args: argparse.Namespace, settings: Settings) -> int:
    url = make_url(settings.database_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        err("euroute backup copies a SQLite ledger; for PostgreSQL use pg_dump "
            "(README, Ledger: Backups)")
        return 2
    if args.path.exists():
        err(f"{args.path} exists: backup writes a new file only")
        return 2
    await asyncio.to_thread(_sqlite_backup, url.database, args.path)
    print(f"backed up {url.database} to {args.path}")
    return 0


def _sqlite_backup(source: str, dest: Path) -> None:
    """SQLite's online backup API: a consistent copy that includes what is still in the WAL,
    taken while the proxy keeps writing."""
    with contextlib.closing(sqlite3.connect(source)) as src, \
            contextlib.closing(sqlite3.connect(dest)) as out:
        src.backup(out)


# -- the parsers ------------------------------------------------------------------------------

def _filters(p: argparse.ArgumentParser, formats: tuple[str, ...] = report.FORMATS,
             default: str = "table") -> None:
    p.add_argument("--from", dest="start", type=queries.instant,
                   help="start, YYYY-MM-DD or ISO time (UTC)")
    p.add_argument("--to", dest="end", type=queries.until, help="end, inclusive for a plain date")
    for name in queries.FILTERS:
        p.add_argument(f"--{name}", help=f"only this {name}", metavar=name.upper(),
                       choices=sorted(OUTCOMES) if name == "outcome" else None)
    p.add_argument("--format", choices=formats, default=default)


def add_commands(sub: Any) -> None:
    """Add `audit`, `purge`, `erase` and `backup` to the `euroute` parser's subcommands."""
    aud = sub.add_parser("audit", help="query the ledger").add_subparsers(dest="audit_command",
                                                                        required=True)
    p = aud.add_parser("usage", help="requests, tokens and cost")
    _filters(p)
    p.add_argument("--group-by", choices=queries.GROUPS, default="app")
    p.set_defaults(run=usage)
    p = aud.add_parser("decisions", help="denials by policy, requirement, app, ...")
    _filters(p)
    p.add_argument("--group-by", choices=queries.DECISION_GROUPS, default="policy")
    p.set_defaults(run=decisions)
    p = aud.add_parser("decision", help="one decision (or request) by id")
    p.add_argument("id")
    p.set_defaults(run=decision)
    p = aud.add_parser("transfers", help="requests processed or stored outside the EEA")
    _filters(p)
    p.add_argument("--limit", type=positive, default=1000, help="list at most this many")
    p.set_defaults(run=transfers)
    p = aud.add_parser("retention", help="requests a provider may still hold a copy of")
    _filters(p)
    p.add_argument("--as-of", type=dt.date.fromisoformat, help="YYYY-MM-DD, default today")
    p.set_defaults(run=provider_copies)
    p = aud.add_parser("contracts", help="which requests relied on which ZDR grant or DPA")
    _filters(p)
    p.set_defaults(run=contracts)
    p = aud.add_parser("records", help="GDPR Art. 30 records of processing, per route")
    _filters(p, ("markdown", "json", "csv"), "markdown")
    p.set_defaults(run=processing_records)
    p = aud.add_parser("export", help="raw ledger rows, streamed (never a salt or key hash)")
    _filters(p, ("csv", "json"), "csv")
    p.set_defaults(run=export)
    p = aud.add_parser("key-events", help="every key created or revoked: who, when, which")
    p.add_argument("--from", dest="start", type=queries.instant, help="start (UTC)")
    p.add_argument("--to", dest="end", type=queries.until, help="end, inclusive for a plain date")
    p.add_argument("--format", choices=report.FORMATS, default="table")
    p.set_defaults(run=key_events)
    p = aud.add_parser("verify", help="check the hash chains; non-zero exit on tampering")
    p.add_argument("--anchors", type=Path,
                   help="anchor file or directory (EUROUTE_ANCHOR_DIR) to check against")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(run=verify)

    p = sub.add_parser("purge", help="delete ledger rows past their retain-until date")
    p.add_argument("--before", type=dt.date.fromisoformat,
                   help="delete rows to keep until before this date (default today)")
    p.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    p.add_argument("--format", choices=report.FORMATS, default="table")
    p.set_defaults(run=purge)
    p = sub.add_parser("erase", help="remove a data subject's pseudonym (GDPR Art. 17)")
    p.add_argument("--subject", required=True, help="the end-user id the app sent")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for running proxies to acknowledge")
    p.set_defaults(run=erase)
    p = sub.add_parser("backup", help="copy a SQLite ledger, WAL included, while it runs")
    p.add_argument("path", type=Path, help="the new file")
    p.set_defaults(run=backup)
