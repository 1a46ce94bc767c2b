"""The auditors' dashboard in a real headless Chromium (Debian's `chromium`, driven by
Playwright): sign-in, every section showing the seeded ledger, nothing fetched from anywhere
but euroute, no console error; the screenshot in the README comes from here."""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from proxy.ui import COOKIE
from tests.conftest import Proxy, _migrate, copy_policies, new_database, proxy_settings, run
from tests.made_rows import ROUTE, made_row, write

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
NOW = dt.datetime.now(dt.UTC)


def _seed() -> list[dict[str, object]]:
    """Two apps spending on two days each, one route outside the EEA, two denials."""
    rows = []
    for days_ago, app, tokens in ((1, "payroll-bot", 1000), (3, "payroll-bot", 3000),
                                  (2, "support-bot", 2000), (5, "support-bot", 500)):
        rows.append(made_row(app, created_at=NOW - dt.timedelta(days=days_ago),
                             prompt_tokens=tokens, completion_tokens=tokens,
                             cost_nanos=tokens * 500 + tokens * 1500))
    rows.append(made_row("support-bot", created_at=NOW - dt.timedelta(days=2),
                         route="us-east-template", provider="acme-cloud",
                         inference_location="US", storage_location="US",
                         transfer_mechanism="scc", cost_nanos=9000))
    for _ in range(2):
        rows.append(made_row("hr-assistant", policy="eu-strict", outcome="denied", status=403,
                             route=None, provider=None, currency=None, prompt_tokens=0,
                             completion_tokens=0, cost_nanos=0, provider_copy_gone_on=None,
                             provider_retention_days=None,
                             failed_requirements="enabled,zero_data_retention"))
    return rows


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    tmp = tmp_path_factory.mktemp("ui")
    url, drop = new_database("sqlite", tmp)
    run(_migrate(url))
    run(write(url, _seed()))
    with Proxy(proxy_settings(url, copy_policies(tmp / "policies"))) as server:
        yield server
    drop()


def test_session_cookie_is_checked(dashboard: Proxy) -> None:
    auditor = dashboard.key("compliance", "eu-standard", "auditor")
    with httpx.Client(base_url=dashboard.origin) as http:
        r = http.post("/ui/login", data={"key": auditor})
        assert r.status_code == 303 and r.headers["location"] == "/ui"
        cookie = r.cookies[COOKIE]
        assert auditor not in cookie and auditor not in r.headers["set-cookie"]
        assert {"httponly", "samesite=strict", "path=/ui"} <= {
            part.strip().lower() for part in r.headers["set-cookie"].split(";")}
        signed_in = http.get("/ui")
        assert 'id="spend"' in signed_in.text
        assert "script-src" not in signed_in.headers["content-security-policy"]
        assert "default-src 'none'" in signed_in.headers["content-security-policy"]
        key_id, expires, mac = cookie.split(".")
        for forged in (f"{key_id}.{int(expires) + 3600}.{mac}", f"{key_id}.{expires}.{'0' * 64}",
                       f"{key_id}.{int(NOW.timestamp()) - 1}.{mac}"):
            http.cookies.set(COOKIE, forged, path="/ui")
            assert 'id="spend"' not in http.get("/ui").text, forged
        # Another site's form cannot sign anyone in.
        r = http.post("/ui/login", data={"key": auditor}, headers={"origin": "https://evil.test"})
        assert r.status_code == 403 and COOKIE not in r.cookies


@pytest.mark.skipif(not Path(CHROMIUM).exists() or shutil.which("chromium") is None,
                    reason="Debian's chromium is not installed (.ci/run installs it)")
def test_dashboard_in_chromium(dashboard: Proxy, tmp_path: Path) -> None:
    from playwright.sync_api import Request, Route, sync_playwright

    auditor = dashboard.key("compliance", "eu-standard", "auditor")
    app_key = dashboard.key("payroll-bot", "eu-standard", "app")
    outside: list[str] = []
    requested: list[str] = []
    errors: list[str] = []

    def local_only(route: Route, request: Request) -> None:
        if urllib.parse.urlsplit(request.url).hostname != "127.0.0.1":
            outside.append(request.url)
            route.abort()
        else:
            route.continue_()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = browser.new_context(viewport={"width": 1240, "height": 900})
        context.route("**/*", local_only)
        page = context.new_page()
        page.on("request", lambda r: requested.append(r.url))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))

        page.goto(f"{dashboard.origin}/ui")
        assert page.get_attribute("#key", "type") == "password"
        page.fill("#key", app_key)
        page.click("button[type=submit]")
        assert "cannot open the dashboard" in page.inner_text("[role=alert]")
        assert context.cookies() == []
        # The refusal is a 403 page, which Chromium reports; nothing else may be reported.
        assert [e for e in errors if "403 (Forbidden)" not in e] == []
        errors.clear()

        page.fill("#key", auditor)
        page.click("button[type=submit]")
        page.wait_for_selector("#spend")
        (cookie,) = context.cookies()
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert auditor not in cookie["value"]

        spend = page.inner_text("#spend")
        for text in ("payroll-bot", "support-bot", "hr-assistant", "TOTAL", "0.013009000",
                     "0.008000000"):
            assert text in spend, text
        assert page.locator("#spend svg polyline").count() >= 4  # two apps, two routes
        denials = page.inner_text("#denials")
        assert "eu-strict" in denials and "zero_data_retention" in denials
        assert "enabled" not in denials
        locations = page.inner_text("#locations")
        assert "FR (EU)" in locations and "US (third country)" in locations
        assert "us-east-template" in locations and "scc" in locations
        retention = page.inner_text("#retention")
        assert "mistral" in retention and ROUTE in retention and "acme-cloud" in retention
        # The seeded rows' chain, and the proxy's own writer's (empty) one.
        assert re.search(r"Verified: 7 rows in \d+ hash chains?, intact\.",
                         page.inner_text("#integrity"))
        page.click("#policies summary:has-text('eu-strict')")
        policies = page.inner_text("#policies")
        assert "zero_data_retention" in policies and "FAIL" in policies

        # The README's picture, refreshed on request only: a test run leaves the tree clean.
        shot = os.environ.get("EUROUTE_SCREENSHOT")
        page.screenshot(path=shot or str(tmp_path / "dashboard.png"), full_page=True)

        page.click("header button")
        page.wait_for_selector("#key")
        assert context.cookies() == []
        browser.close()

    assert outside == []
    assert not [u for u in requested if auditor in u or app_key in u]
    assert errors == []
