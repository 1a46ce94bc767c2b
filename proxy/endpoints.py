"""The HTTP surface: chat completions, embeddings, models, health, metrics. Pure ASGI.

One request, in order: authenticate, read and parse, decide, admit, translate, forward (falling
over to the next compliant route only before any byte reached the client), record.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import time
from typing import Any

import orjson

from proxy import dialect, metrics
from proxy.asgi import Receive, Scope, Send, read_body, send_error, send_json
from proxy.errors import (
    BadRequest,
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
)
from proxy.keys import Key, KeyCache
from proxy.ledger.chain import commitment, pseudonym
from proxy.ledger.record import OUTCOMES as RECORD_OUTCOMES
from proxy.ledger.record import RequestRecord
from proxy.ledger.writer import Writer
from proxy.limits import Budgets, RateLimiter
from proxy.policy.decide import Check, parse_narrowing, request_checks
from proxy.policy.live import LivePolicies
from proxy.policy.load import PolicySet
from proxy.policy.schema import Policy, Route
from proxy.settings import Settings
from proxy.upstream import Upstream, forward

log = logging.getLogger("euroute")
OUTCOMES = {
    BadRequest: "invalid_request", PayloadTooLarge: "invalid_request",
    ModelNotFound: "model_not_found", PolicyViolation: "denied", Forbidden: "forbidden",
    Unavailable: "ledger_unavailable", StoreUnavailable: "unavailable",
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
    return "upstream_error"


def authenticate(keys: KeyCache, headers: dict[bytes, bytes]) -> Key:
    auth = headers.get(b"authorization", b"")
    if not auth.lower().startswith(b"bearer "):
        raise Unauthorized("missing API key: send 'Authorization: Bearer <euroute key>'")
    key = keys.get(auth[7:].strip().decode("latin-1"))
    if key is None:
        raise Unauthorized("invalid or revoked API key")
    return key


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
        self.admitted_unrecorded = 0
        self.pseudonym_key = (settings.pseudonym_key.get_secret_value().encode()
                              if settings.pseudonym_key else os.urandom(32))

    # -- the proxied endpoints --------------------------------------------------------------

    async def chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._call(scope, receive, send, "chat")

    async def embeddings(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._call(scope, receive, send, "embeddings")

    async def _call(self, scope: Scope, receive: Receive, send: Send, endpoint: str) -> None:
        started = time.perf_counter()
        headers = dict(scope["headers"])
        request_id = "req_" + os.urandom(12).hex()
        reply_headers = [(b"x-request-id", request_id.encode())]
        try:
            key = authenticate(self.keys, headers)
        except Unauthorized as exc:
            await send_error(send, exc, reply_headers)
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
        try:
            policy = policies.policies.get(key.policy)
            if policy is None:
                raise Forbidden(f"this key's policy {key.policy!r} is not defined any more")
            row.enforcement = policy.enforcement
            row.retain_until = now.date() + dt.timedelta(days=policy.records.retention_days)
            body = await read_body(receive, headers, self.settings.max_body_bytes)
            request = dialect.parse(body)
            dialect.check_types(request)
            model = request["model"]
            try:
                row.set(model=model)
            except ValueError:
                raise BadRequest("'model' must be at most 200 characters, without NUL",
                                 param="model", code="invalid_value") from None
            user = headers.get(b"x-euroute-user", b"").decode("latin-1") or request.get("user")
            if isinstance(user, str) and user:
                pseud = pseudonym(self.pseudonym_key, user)
                salt = os.urandom(16).hex()
                row.set(end_user=pseud, end_user_salt=salt,
                        end_user_commitment=commitment(salt, pseud))
            routes = self._decide(policies, request, endpoint, policy, model, headers, decision,
                                  row)
            if not self.writer.healthy:
                if policy.audit.on_write_failure == "reject":
                    raise Unavailable("the audit ledger cannot be written; this policy refuses "
                                      "requests it cannot record")
                self.admitted_unrecorded += 1
            await self.rates.admit(key.id, policy)
            await self.budgets.admit(key.app, policy.limits.budget,
                                     self._worst_case(routes[0], request, len(body)))
            tried: list[str] = decision.setdefault("tried", [])
            route, usage = await forward(self.upstream, policies, routes, request, endpoint,
                                         receive, send, row, reply_headers, started, tried)
            self._account(row, route, policy, usage)
        except EurouteError as exc:
            row.finish(outcome_of(exc), exc.status)
            await send_error(send, exc, reply_headers)
        except Exception:
            # A bug, not the caller's fault: still one ledger row, and no traceback to the client.
            log.exception("request %s failed", request_id)
            row.finish("internal_error", 500)
            with contextlib.suppress(RuntimeError):  # the response may have started already
                await send_error(send, EurouteError("internal error; see x-request-id"),
                                 reply_headers)
        finally:
            row.decision = orjson.dumps(decision).decode()
            row.latency_us = int((time.perf_counter() - started) * 1e6)
            metrics.observe(row)
            self.writer.submit(row)

    def _decide(self, policies: PolicySet, request: dict[str, Any], endpoint: str,
                policy: Policy, model: str, headers: dict[bytes, bytes], decision: dict[str, Any],
                row: RequestRecord) -> list[Route]:
        """Compliant routes for this request, best first; raises the denial otherwise."""
        narrowing_header = headers.get(b"x-euroute-require")
        try:
            narrowing = (parse_narrowing(narrowing_header.decode("latin-1"))
                         if narrowing_header else frozenset())
        except ValueError as exc:
            raise BadRequest(str(exc), param="x-euroute-require",
                             code="invalid_requirement") from None
        needs = dialect.needs(request, endpoint)
        max_tokens = request.get("max_completion_tokens") or request.get("max_tokens")
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
        out_tokens = (request.get("max_completion_tokens") or request.get("max_tokens")
                      or route.limits.max_output_tokens or 0)
        per_in, per_out = route.pricing.nanos_per_token
        return body_bytes // 4 * per_in + out_tokens * per_out

    def _account(self, row: RequestRecord, route: Route, policy: Policy,
                 usage: tuple[int, int] | None) -> None:
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
            key = authenticate(self.keys, dict(scope["headers"]))
        except Unauthorized as exc:
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
        ready = self.writer.healthy
        body = {"status": "ready" if ready else "unavailable",
                "policy_version": self.policies.current.version,
                "policy_error": self.policies.error,
                "ledger": {"healthy": ready, "pending_rows": self.writer.pending}}
        await send_json(send, 200 if ready else 503, orjson.dumps(body))

    async def metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", metrics.CONTENT_TYPE)]})
        await send({"type": "http.response.body", "body": self.sampler.scrape()})


def _reasons(route: Route, fails: list[Check]) -> list[dict[str, str]]:
    return [{"route": route.id, "requirement": c.requirement, "message": c.detail} for c in fails]
