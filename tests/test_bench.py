"""The benchmarks stay runnable: each runs once in its smoke mode (numbers are not judged here;
`bench/README.md` has them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SMOKES = {
    "proxy": ["bench/run.py", "--smoke"],
    "proxy-postgresql": ["bench/run.py", "--smoke", "--ledger", "postgresql", "--out", "{tmp}"],
    "ledger": ["bench/ledger.py", "--rows", "3000", "--no-paced", "--intents", "300",
               "--out", "{tmp}"],
    "audit": ["bench/audit_summary.py", "--smoke"],
    "relay": ["bench/relay.py", "--smoke"],
}


@pytest.mark.parametrize("name", SMOKES)
def test_benchmark_smoke(name: str, tmp_path: Path) -> None:
    argv = [a.format(tmp=tmp_path) for a in SMOKES[name]]
    done = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
