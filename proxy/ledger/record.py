"""The typed request record: one per request, the ledger row it becomes.

Built once when a request is authenticated, filled by the pipeline through methods that check
what they set, and handed to the writer. A value the database could not take (a string over its
column's length, a NUL byte PostgreSQL refuses, a token count outside the column's range, an
outcome nobody queries for) raises `ValueError` where it enters, not in the writer.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import BigInteger, Integer, String

from proxy.ledger.tables import ledger

# Every outcome a row may carry; reports and filters rely on this closed set.
OUTCOMES = frozenset({
    "ok",                    # answered in full
    "denied",                # no compliant route (policy violation)
    "invalid_request",       # the client's request was malformed or too large
    "model_not_found",
    "forbidden",             # the key may not do this
    "rate_limit_exceeded",   # euroute's own request-rate limit
    "tokens_rate_limit_exceeded",
    "budget_exceeded",
    "ledger_unavailable",    # the ledger could not be written and the policy refuses
    "unavailable",           # a budget or rate store could not be read, or no route has its key
    "upstream_error",        # the upstream failed or answered with an error
    "upstream_rate_limited",  # the upstream answered 429
    "upstream_timeout",
    "stream_cut",            # the upstream's stream ended before its end marker
    "client_cancelled",      # the client went away before the answer was complete
    "internal_error",        # a bug in euroute; the request id is in the log
    "outcome_unknown",       # the process died after forwarding; recovered at start
})

_INT32 = 2**31 - 1
_INT64 = 2**63 - 1


def _bounds() -> dict[str, tuple[type, int]]:
    """(kind, bound) per column: max length for strings, max value for integers."""
    out: dict[str, tuple[type, int]] = {}
    for column in ledger.columns:
        kind = column.type
        if isinstance(kind, String) and kind.length:
            out[str(column.name)] = (str, kind.length)
        elif isinstance(kind, BigInteger):
            out[str(column.name)] = (int, _INT64)
        elif isinstance(kind, Integer):
            out[str(column.name)] = (int, _INT32)
    return out


BOUNDS = _bounds()


def check(name: str, value: Any) -> None:
    """Raise ValueError unless `value` fits column `name`."""
    if value is None:
        return
    kind, bound = BOUNDS[name]
    if kind is str:
        if not isinstance(value, str) or len(value) > bound or "\x00" in value:
            raise ValueError(f"ledger field {name!r}: not a string of at most {bound} "
                             "characters without NUL")
    elif (not isinstance(value, int) or isinstance(value, bool)) or not 0 <= value <= bound:
        raise ValueError(f"ledger field {name!r}: not an integer in 0..{bound}")


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    created_at: dt.datetime
    app: str
    key_id: str | None
    endpoint: str
    policy: str
    policy_version: str
    decision_id: str
    retain_until: dt.date
    model: str = ""
    end_user: str | None = None
    end_user_salt: str | None = None
    end_user_commitment: str | None = None
    route: str | None = None
    provider: str | None = None
    upstream_model: str | None = None
    inference_location: str | None = None
    storage_location: str | None = None
    transfer_mechanism: str | None = None
    zdr_reference: str | None = None
    dpa_reference: str | None = None
    enforcement: str = "enforce"
    decision: str = "{}"
    failed_requirements: str | None = None
    outcome: str = "ok"
    status: int = 200
    latency_us: int = 0
    ttfb_us: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_missing: bool = False
    cost_nanos: int = 0
    currency: str | None = None
    provider_retention_days: int | None = None
    provider_copy_gone_on: dt.date | None = None
    content_stored: bool = False
    # Given by the writer when the row takes its place in the chain.
    writer_id: str | None = None
    seq: int | None = None
    prev_hash: str | None = None
    row_hash: str | None = None
    hash_key_id: str | None = None

    def __post_init__(self) -> None:
        if self.created_at.tzinfo is None:
            raise ValueError("created_at must be timezone-aware (UTC)")
        for name in _CHECKED:
            check(name, getattr(self, name))
        if self.outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {self.outcome!r}")

    def set(self, **values: Any) -> None:
        """Set bounded fields (strings, integers), each checked against its column."""
        for name, value in values.items():
            check(name, value)
            setattr(self, name, value)

    def finish(self, outcome: str, status: int) -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        if not 100 <= status <= 599:
            raise ValueError(f"status {status} is not an HTTP status")
        self.outcome, self.status = outcome, status

    def usage(self, prompt_tokens: int, completion_tokens: int, cost_nanos: int) -> None:
        check("prompt_tokens", prompt_tokens)
        check("completion_tokens", completion_tokens)
        check("cost_nanos", cost_nanos)
        self.prompt_tokens, self.completion_tokens = prompt_tokens, completion_tokens
        self.cost_nanos, self.usage_missing = cost_nanos, False

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in FIELDS}


FIELDS = tuple(f.name for f in fields(RequestRecord))
_CHECKED = tuple(name for name in FIELDS if name in BOUNDS)
if set(FIELDS) != {str(c.name) for c in ledger.columns} - {"id"}:
    raise RuntimeError("RequestRecord's fields must be the ledger's columns")
