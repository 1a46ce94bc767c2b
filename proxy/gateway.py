"""The gateway: the one pipeline every inbound API runs (chat completions, Responses,
Messages, embeddings), plus models, health and metrics. Pure ASGI.

One request, in order: authenticate, read and parse (each inbound API by its module in
proxy/surfaces/, into one internal chat request), decide, admit, translate (by the route's
dialect, proxy/dialects/), forward (falling over to the next compliant route only before any
byte reached the client), render in the client's API, record.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from proxy import dialect, dialects, metrics, surfaces
from proxy.asgi import (
    DisconnectWatch,
    Receive,
    Scope,
    Send,
    header_values,
    new_request_id,
    read_body,
    send_error,
    send_json,
    single_header,
)
from proxy.errors import (
    BadRequest,
    CredentialsMissing,
    EurouteError,
    Forbidden,
    ModelNotFound,
    PayloadTooLarge,
    PolicyViolation,
    RateLimited,
    StoreUnavailable,
    Unauthorized,
    Unavailable,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.keys import KeyCache, authenticate
from proxy.ledger.chain import commitment, pseudonym
from proxy.ledger.record import OUTCOMES as RECORD_OUTCOMES
from proxy.ledger.record import RequestRecord
from proxy.ledger.writer import Writer
from proxy.limits import Budgets, RateLimiter
from proxy.logs import log_request
from proxy.policy.decide import Check, parse_narrowing, request_checks
from proxy.policy.live import LivePolicies
from proxy.policy.load import PolicySet
from proxy.policy.schema import Policy, Route
from proxy.relay import relay_json, relay_stream
from proxy.scrub import Scrubber
from proxy.settings import Settings
from proxy.surfaces import chat, messages, responses
from proxy.upstream import Call, Upstream

log = logging.getLogger("euroute")
# The inbound chat-like APIs, by endpoint name (the ledger's `endpoint`).
SURFACES = {m.ENDPOINT: m for m in (chat, responses, messages)}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
OUTCOMES = {
    BadRequest: "invalid_request", PayloadTooLarge: "invalid_request",
    ModelNotFound: "model_not_found", PolicyViolation: "denied", Forbidden: "forbidden",
    Unavailable: "ledger_unavailable", StoreUnavailable: "unavailable",
    CredentialsMissing: "unavailable",
    UpstreamTimeout: "upstream_timeout",
}


def outcome_of(exc: EurouteError) -> str:
    """The ledger outcome of a failure: always one of record.OUTCOMES, never a code an
    upstream chose."""
    found = OUTCOMES.get(type(exc))
    if found:
        return found
    if isinstance(exc, RateLimited):  # euroute's own limits; their codes are ours
        return exc.code if exc.code in RECORD_OUTCOMES else "rate_limit_exceeded"
    if isinstance(exc, UpstreamError) and exc.status == 429:
        return "upstream_rate_limited"
    if isinstance(exc, UpstreamUnavailable) and exc.code == "stream_cut":
        return "stream_cut"  # euroute's own code (upstream.Events), not an upstream's
    return "upstream_error"


def route_facts(row: RequestRecord, route: Route, policies: PolicySet) -> None:
    """What the ledger must say about where this request's data went."""
    p = route.posture
    standing = policies.standings[route.id]
    days = standing.retention_days
    row.set(route=route.id, provider=route.provider, upstream_model=route.upstream_model,
            inference_location=p.inference_location, storage_location=p.storage_location,
            transfer_mechanism=p.transfer_mechanism, zdr_reference=standing.zdr_reference,
            dpa_reference=standing.dpa_reference, currency=route.pricing.currency,
            provider_retention_days=days)
    row.provider_copy_gone_on = (None if days is None
                                 else row.created_at.date() + dt.timedelta(days=days))


@dataclass(slots=True)
class Exchange:
    """One admitted request on its way upstream."""

    policies: PolicySet
    routes: list[Route]
    request: dict[str, Any]
    endpoint: str
    surface: surfaces.Exchange | None  # None for embeddings
    row: RequestRecord
    decision: dict[str, Any]
    started: float
    trying: Route | None = None  # the route forward() is sending to now


