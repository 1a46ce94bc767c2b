"""The auditors' dashboard at GET /ui: spend, denials, where data went, provider copies still
open, the ledger's integrity and every policy's explain table, from the audit query layer.

Signing in: the auditor key is POSTed once from a password field and never appears in a URL.
The answer sets an HttpOnly, SameSite=Strict cookie holding `key id . expiry . MAC`, the MAC
keyed with that key's SHA-256 (which only the server holds). Chosen over keeping the key in
sessionStorage and sending it from a script: no script on the page can read the cookie or the
key, the pages need no script at all (so the content security policy forbids every script),
and every worker and replica checks the cookie against its key cache without a shared session
store. Revoking the key ends its sessions; a session ends after SESSION_S anyway.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import time
import urllib.parse
from collections import Counter
from decimal import Decimal

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from proxy import records, report
from proxy.keys import Key, digest, refused
from proxy.ledger import providers, queries
from proxy.ledger.queries import Window
from proxy.ui_pages import STYLE_HASH, bar_chart, h, line_chart, login, page, table

COOKIE = "euroute_ui"
SESSION_S = 8 * 3600
DEFAULT_DAYS = 30
MAX_DAYS = 366
MAX_SERIES = 10  # lines per chart: one query each, and a legend that still reads
VERIFY_EVERY_S = 60.0  # the chain check reads every row: at most once a minute per process
HEADERS = {
    "content-security-policy": f"default-src 'none'; style-src 'sha256-{STYLE_HASH}'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "cache-control": "no-store", "referrer-policy": "same-origin",  # no-referrer: Origin null
    "x-content-type-options": "nosniff", "x-frame-options": "DENY",
}


def _html(body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(body, status, headers=HEADERS)


# -- the session cookie -----------------------------------------------------------------------

def _mac(key_hash: str, key_id: str, expires: int) -> str:
    return hmac.new(bytes.fromhex(key_hash), f"euroute-ui\0{key_id}.{expires}".encode(),
                    hashlib.sha256).hexdigest()


def _signed_in(request: Request) -> Key | None:
    """The auditor key behind the request's session cookie, if the session is still good."""
    key_id, _, rest = request.cookies.get(COOKIE, "").partition(".")
    expires, _, mac = rest.partition(".")
    if not expires.isdigit() or int(expires) < time.time():
        return None
    found = request.app.state.gateway.keys.by_id(key_id)
    if found is None:
        return None
    key_hash, key = found
    if key.role != "auditor" or not hmac.compare_digest(mac, _mac(key_hash, key_id, int(expires))):
        return None
    return key


