"""Ledger rows made without a request: for facts the seed policies never produce (a transfer
outside the EEA, a past retain-until date). They go through the real `Writer`, so each batch
is a valid hash chain of its own and `audit verify` still passes."""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Any

from sqlalchemy.pool import NullPool

from proxy.ledger.db import make_engine
from proxy.ledger.record import RequestRecord
from proxy.ledger.writer import Writer

ROUTE = "mistral-eu-magistral-small"


def made_row(app: str, **overrides: Any) -> RequestRecord:
    """A forwarded, answered request on the Mistral route, as the gateway would record it."""
    now = overrides.pop("created_at", dt.datetime.now(dt.UTC))
    row: dict[str, Any] = {
        "request_id": "req_" + secrets.token_hex(12), "created_at": now, "app": app,
        "key_id": "key_made", "end_user": None, "end_user_salt": None,
        "end_user_commitment": None, "endpoint": "chat", "model": "magistral-small-2509",
        "route": ROUTE, "provider": "mistral", "upstream_model": "magistral-small-2509",
        "inference_location": "FR", "storage_location": "FR",
        "transfer_mechanism": "none_needed", "zdr_reference": None,
        "dpa_reference": "DPA-MISTRAL-2025-0042 (example)", "policy": "eu-standard",
        "policy_version": "0" * 64, "enforcement": "enforce",
        "decision_id": "dec_" + secrets.token_hex(12), "decision": '{"result": "allow"}',
        "failed_requirements": None, "outcome": "ok", "status": 200, "latency_us": 1000,
        "ttfb_us": 500, "prompt_tokens": 10, "completion_tokens": 20, "usage_missing": False,
        "cost_nanos": 10 * 500 + 20 * 1500, "currency": "USD", "provider_retention_days": 30,
        "provider_copy_gone_on": now.date() + dt.timedelta(days=30),
        "retain_until": now.date() + dt.timedelta(days=400), "content_stored": False,
    }
    row.update(overrides)
    return RequestRecord(**row)


async def write(url: str, rows: list[RequestRecord]) -> str:
    """Write `rows` as one new writer's chain; returns its writer id."""
    engine = make_engine(url, poolclass=NullPool)
    try:
        writer = Writer(engine)
        writer.start()
        for row in rows:
            writer.submit(row)
        await writer.close()
        return writer.writer_id
    finally:
        await engine.dispose()