class Gateway:
    """Everything a request needs, built once by the app factory."""

    def __init__(self, settings: Settings, policies: LivePolicies, keys: KeyCache, writer: Writer,
                 upstream: Upstream, budgets: Budgets) -> None:
        self.settings = settings
        self.policies = policies
        self.keys = keys
        self.writer = writer
        self.upstream = upstream
        self.budgets = budgets
        self.rates = RateLimiter(settings.redis_url, prefix=settings.redis_prefix,
                                 timeout_s=settings.redis_timeout_s)
        self.sampler = metrics.Sampler(self)
        self._scrub: tuple[PolicySet | None, Scrubber] = (None, Scrubber(()))
        self.admitted_unrecorded = 0
        self.pseudonym_key = settings.pseudonym_secret()
        # One handler per inbound API, named for its endpoint (proxy/app.py routes its PATH).
        for endpoint in SURFACES:
            setattr(self, endpoint, functools.partial(self._call, endpoint=endpoint))

    # -- the proxied endpoints --------------------------------------------------------------

    async def embeddings(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._call(scope, receive, send, endpoint="embeddings")

    async def _call(self, scope: Scope, receive: Receive, send: Send, endpoint: str) -> None:
        started = time.perf_counter()
        raw_headers = scope["headers"]
        headers = dict(raw_headers)  # for the headers that cannot repeat
        request_id = scope["euroute.request_id"] = new_request_id()
        reply_headers = [(b"x-request-id", request_id.encode())]
        module = SURFACES.get(endpoint)
        render = module.error if module is not None else EurouteError.render

        async def send_error(exc: EurouteError) -> None:
            await send_json(send, exc.status, render(exc), [*reply_headers, *exc.headers()])

        try:
            key = authenticate(self.keys, scope)
        except Unauthorized as exc:
            await send_error(exc)
            return
        await self.writer.room()
        now = dt.datetime.now(dt.UTC)
        policies = self.policies.current
        decision_id = "dec_" + os.urandom(12).hex()
        reply_headers.append((b"x-euroute-decision-id", decision_id.encode()))
        row = RequestRecord(
            request_id=request_id, created_at=now, app=key.app, key_id=key.id,
            endpoint=endpoint, policy=key.policy, policy_version=policies.version,
            decision_id=decision_id, retain_until=now.date() + dt.timedelta(days=400))
        decision: dict[str, Any] = {"input": {"app": key.app, "key_id": key.id,
                                              "endpoint": endpoint},
                                    "result": "error", "reasons": []}
        self.writer.key_used(key.id, now)
        failure: EurouteError | None = None
        try:
            if key.role != "app":
                raise Forbidden(f"a key with role {key.role!r} may not call the models; only "
                                "app keys may")
            policy = policies.policies.get(key.policy)
            if policy is None:
                raise Forbidden(f"this key's policy {key.policy!r} is not defined any more")
            row.enforcement = policy.enforcement
            row.retain_until = now.date() + dt.timedelta(days=policy.records.retention_days)
            body = await read_body(receive, headers, self.settings.max_body_bytes)
            data = dialect.parse(body)
            model = data["model"]
            try:
                row.set(model=model)
            except ValueError:
                raise BadRequest("'model' must be at most 200 characters, without NUL",
                                 param="model", code="invalid_value") from None
            # Each inbound API into the one internal request (proxy/surfaces/).
            surface = module.parse(data, headers) if module is not None else None
            request = surface.request if surface is not None else data
            dialect.check_types(request)
            user = _end_user(single_header(raw_headers, b"x-euroute-user"), data.get("user"))
            if user:
                pseud = pseudonym(self.pseudonym_key, user)
                salt = os.urandom(16).hex()
                row.set(end_user=pseud, end_user_salt=salt,
                        end_user_commitment=commitment(salt, pseud))
            routes = self._decide(policies, request, endpoint, policy, model, raw_headers,
                                  decision, row)
            if policies.uncredentialed:
                routes = _credentialed(routes, policies.uncredentialed, decision)
            if not self.writer.healthy:
                if policy.audit.on_write_failure == "reject":
                    raise Unavailable("the audit ledger cannot be written; this policy refuses "
                                      "requests it cannot record")
                self.admitted_unrecorded += 1
            await self.rates.admit(key.id, policy)
            await self.budgets.admit(key.app, policy.limits.budget,
                                     self._worst_case(routes[0], request, len(body)))
            # Admitted: a durable record of the intent, before any byte leaves.
            route_facts(row, routes[0], policies)  # the intent names the first choice
            await self.writer.begin(row, decision, policy.audit.on_write_failure == "reject")
            exchange = Exchange(policies, routes, request, endpoint, surface, row, decision,
                                started)
            route, usage = await self._forward(receive, send, exchange, reply_headers)
            self._account(row, route, policy, usage)
        except EurouteError as exc:
            failure = exc
            if isinstance(exc, UpstreamError):
                self._scrubber(policies).error(exc)
            row.finish(outcome_of(exc), exc.status)
            await send_error(exc)
        except Exception:
            # A bug, not the caller's fault: still one ledger row, and no traceback to the client.
            log.exception("request %s failed", request_id)
            row.finish("internal_error", 500)
            with contextlib.suppress(RuntimeError):  # the response may have started already
                await send_error(EurouteError("internal error; see x-request-id"))
        finally:
            row.decision = orjson.dumps(decision).decode()
            row.latency_us = int((time.perf_counter() - started) * 1e6)
            metrics.observe(row)
            self.writer.submit(row)
            log_request(row, failure)

    async def _forward(self, receive: Receive, send: Send, ex: Exchange,
                       reply_headers: list[tuple[bytes, bytes]]
                       ) -> tuple[Route | None, tuple[int, int] | None]:
        """Forward (falling over while nothing reached the client), relay, note the outcome;
        (the route that answered, its usage)."""
        row, request = ex.row, ex.request
        stream = ex.surface is not None and bool(request.get("stream"))
        scrub = self._scrubber(ex.policies)
        watch = DisconnectWatch(receive)
        events = relay = route = None
        try:
            answer = await self.upstream.forward(self._calls(ex, stream), stream)
            ex.decision["tried"] = [{"route": a.route, "outcome": a.outcome}
                                    for a in answer.attempts]
            route = answer.route
            if route is not None:
                route_facts(row, route, ex.policies)
            if answer.error is not None or route is None:
                raise answer.error or UpstreamUnavailable("no route was tried")
            row.ttfb_us = int((answer.ttfb - ex.started) * 1e6) if answer.ttfb else None
            answered = [*reply_headers, (b"x-euroute-route", route.id.encode())]
            if (events := answer.events) is None:
                watch.disarm()
                if ex.surface is None:
                    base64 = request.get("encoding_format") == "base64"
                    await relay_json(send, answer, base64, answered, scrub)
                else:
                    await send_json(send, 200, scrub(_rendered(ex.surface, answer, route)),
                                    answered)
                return route, answer.usage
            if ex.surface is None:
                raise UpstreamUnavailable("upstream streamed an answer nobody asked for")
            relay = surfaces.Relay(ex.surface.stream(), dialects.of(route).chunk, scrub)
            failure = await relay_stream(send, answer, relay, answered)
            watch.disarm()
            if failure is not None:
                row.finish(outcome_of(failure), failure.status)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return route, relay.usage
        except asyncio.CancelledError:
            if not watch.cancelled_by_client():
                raise
            if events is not None:
                await events.aclose()
            row.finish("client_cancelled", 499)
            if route is None and ex.trying is not None:  # gone while a route was being tried
                route = ex.trying
                route_facts(row, route, ex.policies)  # the prompt went there all the same
                ex.decision.setdefault("tried", []).append(
                    {"route": route.id, "outcome": "client_cancelled"})
            # the upstream worked for it: its usage when it came, else flagged as missing
            return route, relay.usage if relay is not None else None
        finally:
            watch.disarm()

    def _calls(self, ex: Exchange, stream: bool) -> Iterator[Call]:
        """One upstream request per compliant route, built only when that route is tried."""
        path = "embeddings" if ex.surface is None else "chat/completions"
        for route in ex.routes:
            ex.trying = route
            headers = {"content-type": "application/json", "accept-encoding": "identity",
                       "accept": "text/event-stream" if stream else "application/json",
                       "user-agent": "euroute"}
            if api_key := ex.policies.api_keys.get(route.id):
                headers["authorization"] = f"Bearer {api_key}"
            body = orjson.dumps(dialect.embeddings_request(ex.request, route.upstream_model)
                                if ex.surface is None else dialects.chat_body(ex.request, route))
            yield Call(route, f"{ex.policies.base_urls[route.id]}/{path}", body, headers)

    def _scrubber(self, policies: PolicySet) -> Scrubber:
        if self._scrub[0] is not policies:
            self._scrub = (policies, Scrubber(policies.api_keys.values()))
        return self._scrub[1]

    def _decide(self, policies: PolicySet, request: dict[str, Any], endpoint: str,
                policy: Policy, model: str, headers: Sequence[tuple[bytes, bytes]],
                decision: dict[str, Any], row: RequestRecord) -> list[Route]:
        """Compliant routes for this request, best first; raises the denial otherwise."""
        # Every copy of the header narrows: one list, as RFC 9110 5.3 combines repeated fields.
        narrowing_header = b",".join(header_values(headers, b"x-euroute-require"))
        try:
            narrowing = (parse_narrowing(narrowing_header.decode("latin-1"))
                         if narrowing_header else frozenset())
        except ValueError as exc:
            raise BadRequest(str(exc), param="x-euroute-require",
                             code="invalid_requirement") from None
        needs = dialect.needs(request, endpoint)
        max_tokens = dialect.output_limit(request)
        cap = policy.limits.max_output_tokens
        if max_tokens is None and cap is not None and endpoint != "embeddings":
            # The policy's cap holds when the client names no limit too: the upstream gets it.
            max_tokens = request["max_tokens"] = cap
        decision["input"].update(model=model, policy=policy.name, needs=sorted(needs),
                                 max_tokens=max_tokens, narrowing=sorted(narrowing),
                                 stream=bool(request.get("stream")))
        found = policies.decision(policy.name, model, narrowing)
        if found is None:
            decision["result"] = "model_not_found"
            raise ModelNotFound(f"The model `{model}` does not exist or you do not have "
                                "access to it.", param="model")
        reasons = list(found.reasons)
        routes = []
        for route in found.routes:
            fails = request_checks(route, policy, needs, max_tokens)
            if fails:
                reasons += _reasons(route, fails)
            else:
                routes.append(route)
        if endpoint != "embeddings":
            routes = _taking_parameters(routes, request)
        decision.update(candidates=[r.id for r in routes], reasons=reasons)
        if routes:
            decision["result"] = "allow"
            return routes
        row.set(failed_requirements=",".join(sorted({r["requirement"] for r in reasons}))[:400])
        if policy.enforcement == "dryrun":
            # Evaluate and record the would-be denial, then forward as if allowed.
            fallback = [v.route for v in found.verdicts
                        if v.enabled and needs <= v.route.capabilities]
            if fallback:
                decision["result"] = "dryrun_deny"
                return fallback
        decision["result"] = "deny"
        raise PolicyViolation(
            f"no route for {model} satisfies policy {policy.name}"
            + (f" narrowed by {', '.join(sorted(narrowing))}" if narrowing else ""),
            decision_id=row.decision_id, reasons=reasons)

    def _worst_case(self, route: Route, request: dict[str, Any], body_bytes: int) -> int:
        out_tokens = dialect.output_limit(request) or route.limits.max_output_tokens or 0
        per_in, per_out = route.pricing.nanos_per_token
        return body_bytes // 4 * per_in + out_tokens * per_out

    def _account(self, row: RequestRecord, route: Route | None, policy: Policy,
                 usage: tuple[int, int] | None) -> None:
        if route is None:
            return
        if usage is None:
            row.usage_missing = True
            return
        prompt, completion = usage
        per_in, per_out = route.pricing.nanos_per_token
        cost = prompt * per_in + completion * per_out
        row.usage(prompt, completion, cost)
        self.rates.spent_tokens(row.key_id, prompt + completion)
        self.budgets.spent(row.app, policy.limits.budget, cost)

    # -- the rest of the surface ------------------------------------------------------------

    async def models(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            key = authenticate(self.keys, scope)
            if key.role != "app":
                raise Forbidden(f"a key with role {key.role!r} may not list the models; only "
                                "app keys may")
        except EurouteError as exc:
            await send_error(send, exc)
            return
        policies = self.policies.current
        created = int(dt.datetime(2025, 9, 1, tzinfo=dt.UTC).timestamp())
        data = [{"id": m, "object": "model", "created": created,
                 "owned_by": policies.by_model[m][0].provider}
                for m in policies.models_for(key.policy)]
        await send_json(send, 200, orjson.dumps({"object": "list", "data": data}))

    async def healthz(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, 200, b'{"status":"ok"}')

    async def readyz(self, scope: Scope, receive: Receive, send: Send) -> None:
        missing = missing_credentials(self.policies.current)
        ready = self.writer.healthy and not missing
        body = {"status": "ready" if ready else "unavailable",
                "policy_version": self.policies.current.version,
                "policy_error": self.policies.error,
                "ledger": {"healthy": self.writer.healthy, "pending_rows": self.writer.pending},
                "missing_credentials": missing}
        await send_json(send, 200 if ready else 503, orjson.dumps(body))

    async def metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", metrics.CONTENT_TYPE)]})
        await send({"type": "http.response.body", "body": self.sampler.scrape()})


def _taking_parameters(routes: list[Route], request: dict[str, Any]) -> list[Route]:
    """The compliant routes that take every answer-changing parameter of the request; when
    none does, the request itself is at fault (400 naming the field), not the policy."""
    taking = [r for r in routes if not dialects.unsupported(request, r)]
    if routes and not taking:
        dialects.chat_body(request, routes[0])  # raises the 400 naming what it lacks
    return taking


def _rendered(surface: surfaces.Exchange, answer: Any, route: Route) -> bytes:
    """A JSON answer in the client's API; one already in its shape goes on as it came."""
    raw = answer.body or b""
    if surface.passthrough and not surfaces.needs_fold(answer.json or {}, "message"):
        return raw
    return surface.answer(dialects.of(route).answer(answer.json or {}))


def _credentialed(routes: list[Route], missing: dict[str, str], decision: dict[str, Any]
                  ) -> list[Route]:
    """The routes whose provider credential is set. One without it is never tried (it would
    reach its provider unauthenticated); the decision names it, and when no route is left the
    request is refused with the route and the variable (never a secret: the variable is unset)."""
    left_out = [(r.id, missing[r.id]) for r in routes if r.id in missing]
    if not left_out:
        return routes
    usable = [r for r in routes if r.id not in missing]
    decision["reasons"] += [{"route": route, "requirement": "credentials",
                             "message": f"{variable} is not set"} for route, variable in left_out]
    decision["candidates"] = [r.id for r in usable]
    if not usable:
        raise CredentialsMissing("no route for this request can be called: " + "; ".join(
            f"route {route} has no credential ({variable} is not set on this replica)"
            for route, variable in left_out))
    return usable


def missing_credentials(policies: PolicySet) -> list[dict[str, str]]:
    """Enabled routes whose API key variable is unset: they are never tried, so the replica is
    not ready."""
    return [{"route": r, "variable": v} for r, v in policies.uncredentialed.items()]


def _end_user(header: bytes | None, field: Any) -> str:
    """The end-user id, from the header or else the body's `user`: at most 256 characters and
    no control characters (PostgreSQL refuses NUL), since its pseudonym goes in the ledger."""
    param, value = ("x-euroute-user", header.decode("latin-1")) if header else ("user", field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRequest("user must be a string", param=param, code="invalid_type")
    if len(value) > 256 or _CONTROL.search(value):
        raise BadRequest(f"{param} must be at most 256 characters without control characters",
                         param=param, code="invalid_value")
    return value


def _reasons(route: Route, fails: list[Check]) -> list[dict[str, str]]:
    return [{"route": route.id, "requirement": c.requirement, "message": c.detail} for c in fails]
