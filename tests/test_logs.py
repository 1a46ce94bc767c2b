"""What `euroute serve` says in its log, and what it reads from `.env`: a real process, the
fake Mistral upstream, real requests."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy import __version__
from proxy.ledger.tables import ledger
from tests.conftest import PSEUDONYM_KEY, copy_policies, ledger_rows, run
from tests.fake_mistral import UPSTREAM_KEY, FakeMistral
from tests.test_cli_errors import EUROUTE
from tests.test_serve import free_port

MODEL = "magistral-small-2509"


class Served:
    def __init__(self, process: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.process, self.url, self.log = process, url, log

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines()

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines() if line.startswith("{")]

    def wait_for(self, needle: str) -> None:
        deadline = time.monotonic() + 10
        while needle not in self.log.read_text():
            assert time.monotonic() < deadline, f"{needle!r} never logged:\n{self.log.read_text()}"
            time.sleep(0.02)

    def key(self, app: str, policy: str = "eu-standard", role: str = "app") -> str:
        created = subprocess.run([EUROUTE, "keys", "create", "--app", app, "--policy", policy,
                                  "--role", role], cwd=self.cwd, env=self.env,
                                 capture_output=True, text=True, check=True)
        return created.stdout.strip()

    cwd: Path
    env: dict[str, str]


@pytest.fixture
def serve(tmp_path: Path, db_url: str) -> Iterator[Any]:
    started: list[Served] = []

    def start(cwd: Path | None = None, **env: str) -> Served:
        cwd = cwd or tmp_path
        copy_policies(cwd / "policies")
        clean = {k: v for k, v in os.environ.items()
                 if not k.startswith(("EUROUTE_", "MISTRAL_"))}
        full = {**clean, "EUROUTE_DATABASE_URL": db_url, "EUROUTE_KEY_REFRESH_S": "0.1", **env}
        port = free_port()
        log = cwd / f"serve-{port}.log"
        with log.open("wb") as out:
            process = subprocess.Popen([EUROUTE, "serve", "--port", str(port)], cwd=cwd,
                                       env=full, stdout=out, stderr=subprocess.STDOUT)
        served = Served(process, f"http://127.0.0.1:{port}", log)
        served.cwd, served.env = cwd, full
        started.append(served)
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{served.url}/healthz").status_code == 200:
                    return served
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)

    yield start
    for served in started:
        served.process.terminate()
        served.process.wait(30)


def chat(served: Served, key: str, **extra: Any) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}
    return httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=30,
                      headers={"authorization": f"Bearer {key}"})


def test_one_json_line_per_request_and_none_from_uvicorn(serve: Any, fake: FakeMistral,
                                                         db_url: str) -> None:
    # The test server trusts every local connection, so a password can be given and ignored.
    url = db_url.replace("postgres@", "postgres:s3cret-pw@")
    served = serve(EUROUTE_LOG_FORMAT="json", MISTRAL_BASE_URL=fake.url,
                   MISTRAL_API_KEY=UPSTREAM_KEY, EUROUTE_PSEUDONYM_KEY=PSEUDONYM_KEY,
                   EUROUTE_DATABASE_URL=url)
    app = f"logged-{secrets.token_hex(3)}"
    key, strict = served.key(app), served.key(app, "eu-strict")
    secret_words = f"my-secret-prompt-{secrets.token_hex(4)}"
    sent = [chat(served, key, messages=[{"role": "user", "content": secret_words}]),
            chat(served, key, stream=True), chat(served, strict)]
    fake.fail_next(503, {"object": "error", "message": f"overloaded {secret_words}",
                         "type": "service_unavailable", "param": None, "code": "overloaded"})
    sent.append(chat(served, key))
    assert [r.status_code for r in sent] == [200, 200, 403, 503]
    for r in sent:
        served.wait_for(r.headers["x-request-id"])

    records = served.records()
    assert len(records) == len(served.lines())  # every line is JSON
    start = next(r for r in records if r["message"] == "euroute started")
    assert start["version"] == __version__ and start["policy_version"]
    assert start["ledger"] == url.replace("s3cret-pw", "***")
    assert "mistral-eu-magistral-small" in start["routes"]
    assert "selfhosted-eu-magistral-small" not in start["routes"]  # no base URL: disabled
    lines = [r for r in records if r["message"] == "request"]
    by_id = {r["request_id"]: r for r in lines}
    assert len(lines) == len(by_id) == 4 and set(by_id) == {r.headers["x-request-id"] for r in sent}
    ok, streamed, denied, failed = (by_id[r.headers["x-request-id"]] for r in sent)
    assert ok["time"].endswith("Z") and ok["level"] == "info"
    assert (ok["app"], ok["endpoint"], ok["model"], ok["route"], ok["outcome"], ok["status"]) == (
        app, "chat", MODEL, "mistral-eu-magistral-small", "ok", 200)
    assert ok["decision_id"] == sent[0].headers["x-euroute-decision-id"]
    assert ok["latency_us"] >= ok["ttfb_us"] > 0
    assert ok["prompt_tokens"] == sent[0].json()["usage"]["prompt_tokens"] > 0
    assert streamed["outcome"] == "ok" and streamed["completion_tokens"] > 0
    assert (denied["outcome"], denied["status"], denied["route"]) == ("denied", 403, None)
    assert "zero_data_retention" in denied["failed_requirements"]
    assert (failed["level"], failed["outcome"], failed["upstream_status"]) == (
        "warning", "upstream_error", 503)
    assert failed["error_code"] == "overloaded"
    text = served.log.read_text()
    assert secret_words not in text and key not in text and strict not in text
    assert UPSTREAM_KEY not in text and "HTTP/1.1" not in text  # no uvicorn access line
    assert "s3cret-pw" not in text


def test_text_lines_quote_what_could_forge_a_line(serve: Any, fake: FakeMistral) -> None:
    served = serve(MISTRAL_BASE_URL=fake.url, MISTRAL_API_KEY=UPSTREAM_KEY,
                   EUROUTE_PSEUDONYM_KEY=PSEUDONYM_KEY)
    key = served.key(f"texted-{secrets.token_hex(3)}")
    r = chat(served, key, model="fake\nINFO forged outcome=ok")
    assert r.status_code == 404
    served.wait_for(r.headers["x-request-id"])
    (line,) = [ln for ln in served.lines() if r.headers["x-request-id"] in ln]
    assert " info    request request_id=req_" in line
    assert 'model="fake\\nINFO forged outcome=ok"' in line and "outcome=model_not_found" in line
    assert not any(ln.startswith("INFO forged") for ln in served.lines())


def test_missing_credentials_are_named_and_not_ready(serve: Any, fake: FakeMistral) -> None:
    served = serve(MISTRAL_BASE_URL=fake.url)  # no MISTRAL_API_KEY, no pseudonym key
    ready = httpx.get(f"{served.url}/readyz")
    assert ready.status_code == 503
    assert {"route": "mistral-eu-magistral-small", "variable": "MISTRAL_API_KEY"} in (
        ready.json()["missing_credentials"])
    text = served.log.read_text()
    assert "an enabled route has no credential" in text and "variable=MISTRAL_API_KEY" in text
    assert "warning EUROUTE_PSEUDONYM_KEY is not set" in text


def test_upstream_refusing_the_credential_is_logged(serve: Any, fake: FakeMistral) -> None:
    served = serve(MISTRAL_BASE_URL=fake.url, MISTRAL_API_KEY="sk-wrong",
                   EUROUTE_PSEUDONYM_KEY=PSEUDONYM_KEY)
    assert httpx.get(f"{served.url}/readyz").status_code == 200
    r = chat(served, served.key(f"refused-{secrets.token_hex(3)}"))
    assert r.status_code == 502
    served.wait_for(r.headers["x-request-id"])
    (line,) = [ln for ln in served.lines() if r.headers["x-request-id"] in ln]
    assert line.split()[1] == "warning" and "status=502" in line
    assert "error_code=upstream_unavailable" in line and "HTTP 401" in line
    assert "sk-wrong" not in served.log.read_text()


def test_dotenv_supplies_provider_settings(serve: Any, fake: FakeMistral, tmp_path: Path,
                                           db_url: str) -> None:
    """MISTRAL_BASE_URL and MISTRAL_API_KEY from ./.env reach the route (README, Configuration)
    and `euroute config` shows them, the key hidden."""
    here = tmp_path / "with-env"
    here.mkdir()
    (here / ".env").write_text(f"MISTRAL_BASE_URL={fake.url}\nMISTRAL_API_KEY={UPSTREAM_KEY}\n"
                               "EUROUTE_LOG_FORMAT=json\n")
    served = serve(here, EUROUTE_PSEUDONYM_KEY=PSEUDONYM_KEY)
    assert httpx.get(f"{served.url}/readyz").status_code == 200
    r = chat(served, served.key(f"dotenv-{secrets.token_hex(3)}"))
    assert r.status_code == 200 and fake.last.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    served.wait_for(r.headers["x-request-id"])
    assert served.records()  # EUROUTE_LOG_FORMAT from .env too

    shown = subprocess.run([EUROUTE, "config", "--format", "json"], cwd=here, env=served.env,
                           capture_output=True, text=True, check=True)
    values = {row["variable"]: row["value"] for row in json.loads(shown.stdout)}
    assert values["MISTRAL_BASE_URL"] == fake.url and values["EUROUTE_LOG_FORMAT"] == "json"
    assert values["MISTRAL_API_KEY"] == values["EUROUTE_PSEUDONYM_KEY"] == "(set, hidden)"
    assert values["SELFHOSTED_API_KEY"] is None
    assert UPSTREAM_KEY not in shown.stdout and PSEUDONYM_KEY not in shown.stdout


def test_refused_keys_are_logged_and_counted_but_never_shown(serve: Any, fake: FakeMistral,
                                                             db_url: str) -> None:
    served = serve(MISTRAL_BASE_URL=fake.url, MISTRAL_API_KEY=UPSTREAM_KEY,
                   EUROUTE_PSEUDONYM_KEY=PSEUDONYM_KEY)
    app = f"stuffed-{secrets.token_hex(3)}"
    revoked, good = served.key(app), served.key(app)
    listed = subprocess.run([EUROUTE, "keys", "list", "--format", "json"], cwd=served.cwd,
                            env=served.env, capture_output=True, text=True, check=True)
    key_id = next(k["id"] for k in json.loads(listed.stdout)
                  if k["app"] == app and revoked.startswith(k["prefix"]))
    subprocess.run([EUROUTE, "keys", "revoke", key_id], cwd=served.cwd, env=served.env,
                   capture_output=True, check=True)
    unknown = "eur_" + secrets.token_urlsafe(32)
    time.sleep(0.5)  # the key cache refreshes every 0.1 s
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=served.url, timeout=30) as http:
        refused = [
            http.post("/v1/chat/completions", json=body),
            http.post("/v1/chat/completions", json=body,
                      headers={"authorization": f"Bearer {unknown}"}),
            http.post("/v1/messages", json={**body, "max_tokens": 10},
                      headers={"x-api-key": revoked}),
            http.get("/v1/audit/verify", headers={"authorization": f"Bearer {revoked}"}),
            http.post("/v1/chat/completions", json=body, headers=[
                ("authorization", f"Bearer {good}"), ("authorization", f"Bearer {unknown}")]),
            http.post("/ui/login", data={"key": unknown}),
        ]
        assert [r.status_code for r in refused] == [401] * 6
        ok = http.post("/v1/chat/completions", json=body,
                       headers={"authorization": f"Bearer {good}"})
        assert ok.status_code == 200
        scraped = http.get("/metrics").text
    served.wait_for(ok.headers["x-request-id"])
    lines = [ln for ln in served.lines() if " unauthorized " in ln]
    # Every 401 carries the request id its answer names in x-request-id.
    said = [f"request_id={r.headers['x-request-id']} " for r in refused]
    assert [ln.split(" unauthorized ")[1] for ln in lines] == [
        f"{rid}reason={reason} client=127.0.0.1 method={method} path={path}"
        for rid, (reason, method, path) in zip(said, [
            ("missing", "POST", "/v1/chat/completions"),
            ("invalid", "POST", "/v1/chat/completions"),
            ("invalid", "POST", "/v1/messages"),
            ("invalid", "GET", "/v1/audit/verify"),
            ("malformed", "POST", "/v1/chat/completions"),
            ("invalid", "POST", "/ui/login")], strict=True)]
    assert len(set(said)) == 6
    assert all(ln.split()[1] == "warning" for ln in lines)
    counted = {s.labels["reason"]: s.value
               for family in text_string_to_metric_families(scraped)
               if family.name == "euroute_unauthorized" for s in family.samples
               if s.name == "euroute_unauthorized_total"}
    assert counted == {"missing": 1, "invalid": 4, "malformed": 1}
    text = served.log.read_text()
    for presented in (revoked, unknown, good):
        assert presented not in text and presented[:10] not in text and presented[4:12] not in text
    # An unauthenticated client cannot grow the ledger: only the good request has a row.
    deadline = time.monotonic() + 10
    while not run(ledger_rows(db_url, ledger.c.request_id == ok.headers["x-request-id"])):
        assert time.monotonic() < deadline, "the good request was never recorded"
        time.sleep(0.05)
    ids = [r.headers["x-request-id"] for r in refused]
    assert not run(ledger_rows(db_url, ledger.c.request_id.in_(ids)))
