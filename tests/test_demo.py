"""`euroute demo` as a new user runs it: the real command, in an empty directory."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.test_cli_errors import EUROUTE


def demo(cwd: Path, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("EUROUTE_", "MISTRAL_"))}
    return subprocess.run([EUROUTE, "demo", *argv], cwd=cwd, env={**clean, **env},
                          capture_output=True, text=True, timeout=120)


def test_demo_leaves_no_keys_behind(tmp_path: Path) -> None:
    """Its keys are real keys: by default they go to a temporary database, deleted after,
    even when EUROUTE_DATABASE_URL names the operator's ledger."""
    ledger = tmp_path / "operators-ledger.db"
    result = demo(tmp_path, EUROUTE_DATABASE_URL=f"sqlite+aiosqlite:///{ledger}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "HTTP 200 via route mistral-eu-magistral-small" in result.stdout
    assert "HTTP 403 no_compliant_route" in result.stdout
    assert "hash chains (euroute audit verify): OK, 3 rows" in result.stdout
    assert list(tmp_path.iterdir()) == []
    assert "Traceback" not in result.stderr and "EUROUTE_PSEUDONYM_KEY" not in result.stderr


def test_demo_keeps_its_ledger_when_asked(tmp_path: Path) -> None:
    kept = tmp_path / "demo.db"
    url = f"sqlite+aiosqlite:///{kept}"
    result = demo(tmp_path, "--database-url", url)
    assert result.returncode == 0, result.stdout + result.stderr
    listed = subprocess.run([EUROUTE, "keys", "list", "--format", "csv"], cwd=tmp_path,
                            env={**os.environ, "EUROUTE_DATABASE_URL": url},
                            capture_output=True, text=True, check=True)
    assert {"demo", "hr-assistant"} <= {line.split(",")[2] for line in
                                        listed.stdout.splitlines()[1:]}
