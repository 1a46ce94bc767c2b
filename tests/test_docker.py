"""The Dockerfile's structure, read with Docker's own parser (no container engine here):
a slim official Python base, the wheel built in the first stage, nothing but the installed
virtualenv in the last, a numeric non-root user, nothing written outside /tmp, `euroute serve`
by default."""

from __future__ import annotations

import re
from pathlib import Path

import dockerfile
import pytest
from docker.utils.build import PatternMatcher

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = dockerfile.parse_file(str(ROOT / "Dockerfile"))
BUILD_TOOLS = re.compile(r"\b(apt-get|apk|gcc|cc|make|build-essential|pip wheel|python -m build|"
                         r"pip install|hatch)\b")


def stages() -> list[list[dockerfile.Command]]:
    out: list[list[dockerfile.Command]] = []
    for command in COMMANDS:
        if command.cmd == "FROM":
            out.append([])
        if out:
            out[-1].append(command)
    return out


def args() -> dict[str, str]:
    """Global ARG defaults (before the first FROM)."""
    found = {}
    for command in COMMANDS:
        if command.cmd == "FROM":
            break
        if command.cmd == "ARG":
            name, _, default = command.value[0].partition("=")
            found[name] = default
    return found


def base_image(stage: list[dockerfile.Command]) -> str:
    image = stage[0].value[0]
    return re.sub(r"\$\{(\w+)\}", lambda m: args()[m.group(1)], image)


def env(stage: list[dockerfile.Command]) -> dict[str, str]:
    found: dict[str, str] = {}
    for command in stage:
        if command.cmd == "ENV":
            pairs = command.value
            found.update(zip(pairs[::2], pairs[1::2], strict=True))
    return found


def one(stage: list[dockerfile.Command], cmd: str) -> dockerfile.Command:
    (found,) = [c for c in stage if c.cmd == cmd]
    return found


def test_two_stages_on_a_slim_official_python():
    build, final = stages()
    assert one(build, "FROM").value[1:] == ("AS", "build")
    for stage in (build, final):
        repository, _, tag = base_image(stage).partition(":")
        assert repository == "python"  # the Docker official image
        assert re.fullmatch(r"3\.1[1-9]-slim(-\w+)?", tag), tag


def test_first_stage_builds_the_wheel_and_installs_it():
    build, _ = stages()
    run = " ".join(c.value[0] for c in build if c.cmd == "RUN")
    assert "pip wheel --no-deps --wheel-dir /dist ." in run
    assert "/opt/euroute/bin/pip install /dist/euroute-*.whl" in run
    copied = {c.value[0].rstrip("/") for c in build if c.cmd == "COPY"}
    # What the wheel is built from: the package, and what hatch force-includes in it.
    assert {"proxy", "migrations", "policies"} <= copied


def test_final_stage_holds_no_build_tools():
    _, final = stages()
    for command in final:
        if command.cmd == "RUN":
            assert not BUILD_TOOLS.search(command.value[0]), command.original
    (copy,) = [c for c in final if c.cmd == "COPY"]
    assert copy.flags == ("--from=build",) and copy.value == ("/opt/euroute", "/opt/euroute")


def test_runs_as_a_numeric_non_root_user():
    _, final = stages()
    user, _, group = one(final, "USER").value[0].partition(":")
    assert user.isdigit() and int(user) != 0
    assert not group or (group.isdigit() and int(group) != 0)
    # The same uid the chart's securityContext names.
    assert user == "10001"


def test_writes_nothing_outside_tmp():
    """With a read-only root filesystem and an emptyDir at /tmp: no bytecode written at import,
    the home and temporary directories and the default SQLite file under /tmp."""
    _, final = stages()
    variables = env(final)
    assert variables["PYTHONDONTWRITEBYTECODE"] == "1"
    assert variables["HOME"] == "/tmp" and variables["TMPDIR"] == "/tmp"
    assert variables["EUROUTE_DATABASE_URL"].endswith(":////tmp/euroute.db")
    assert variables["PATH"].startswith("/opt/euroute/bin:")


def test_default_command_is_euroute_serve_on_all_interfaces():
    _, final = stages()
    entrypoint, cmd = one(final, "ENTRYPOINT"), one(final, "CMD")
    assert entrypoint.json and cmd.json  # exec form: euroute is PID 1 and receives SIGTERM
    argv = [*entrypoint.value, *cmd.value]
    assert argv[:2] == ["euroute", "serve"]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert argv[argv.index("--port") + 1] == "8080"
    assert one(final, "EXPOSE").value == ("8080",)


def test_version_label_is_the_package_version():
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    _, final = stages()
    assert one(final, "ARG").value[0] == f"VERSION={version.group(1)}"


def test_dockerignore_sends_what_the_build_copies():
    build, _ = stages()
    copied = [source for c in build if c.cmd == "COPY" for source in c.value[:-1]]
    files = [path.relative_to(ROOT).as_posix() for source in copied
             for path in ([ROOT / source] if (ROOT / source).is_file()
                          else (ROOT / source).rglob("*.*"))
             if "__pycache__" not in path.parts]
    assert len(files) > 20 and all(_sent(f) for f in files), [f for f in files if not _sent(f)]


@pytest.mark.parametrize("path", [".git/HEAD", ".venv/bin/python", "tests/conftest.py",
                                  "euroute.db", ".env", "proxy/__pycache__/app.cpython-311.pyc"])
def test_dockerignore_keeps_the_rest_out(path):
    assert not _sent(path)


def _sent(path: str) -> bool:
    """Whether the build context holds `path`, by docker-py's reading of .dockerignore."""
    lines = (line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines())
    return not PatternMatcher([r for r in lines if r and not r.startswith("#")]).matches(path)


def test_readme_gives_the_build_command():
    readme = (ROOT / "README.md").read_text()
    assert "docker build -t euroute:0.1.0 ." in readme
