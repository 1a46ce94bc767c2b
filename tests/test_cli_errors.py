"""`euroute` as an operator meets it when something is wrong: the real command in a subprocess,
a line or two on stderr naming the problem and what to do, a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from proxy import __version__
from tests.conftest import PG_ADMIN, REPO, _pg, copy_policies, run
from tests.made_rows import made_row, write

EUROUTE = str(Path(sys.executable).with_name("euroute"))
SQLITE_FORM = "sqlite+aiosqlite:///PATH"


def euroute(*argv: str, cwd: Path, stdout: int | None = subprocess.PIPE,
            **env: str) -> subprocess.CompletedProcess[str]:
    """The installed console script, in `cwd` (no .env there), with `env` added."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EUROUTE_")}
    return subprocess.run([EUROUTE, *argv], cwd=cwd, env={**clean, **env}, stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=60)


def refused(result: subprocess.CompletedProcess[str], *needles: str, code: int | None = None,
            lines: int = 5) -> str:
    """The command failed in at most `lines` lines of stderr, all of `needles` among them."""
    err = result.stderr
    assert result.returncode != 0, (result.stdout, err)
    if code is not None:
        assert result.returncode == code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= lines, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def here(tmp_path: Path) -> Path:
    copy_policies(tmp_path / "policies")
    return tmp_path


def test_version(here: Path) -> None:
    result = euroute("--version", cwd=here)
    assert result.returncode == 0 and result.stdout.strip() == f"euroute {__version__}"
    # The one in proxy/__init__.py and the one in pyproject.toml name the same release.
    assert f'\nversion = "{__version__}"\n' in (REPO / "pyproject.toml").read_text()


@pytest.mark.parametrize("argv", [["migrate"], ["keys", "list"], ["audit", "usage"],
                                  ["serve", "--port", "1"]])
def test_unreachable_database(here: Path, argv: list[str]) -> None:
    url = "postgresql+asyncpg://postgres:hunter2@127.0.0.1:9/euroute"  # port 9: discard, closed
    err = refused(euroute(*argv, cwd=here, EUROUTE_DATABASE_URL=url), "cannot open the database",
                  "127.0.0.1:9", code=1)
    assert "hunter2" not in err and "***" in err


def test_missing_postgresql_database(here: Path) -> None:
    url = PG_ADMIN.rsplit("/", 1)[0] + f"/euroute_absent_{secrets.token_hex(4)}"
    refused(euroute("keys", "list", cwd=here, EUROUTE_DATABASE_URL=url),
            "cannot open the database", "does not exist", code=1)


@pytest.mark.parametrize("url, named", [("sqlite:///ledger.db", "not a sqlite URL"),
                                        ("mysql://u@h/db", "not a mysql URL"),
                                        ("ledger.db", "EUROUTE_DATABASE_URL")])
def test_wrong_driver_or_url_form(here: Path, url: str, named: str) -> None:
    refused(euroute("audit", "usage", cwd=here, EUROUTE_DATABASE_URL=url),
            "invalid setting EUROUTE_DATABASE_URL", SQLITE_FORM, named, code=2)


def test_unmigrated_sqlite_database_is_not_created(here: Path) -> None:
    url = f"sqlite+aiosqlite:///{here}/ledger.db"
    for argv in (["audit", "usage"], ["keys", "create", "--app", "a", "--policy", "eu-standard"],
                 ["audit", "verify"]):
        refused(euroute(*argv, cwd=here, EUROUTE_DATABASE_URL=url), "run `euroute migrate`",
                code=1)
    assert not (here / "ledger.db").exists()
    (here / "ledger.db").touch()  # an empty file: a database without euroute's tables
    refused(euroute("audit", "usage", cwd=here, EUROUTE_DATABASE_URL=url),
            "schema revision none", "run `euroute migrate`", code=1)
    migrated = euroute("migrate", cwd=here, EUROUTE_DATABASE_URL=url)
    assert migrated.returncode == 0, migrated.stderr
    assert euroute("audit", "usage", cwd=here, EUROUTE_DATABASE_URL=url).returncode == 0