async def sign_in(request: Request) -> Response:
    origin = request.headers.get("origin")
    if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
        return _html(login("This form only accepts sign-ins from this site."), 403)
    body = await request.body()
    if len(body) > 1024:
        return _html(login("That is not a euroute key."), 400)
    secret = urllib.parse.parse_qs(body.decode("latin-1")).get("key", [""])[0].strip()
    key = request.app.state.gateway.keys.get(secret) if secret else None
    if key is None:
        refused(request.scope, "invalid" if secret else "missing")
        return _html(login("Unknown or revoked key."), 401)
    if key.role != "auditor":
        return _html(login(f"A key with role '{key.role}' cannot open the dashboard: it is for "
                           "auditor keys only."), 403)
    expires = int(time.time()) + SESSION_S
    response = RedirectResponse("/ui", 303, headers=HEADERS)
    response.set_cookie(COOKIE, f"{key.id}.{expires}.{_mac(digest(secret), key.id, expires)}",
                        max_age=SESSION_S, path="/ui", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
    return response


async def sign_out(request: Request) -> Response:
    response = RedirectResponse("/ui", 303, headers=HEADERS)
    response.delete_cookie(COOKIE, path="/ui", httponly=True, samesite="strict")
    return response


# -- the dashboard ----------------------------------------------------------------------------

def _period(request: Request) -> tuple[dt.date, dt.date]:
    today = dt.datetime.now(dt.UTC).date()
    try:
        end = dt.date.fromisoformat(request.query_params.get("to") or today.isoformat())
        start = dt.date.fromisoformat(request.query_params.get("from")
                                      or (end - dt.timedelta(days=DEFAULT_DAYS - 1)).isoformat())
    except ValueError:
        raise ValueError("from and to must be dates, YYYY-MM-DD") from None
    if not start <= end or (end - start).days >= MAX_DAYS:
        raise ValueError(f"from must not be after to, and the period at most {MAX_DAYS} days")
    return start, end


async def dashboard(request: Request) -> Response:
    if _signed_in(request) is None:
        return _html(login())
    try:
        start, end = _period(request)
    except ValueError as exc:
        return _html(page("audit dashboard", f'<p class="error">{h(exc)}</p>'
                          '<p><a href="/ui">Back to the last 30 days</a></p>', signed_in=True),
                     400)
    window = Window(start=dt.datetime.combine(start, dt.time(), dt.UTC),
                    end=dt.datetime.combine(end + dt.timedelta(days=1), dt.time(), dt.UTC))
    sections = [await _spend(request, window, start, end), await _denials(request, window),
                await _locations(request, window), await _copies(request),
                await _integrity(request), _policies(request)]
    picker = (f'<form method="get" action="/ui"><label>From <input type="date" name="from" '
              f'value="{start}"></label> <label>to <input type="date" name="to" value="{end}">'
              '</label> <button type="submit">Show</button></form>')
    return _html(page("audit dashboard", picker + "".join(sections), signed_in=True))


def _section(ident: str, title: str, body: str) -> str:
    return f'<section id="{ident}"><h2>{h(title)}</h2>{body}</section>'


async def _spend(request: Request, window: Window, start: dt.date, end: dt.date) -> str:
    engine = request.app.state.engine
    by_app = await queries.usage(engine, window, group_by="app")
    totals = [r for r in by_app if r["app"] == "TOTAL" and r["currency"]]
    body = table(by_app, numeric=("requests", "denied", "failed", "prompt_tokens",
                                  "completion_tokens", "cost"))
    if totals:
        currency = max(totals, key=lambda r: r["cost"])["currency"]
        days = [(start + dt.timedelta(days=i)).isoformat() for i in range((end - start).days + 1)]
        for group in ("app", "route"):
            rows = by_app if group == "app" else await queries.usage(engine, window,
                                                                      group_by="route")
            spent = sorted((r for r in rows if r[group] not in (None, "TOTAL")
                            and r["currency"] == currency and r["cost"] > 0),
                           key=lambda r: r["cost"], reverse=True)
            names = [r[group] for r in spent[:MAX_SERIES]]
            series = {}
            for name in dict.fromkeys(names):
                daily = await queries.usage(engine, _narrowed(window, group, name),
                                            group_by="day")
                cost = {r["day"]: r["cost"] for r in daily if r["currency"] == currency}
                series[name] = [cost.get(day, Decimal(0)) for day in days]
            top = f", the {MAX_SERIES} largest" if len(spent) > MAX_SERIES else ""
            body += (f"<h3>Spend per day by {group} ({h(currency)}{top})</h3>"
                     + line_chart(f"spend per day by {group}", days, series, currency))
    return _section("spend", f"Spend, {start} to {end}", body)


def _narrowed(window: Window, group: str, value: str) -> Window:
    return dataclasses.replace(window, **{group: value})


async def _denials(request: Request, window: Window) -> str:
    engine = request.app.state.engine
    reasons = await queries.decisions(engine, window, group_by="requirement")
    per_requirement = Counter[str]()
    for row in reasons:
        per_requirement[row["requirement"]] += row["denied"] + row["dryrun_denied"]
    by_policy = await queries.decisions(engine, window, group_by="policy")
    return _section("denials", "Denials and their reasons",
                    table(by_policy, numeric=("requests", "denied", "dryrun_denied"))
                    + "<h3>Failed requirements (a denial counts under each it failed)</h3>"
                    + bar_chart("denials by failed requirement", per_requirement.most_common())
                    + table(reasons, numeric=("denied", "dryrun_denied")))


async def _locations(request: Request, window: Window) -> str:
    document = await records.records(request.app.state.engine,
                                     request.app.state.gateway.policies.current, window)
    processed, stored = Counter[str](), Counter[str]()
    for entry in document["records"]:
        if entry["requests"]:
            where = (entry["inference_location"] or "unknown", entry["inference_region"])
            processed[f"{where[0]} ({where[1]})"] += entry["requests"]
            kept = (entry["storage_location"] or "unknown", entry["storage_region"])
            stored[f"{kept[0]} ({kept[1]})"] += entry["requests"]
    routes = [{"route": e["route"], "processor": e["processor"],
               "processed_in": e["inference_location"], "stored_in": e["storage_location"],
               "transfer_mechanism": e["transfer_mechanism"], "requests": e["requests"]}
              for e in document["records"]]
    return _section("locations", "Where data was processed and stored",
                    "<h3>Processed in (requests)</h3>"
                    + bar_chart("requests by country of processing", processed.most_common())
                    + "<h3>Stored in (requests)</h3>"
                    + bar_chart("requests by country of storage", stored.most_common())
                    + table(routes, numeric=("requests",)))


async def _copies(request: Request) -> str:
    today = dt.datetime.now(dt.UTC).date()
    rows = await providers.retention(request.app.state.engine, as_of=today)
    return _section("retention", f"Provider copies that may still exist on {today}",
                    table(rows, numeric=("requests", "unknown_retention")))


async def _integrity(request: Request) -> str:
    state = request.app.state
    checked = getattr(state, "ui_verified", None)
    if checked is None or time.monotonic() - checked[0] > VERIFY_EVERY_S:
        checked = (time.monotonic(), dt.datetime.now(dt.UTC),
                   await queries.verify(state.engine))
        state.ui_verified = checked
    _, at, result = checked
    chains = f"{result.get('writers')} hash chain" + ("" if result.get("writers") == 1 else "s")
    verdict = (f'<p class="ok">Verified: {result["rows"]} rows in {chains}, intact.</p>'
               if result["ok"] else
               f'<p class="bad">FAILED after {result["rows"]} good rows: {h(result["finding"])}'
               "</p>")
    return _section("integrity", "Ledger integrity (hash chains)",
                    verdict + f'<p class="muted">Checked {at:%Y-%m-%d %H:%M:%S} UTC; '
                    "<code>euroute audit verify</code> checks again.</p>")


def _policies(request: Request) -> str:
    policies = request.app.state.gateway.policies.current
    parts = [f'<p class="muted">Policy version {h(policies.version[:12])}</p>']
    for name in sorted(policies.policies):
        inner = []
        for model in policies.by_model:
            decision = policies.decision(name, model)
            if decision is None:
                continue
            admitted = ", ".join(r.id for r in decision.routes) or "none"
            inner.append(f"<h3>{h(model)}: admitted {h(admitted)}</h3>"
                         f'<p class="muted">models rule: {h(decision.model_check.detail)}</p>'
                         + table(report.explain_rows(decision)))
        parts.append(f"<details><summary>{h(name)}</summary>{''.join(inner)}</details>")
    return _section("policies", "Policies and their explain tables", "".join(parts))


def routes() -> list[Route]:
    return [Route("/ui", dashboard, methods=["GET"]),
            Route("/ui/login", sign_in, methods=["POST"]),
            Route("/ui/logout", sign_out, methods=["POST"])]

