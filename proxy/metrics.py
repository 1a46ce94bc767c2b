"""Prometheus metrics, from prometheus-client.

Per request, one call once the request is finished: `observe(record)` reads everything from
its ledger record. The ledger writer and the policies are sampled by `Sampler`: when a scrape
arrives, and every second in each worker, so that under `euroute serve --workers N` every
worker's numbers are current whichever worker answers.

Several workers share their metrics through prometheus-client's multiprocess mode: `euroute
serve --workers N` points PROMETHEUS_MULTIPROC_DIR at a fresh temporary directory before the
workers start (the mode is chosen when prometheus-client is first imported) and removes it
when they have stopped; a scrape sums every worker's files.

Label values come from bounded sets only: endpoints, routes (the catalog), outcomes, HTTP
status numbers, apps (the key table), currencies, requirement names and the reasons a key is
refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal, get_args

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

if TYPE_CHECKING:
    from proxy.gateway import Gateway
    from proxy.ledger.record import RequestRecord

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST.encode()
SAMPLE_S = 1.0
# From a cached embedding to a long reasoning answer.
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

REQUESTS = Counter("euroute_requests", "Requests finished, by endpoint, route, outcome and "
                   "HTTP status", ["endpoint", "route", "outcome", "status"])
LATENCY = Histogram("euroute_request_duration_seconds", "Time from request to the last byte "
                    "of the answer", ["endpoint", "route"], buckets=_SECONDS)
TTFB = Histogram("euroute_time_to_first_byte_seconds", "Time from request to the first byte "
                 "of the upstream's answer", ["endpoint", "route"], buckets=_SECONDS)
TOKENS = Counter("euroute_tokens", "Tokens the upstream reported, by app, route and kind",
                 ["app", "route", "kind"])
COST = Counter("euroute_cost", "Cost of the requests, by app, route and currency (the ledger "
               "holds the exact amounts)", ["app", "route", "currency"])
DENIALS = Counter("euroute_denials", "Policy requirements that refused a request (a denial "
                  "counts once for each requirement no route met)", ["requirement"])
# Why a request was refused with 401: no key, two different key headers, a key that is unknown
# or revoked (the cache holds live keys only, so the two look alike).
Refusal = Literal["missing", "malformed", "invalid"]
UNAUTHORIZED = Counter("euroute_unauthorized", "Requests refused for want of a valid key (401), "
                       "by reason", ["reason"])
for _reason in get_args(Refusal):
    UNAUTHORIZED.labels(_reason)  # each series exists from the start, at 0: rates need it
RATE_STORE_OUTAGES = Counter("euroute_rate_limit_store_outages", "Admissions decided without "
                             "the shared rate limits (Redis unreachable), by what the policy "
                             "decided", ["decision"])
LEDGER_PENDING = Gauge("euroute_ledger_pending_rows", "Ledger rows waiting to be written",
                       multiprocess_mode="livesum")
LEDGER_HEALTHY = Gauge("euroute_ledger_healthy", "1 when every worker's ledger writer is "
                       "healthy", multiprocess_mode="livemin")
LEDGER_WRITTEN = Counter("euroute_ledger_written", "Ledger rows written")
LEDGER_BATCHES = Counter("euroute_ledger_batches", "Ledger batches written")
LEDGER_FAILURES = Counter("euroute_ledger_write_failures", "Failed ledger writes (retried)")
LEDGER_WAITS = Counter("euroute_ledger_backpressure_waits", "Requests that waited for the "
                       "ledger writer to catch up")
LEDGER_DEAD = Counter("euroute_ledger_dead_letters", "Ledger rows the database refused, kept "
                      "in ledger_dead_letters")
LEDGER_RESTARTS = Counter("euroute_ledger_writer_restarts", "Ledger writer tasks that died "
                          "and were restarted")
LEDGER_RECOVERED = Counter("euroute_ledger_recovered", "Requests a stopped writer left open, "
                           "recorded as outcome_unknown")
UNRECORDED = Counter("euroute_admitted_unrecorded", "Requests admitted while the ledger could "
                     "not be written (policies with audit.on_write_failure: admit)")
POLICY = Gauge("euroute_policy_info", "The policy version in force (1) and those before (0)",
               ["version"], multiprocess_mode="livemax")
RELOADS = Counter("euroute_policy_reloads", "Policy reloads, by result", ["result"])


def observe(record: RequestRecord) -> None:
    """Everything a finished request adds to the metrics, from its ledger record."""
    route = record.route or "none"
    endpoint = record.endpoint
    REQUESTS.labels(endpoint, route, record.outcome, str(record.status)).inc()
    LATENCY.labels(endpoint, route).observe(record.latency_us / 1e6)
    if record.ttfb_us is not None:
        TTFB.labels(endpoint, route).observe(record.ttfb_us / 1e6)
    if record.prompt_tokens:
        TOKENS.labels(record.app, route, "prompt").inc(record.prompt_tokens)
    if record.completion_tokens:
        TOKENS.labels(record.app, route, "completion").inc(record.completion_tokens)
    if record.cost_nanos:
        COST.labels(record.app, route, record.currency).inc(record.cost_nanos / 1e9)
    if record.outcome == "denied" and record.failed_requirements:
        for requirement in record.failed_requirements.split(","):
            DENIALS.labels(requirement).inc()


def rate_store_outage(*, refused: bool) -> None:
    RATE_STORE_OUTAGES.labels("refused" if refused else "admitted").inc()


class Sampler:
    """Copies the gateway's writer and policy state into the metrics."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._seen: dict[Counter, int] = {}
        self._version: str | None = None
        self._task: asyncio.Task[None] | None = None

    def _advance(self, counter: Counter, total: int) -> None:
        # The gateway's numbers are totals since it started; a Counter takes increments.
        counter.inc(total - self._seen.get(counter, 0))
        self._seen[counter] = total

    def sample(self) -> None:
        writer, policies = self.gateway.writer, self.gateway.policies
        LEDGER_PENDING.set(writer.pending)
        LEDGER_HEALTHY.set(int(writer.healthy))
        self._advance(LEDGER_WRITTEN, writer.written)
        self._advance(LEDGER_BATCHES, writer.batches)
        self._advance(LEDGER_FAILURES, writer.failures)
        self._advance(LEDGER_WAITS, writer.waits)
        self._advance(LEDGER_DEAD, writer.dead_letters)
        self._advance(LEDGER_RESTARTS, writer.restarts)
        self._advance(LEDGER_RECOVERED, writer.recovered)
        self._advance(UNRECORDED, self.gateway.admitted_unrecorded)
        self._advance(RELOADS.labels("ok"), policies.reloads)
        self._advance(RELOADS.labels("failed"), policies.failed_reloads)
        version = policies.current.version[:12]
        if version != self._version:
            if self._version is not None:
                POLICY.labels(self._version).set(0)
            POLICY.labels(version).set(1)
            self._version = version

    def scrape(self) -> bytes:
        """The exposition: this worker's state fresh, the others' as last sampled."""
        self.sample()
        if MULTIPROC_ENV not in os.environ:
            return generate_latest(REGISTRY)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)

    def start(self) -> None:
        self._task = asyncio.create_task(self._every_second(), name="euroute-metrics")

    async def _every_second(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(SAMPLE_S)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        if MULTIPROC_ENV in os.environ:
            # This worker's live gauges leave the sums; its counters stay.
            multiprocess.mark_process_dead(os.getpid())


@contextlib.contextmanager
def shared_between_workers(workers: int) -> Iterator[None]:
    """Around the server: several workers write their metrics to a fresh directory, removed
    when they have stopped. One worker, or a directory the operator chose, is left alone."""
    if workers <= 1 or MULTIPROC_ENV in os.environ:
        yield
        return
    os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="euroute-metrics-")
    try:
        yield
    finally:
        shutil.rmtree(os.environ.pop(MULTIPROC_ENV), ignore_errors=True)