def test_unmigrated_postgresql_database(here: Path) -> None:
    name = f"euroute_test_{secrets.token_hex(6)}"
    run(_pg(f'CREATE DATABASE "{name}"'))
    try:
        url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
        refused(euroute("audit", "decisions", cwd=here, EUROUTE_DATABASE_URL=url),
                "schema revision none", "run `euroute migrate`", code=1)
        refused(euroute("serve", cwd=here, EUROUTE_DATABASE_URL=url,
                        EUROUTE_MIGRATE_ON_START="false"), "run `euroute migrate`", code=1)
    finally:
        run(_pg(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def test_invalid_settings_are_named_with_their_allowed_values(here: Path) -> None:
    err = refused(euroute("keys", "list", cwd=here, EUROUTE_LOG_LEVEL="verbose",
                          EUROUTE_UPSTREAM_TRANSPORT="carrier-pigeon"),
                  "invalid setting EUROUTE_LOG_LEVEL", "'debug'", "'verbose'",
                  "invalid setting EUROUTE_UPSTREAM_TRANSPORT", "or 'httpx'", code=2)
    assert len(err.splitlines()) == 2
    refused(euroute("serve", cwd=here, EUROUTE_MAX_BODY_BYTES="lots"),
            "invalid setting EUROUTE_MAX_BODY_BYTES", code=2)
    # A setting that may hold a secret is named, its value is not echoed.
    err = refused(euroute("keys", "list", cwd=here,
                          EUROUTE_DATABASE_URL="mysql://root:hunter2@db/ledger"), code=2)
    assert "hunter2" not in err


def test_settings_from_a_dotenv_file_are_checked_too(here: Path) -> None:
    (here / ".env").write_text("EUROUTE_LOG_FORMAT=yaml\n")
    refused(euroute("keys", "list", cwd=here), "invalid setting EUROUTE_LOG_FORMAT",
            "'text' or 'json'", code=2)


@pytest.fixture(scope="module")
def ledger_with_rows(tmp_path_factory: pytest.TempPathFactory) -> str:
    where = tmp_path_factory.mktemp("ledger")
    url = f"sqlite+aiosqlite:///{where}/ledger.db"
    assert euroute("migrate", cwd=where, EUROUTE_DATABASE_URL=url).returncode == 0
    run(write(url, [made_row("piped") for _ in range(200)]))
    return url


def test_closed_pipe_ends_quietly(here: Path, ledger_with_rows: str) -> None:
    """`euroute audit export | head`: the reader is gone before the export is written."""
    for argv in (["audit", "export"], ["audit", "usage", "--group-by", "day"],
                 ["policy", "check"]):
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            result = euroute(*argv, cwd=here, stdout=write_end,
                             EUROUTE_DATABASE_URL=ledger_with_rows)
        finally:
            os.close(write_end)
        assert result.returncode == 141 and result.stderr == "", result.stderr


def test_invalid_port_and_workers(here: Path) -> None:
    refused(euroute("serve", "--port", "99999", cwd=here), "--port", "99999",
            "not a TCP port (0 to 65535)", code=2)
    refused(euroute("serve", "--workers", "0", cwd=here), "--workers", code=2)


def test_unknown_filter_values(here: Path, ledger_with_rows: str) -> None:
    url = ledger_with_rows
    refused(euroute("audit", "usage", "--outcome", "bogus", cwd=here, EUROUTE_DATABASE_URL=url),
            "--outcome", "'bogus'", "denied", code=2)
    refused(euroute("audit", "transfers", "--route", "nowhere", cwd=here,
                    EUROUTE_DATABASE_URL=url),
            "--route 'nowhere'", "mistral-eu-magistral-small", code=2)
    refused(euroute("audit", "usage", "--policy", "eu-lax", cwd=here, EUROUTE_DATABASE_URL=url),
            "--policy 'eu-lax'", "eu-strict", code=2)
    # Known to the ledger though not to the policy files (an app's old rows): a valid filter.
    found = euroute("audit", "usage", "--app", "piped", "--format", "csv", cwd=here,
                    EUROUTE_DATABASE_URL=url)
    assert found.returncode == 0 and "piped,200," in found.stdout
    refused(euroute("audit", "usage", "--group-by", "weekday", cwd=here), "--group-by", code=2)
    refused(euroute("audit", "transfers", "--limit", "0", cwd=here), "--limit", code=2)


def test_reversed_and_malformed_date_ranges(here: Path, ledger_with_rows: str) -> None:
    url = ledger_with_rows
    refused(euroute("audit", "usage", "--from", "2026-11-30", "--to", "2026-11-01", cwd=here,
                    EUROUTE_DATABASE_URL=url), "empty range", "--from", code=2)
    refused(euroute("audit", "export", "--from", "2026-11-30T12:00", "--to", "2026-11-30T12:00",
                    cwd=here, EUROUTE_DATABASE_URL=url), "empty range", code=2)
    refused(euroute("audit", "usage", "--from", "30/11/2026", cwd=here), "--from", code=2)
    # One whole day, given as from and to the same date, is a valid range.
    same_day = euroute("audit", "usage", "--from", "2026-11-30", "--to", "2026-11-30",
                       cwd=here, EUROUTE_DATABASE_URL=url)
    assert same_day.returncode == 0, same_day.stderr


def test_erase_of_an_unknown_subject_is_not_a_success(here: Path, ledger_with_rows: str) -> None:
    refused(euroute("erase", "--subject", "nobody", cwd=here,
                    EUROUTE_DATABASE_URL=ledger_with_rows, EUROUTE_PSEUDONYM_KEY="k"),
            "no ledger row carries this subject", code=1)
