"""The HTTP surface: chat completions, embeddings, models, health, metrics. Pure ASGI.

One request, in order: authenticate, read and parse, decide, admit, translate, forward (falling
over to the next compliant route only before any byte reached the client), record.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson

from proxy import dialect
from proxy.errors import (
    BadRequest,
    EurouteError,
    Forbidden,
    ModelNotFound,
    PayloadTooLarge,
    PolicyViolation,
    Unauthorized,
    Unavailable,
    UpstreamError,
    UpstreamUnavailable,
)
from proxy.keys import Key, KeyCache
from proxy.ledger.chain import commitment, pseudonym
from proxy.ledger.writer import Writer
from proxy.limits import Budgets, RateLimiter
from proxy.policy.decide import Check, parse_narrowing, request_checks
from proxy.policy.live import LivePolicies
from proxy.policy.load import PolicySet
from proxy.policy.schema import Policy, Route
from proxy.settings import Settings
from proxy.upstream import retryable, translate

log = logging.getLogger("euroute")
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

JSON = (b"content-type", b"application/json")
SSE = (b"content-type", b"text/event-stream")
OUTCOMES = {
    BadRequest: "invalid_request", PayloadTooLarge: "invalid_request",
    ModelNotFound: "model_not_found", PolicyViolation: "denied", Forbidden: "forbidden",
    Unavailable: "ledger_unavailable",
}


def outcome_of(exc: EurouteError) -> str:
    found = OUTCOMES.get(type(exc))
    if found:
        return found
    if exc.status == 429:
        return exc.code or "rate_limited"
    return exc.code if exc.type == "upstream_error" and exc.code else "upstream_error"


async def send_json(send: Send, status: int, body: bytes,
                    headers: list[tuple[bytes, bytes]] = ()) -> None:  # type: ignore[assignment]
    await send({"type": "http.response.start", "status": status,
                "headers": [JSON, (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, exc: EurouteError,
                     headers: list[tuple[bytes, bytes]] = ()) -> None:  # type: ignore[assignment]
    await send_json(send, exc.status, exc.render(), [*headers, *exc.headers()])


async def read_body(receive: Receive, headers: dict[bytes, bytes], limit: int) -> bytes:
    declared = headers.get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is larger than the {limit} byte limit")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequest("client disconnected before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is larger than the {limit} byte limit")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def authenticate(keys: KeyCache, headers: dict[bytes, bytes]) -> Key:
    auth = headers.get(b"authorization", b"")
    if not auth.lower().startswith(b"bearer "):
        raise Unauthorized("missing API key: send 'Authorization: Bearer <euroute key>'")
    key = keys.get(auth[7:].strip().decode("latin-1"))
    if key is None:
        raise Unauthorized("invalid or revoked API key")
    return key


def _nanos_per_token(price_per_1m: Any) -> int:
    return int(price_per_1m * 1000)  # exact: prices have at most 3 decimals


class Gateway:
    """Everything a request needs, built once by the app factory."""

    def __init__(self, settings: Settings, policies: LivePolicies, keys: KeyCache, writer: Writer,
                 client: httpx.AsyncClient, budgets: Budgets) -> None:
        self.settings = settings
        self.policies = policies
        self.keys = keys
        self.writer = writer
        self.client = client
        self.budgets = budgets
        self.rates = RateLimiter()
        self.outcomes: Counter[str] = Counter()
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
            self.outcomes["unauthenticated"] += 1
            await send_error(send, exc, reply_headers)
            return
        now = dt.datetime.now(dt.UTC)
        policies = self.policies.current
        decision_id = "dec_" + os.urandom(12).hex()
        reply_headers.append((b"x-euroute-decision-id", decision_id.encode()))
        row: dict[str, Any] = {
            "request_id": request_id, "created_at": now, "app": key.app, "key_id": key.id,
            "end_user": None, "end_user_salt": None, "end_user_commitment": None,
            "endpoint": endpoint, "model": "", "route": None, "provider": None,
            "upstream_model": None, "inference_location": None, "storage_location": None,
            "transfer_mechanism": None, "zdr_reference": None, "dpa_reference": None,
            "policy": key.policy, "policy_version": policies.version, "enforcement": "enforce",
            "decision_id": decision_id, "failed_requirements": None, "outcome": "ok",
            "status": 200, "ttfb_us": None, "prompt_tokens": 0, "completion_tokens": 0,
            "usage_missing": False, "cost_nanos": 0, "currency": None,
            "provider_retention_days": None, "provider_copy_gone_on": None,
            "retain_until": now.date() + dt.timedelta(days=400), "content_stored": False,
        }
        decision: dict[str, Any] = {"input": {"app": key.app, "key_id": key.id,
                                              "endpoint": endpoint},
                                    "result": "error", "reasons": []}
        self.writer.key_used(key.id, now)
        try:
            policy = policies.policies.get(key.policy)
            if policy is None:
                raise Forbidden(f"this key's policy {key.policy!r} is not defined any more")
            row["enforcement"] = policy.enforcement
            row["retain_until"] = now.date() + dt.timedelta(days=policy.records.retention_days)
            body = await read_body(receive, headers, self.settings.max_body_bytes)
            request = dialect.parse(body)
            dialect.check_types(request)
            model = row["model"] = request["model"][:200]
            user = headers.get(b"x-euroute-user", b"").decode("latin-1") or request.get("user")
            if isinstance(user, str) and user:
                pseud = pseudonym(self.pseudonym_key, user)
                salt = os.urandom(16).hex()
                row.update(end_user=pseud, end_user_salt=salt,
                           end_user_commitment=commitment(salt, pseud))
            routes = self._decide(policies, request, endpoint, policy, model, headers, decision,
                                  row)
            if not self.writer.healthy:
                if policy.audit.on_write_failure == "reject":
                    raise Unavailable("the audit ledger cannot be written; this policy refuses "
                                      "requests it cannot record")
                self.admitted_unrecorded += 1
            self.rates.admit(key.id, policy.limits)
            await self.budgets.admit(key.app, policy.limits.budget,
                                     self._worst_case(routes[0], request, len(body)))
            await self._forward(policies, receive, send, request, endpoint, routes, policy,
                                row, reply_headers, started)
        except EurouteError as exc:
            row["outcome"] = outcome_of(exc)
            row["status"] = exc.status
            await send_error(send, exc, reply_headers)
        except Exception:
            # A bug, not the caller's fault: still one ledger row, and no traceback to the client.
            log.exception("request %s failed", request_id)
            row["outcome"], row["status"] = "internal_error", 500
            with contextlib.suppress(RuntimeError):  # the response may have started already
                await send_error(send, EurouteError("internal error; see x-request-id"),
                                 reply_headers)
        finally:
            row["decision"] = orjson.dumps(decision).decode()
            row["latency_us"] = int((time.perf_counter() - started) * 1e6)
            self.outcomes[row["outcome"]] += 1
            self.writer.submit(row)

    def _decide(self, policies: PolicySet, request: dict[str, Any], endpoint: str,
                policy: Policy, model: str, headers: dict[bytes, bytes], decision: dict[str, Any],
                row: dict[str, Any]) -> list[Route]:
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
        reasons = found.reasons()
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
        row["failed_requirements"] = ",".join(sorted({r["requirement"] for r in reasons}))[:400]
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
            decision_id=row["decision_id"], reasons=reasons)

    def _worst_case(self, route: Route, request: dict[str, Any], body_bytes: int) -> int:
        out_tokens = (request.get("max_completion_tokens") or request.get("max_tokens")
                      or route.limits.max_output_tokens or 0)
        return (body_bytes // 4 * _nanos_per_token(route.pricing.input_per_1m)
                + out_tokens * _nanos_per_token(route.pricing.output_per_1m))

    async def _forward(self, policies: PolicySet, receive: Receive, send: Send,
                       request: dict[str, Any], endpoint: str, routes: list[Route],
                       policy: Policy, row: dict[str, Any],
                       reply_headers: list[tuple[bytes, bytes]], started: float) -> None:
        stream = endpoint == "chat" and bool(request.get("stream"))
        last_error: EurouteError = UpstreamUnavailable("no route was tried")
        for route in routes:
            self._route_facts(row, route, policies)
            if endpoint == "chat":
                payload = dialect.chat_request(request, route.upstream_model)
            else:
                payload = dialect.embeddings_request(request, route.upstream_model)
            url = f"{policies.base_urls[route.id]}/{'chat/completions' if endpoint == 'chat' else 'embeddings'}"
            upstream_headers = {"content-type": "application/json", "accept-encoding": "identity",
                                "accept": "text/event-stream" if stream else "application/json"}
            if api_key := policies.api_keys.get(route.id):
                upstream_headers["authorization"] = f"Bearer {api_key}"
            upstream_request = self.client.build_request(
                "POST", url, content=orjson.dumps(payload), headers=upstream_headers)
            try:
                response = await self.client.send(upstream_request, stream=True)
            except httpx.HTTPError as exc:
                last_error = translate(exc)
                if retryable(last_error):
                    continue
                raise last_error from None
            row["ttfb_us"] = int((time.perf_counter() - started) * 1e6)
            answered = [*reply_headers, (b"x-euroute-route", route.id.encode())]
            try:
                if response.status_code >= 400:
                    last_error = _upstream_error(response.status_code, await response.aread())
                    if retryable(last_error):
                        continue
                    raise last_error
                if stream:
                    await self._relay_stream(receive, send, response, request, route, policy,
                                             row, answered)
                else:
                    raw = await response.aread()
                    await self._relay_json(send, raw, request, endpoint, route, policy, row,
                                           answered)
                return
            except httpx.HTTPError as exc:  # reading a JSON body: nothing was sent yet
                last_error = translate(exc)
                if retryable(last_error):
                    continue
                raise last_error from None
            finally:
                await response.aclose()
        raise last_error

    def _route_facts(self, row: dict[str, Any], route: Route, policies: PolicySet) -> None:
        p = route.posture
        standing = policies.standings[route.id]
        days = standing.retention_days
        row.update(route=route.id, provider=route.provider, upstream_model=route.upstream_model,
                   inference_location=p.inference_location, storage_location=p.storage_location,
                   transfer_mechanism=p.transfer_mechanism, zdr_reference=standing.zdr_reference,
                   dpa_reference=standing.dpa_reference, currency=route.pricing.currency,
                   provider_retention_days=days,
                   provider_copy_gone_on=None if days is None
                   else row["created_at"].date() + dt.timedelta(days=days))

    def _account(self, row: dict[str, Any], route: Route, policy: Policy,
                 usage: tuple[int, int] | None) -> None:
        if usage is None:
            row["usage_missing"] = True
            return
        prompt, completion = usage
        cost = (prompt * _nanos_per_token(route.pricing.input_per_1m)
                + completion * _nanos_per_token(route.pricing.output_per_1m))
        row.update(prompt_tokens=prompt, completion_tokens=completion, cost_nanos=cost)
        self.rates.spent_tokens(row["key_id"], prompt + completion)
        self.budgets.spent(row["app"], policy.limits.budget, cost)

    async def _relay_json(self, send: Send, raw: bytes, request: dict[str, Any], endpoint: str,
                          route: Route, policy: Policy, row: dict[str, Any],
                          reply_headers: list[tuple[bytes, bytes]]) -> None:
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamUnavailable("upstream sent a body that is not JSON") from None
        usage = dialect.usage_of(answer) if isinstance(answer, dict) else None
        self._account(row, route, policy, usage)
        if endpoint == "embeddings" and isinstance(answer, dict):
            raw = orjson.dumps(dialect.embeddings_answer(answer, request.get("encoding_format")))
        await send_json(send, 200, raw, reply_headers)

    async def _relay_stream(self, receive: Receive, send: Send, response: httpx.Response,
                            request: dict[str, Any], route: Route, policy: Policy,
                            row: dict[str, Any], reply_headers: list[tuple[bytes, bytes]]) -> None:
        options = request.get("stream_options")
        relay = dialect.StreamRelay(isinstance(options, dict)
                                    and options.get("include_usage") is True)
        # uvicorn drops writes to a gone client silently; only receive() tells of a disconnect.
        gone = asyncio.ensure_future(receive())
        await send({"type": "http.response.start", "status": 200,
                    "headers": [SSE, (b"cache-control", b"no-cache"), *reply_headers]})
        try:
            async for chunk in response.aiter_raw():
                if gone.done():
                    row["outcome"], row["status"] = "client_cancelled", 499
                    break
                out = relay.feed(chunk)
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
            else:
                if not relay.done:
                    row["outcome"], row["status"] = "stream_cut", 502
        except httpx.HTTPError:
            row["outcome"], row["status"] = "stream_cut", 502
        finally:
            gone.cancel()
            self._account(row, route, policy, relay.usage)
            await send({"type": "http.response.body", "body": b"", "more_body": False})

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
        lines = ["# TYPE euroute_requests_total counter"]
        lines += [f'euroute_requests_total{{outcome="{o}"}} {n}'
                  for o, n in sorted(self.outcomes.items())]
        w, p = self.writer, self.policies
        lines += [
            "# TYPE euroute_ledger_pending_rows gauge", f"euroute_ledger_pending_rows {w.pending}",
            "# TYPE euroute_ledger_written_total counter",
            f"euroute_ledger_written_total {w.written}",
            "# TYPE euroute_ledger_write_failures_total counter",
            f"euroute_ledger_write_failures_total {w.failures}",
            "# TYPE euroute_ledger_healthy gauge", f"euroute_ledger_healthy {int(w.healthy)}",
            "# TYPE euroute_admitted_unrecorded_total counter",
            f"euroute_admitted_unrecorded_total {self.admitted_unrecorded}",
            "# TYPE euroute_policy_info gauge",
            f'euroute_policy_info{{version="{p.current.version[:12]}"}} 1',
            "# TYPE euroute_policy_reload_failures_total counter",
            f"euroute_policy_reload_failures_total {p.failed_reloads}",
        ]
        body = ("\n".join(lines) + "\n").encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain; version=0.0.4")]})
        await send({"type": "http.response.body", "body": body})


def _reasons(route: Route, fails: list[Check]) -> list[dict[str, str]]:
    return [{"route": route.id, "requirement": c.requirement, "message": c.detail} for c in fails]


def _upstream_error(status: int, raw: bytes) -> EurouteError:
    if status in (401, 403):
        # The upstream refused euroute's own credentials: the caller can do nothing about it.
        return UpstreamUnavailable(f"upstream refused euroute's credentials (HTTP {status})")
    message, kind, param, code = dialect.error_from_upstream(status, raw)
    return UpstreamError(status, message, type=kind, param=param, code=code)
