"""Every failure a client can see, rendered in the OpenAI error shape.

    EurouteError
    ├── BadRequest              400 invalid_request_error
    │   └── PayloadTooLarge     413
    ├── Unauthorized            401 authentication_error
    ├── Forbidden               403 permission_error
    │   └── PolicyViolation     403 policy_violation / no_compliant_route (+ decision_id, reasons)
    ├── NotFound                404 invalid_request_error
    │   └── ModelNotFound       404 model_not_found
    ├── RateLimited             429 rate_limit_exceeded (+ Retry-After)
    │   └── BudgetExceeded      429 budget_exceeded
    ├── LedgerTampered          409 integrity_error (+ the finding)
    ├── UpstreamError           the upstream's own 4xx/5xx, reshaped
    ├── UpstreamUnavailable     502 upstream_error
    ├── UpstreamTimeout         504 upstream_timeout
    └── Unavailable             503 service_unavailable (the ledger cannot be written)
        ├── StoreUnavailable    503 (a budget or rate-limit store cannot be read)
        └── CredentialsMissing  503 route_credentials_missing (no compliant route has its key)

Lower-layer errors (httpx, the database) are translated once, where they happen.
"""

from __future__ import annotations

from typing import Any

import orjson


class EurouteError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}

    def headers(self) -> list[tuple[bytes, bytes]]:
        return []

    def render(self) -> bytes:
        return orjson.dumps({"error": self.body()})


class BadRequest(EurouteError):
    status = 400
    type = "invalid_request_error"


class PayloadTooLarge(BadRequest):
    status = 413
    code = "payload_too_large"


class Unauthorized(EurouteError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(EurouteError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class PolicyViolation(Forbidden):
    type = "policy_violation"
    code = "no_compliant_route"

    def __init__(self, message: str, *, decision_id: str, reasons: list[dict[str, str]]) -> None:
        super().__init__(message)
        self.decision_id = decision_id
        self.reasons = reasons

    def body(self) -> dict[str, Any]:
        return {**super().body(), "decision_id": self.decision_id, "reasons": self.reasons}


class NotFound(EurouteError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class RateLimited(EurouteError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: int, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"retry-after", str(self.retry_after_s).encode())]


class BudgetExceeded(RateLimited):
    code = "budget_exceeded"


class LedgerTampered(EurouteError):
    """`audit verify` found an altered, missing or reordered row."""

    status = 409
    type = "integrity_error"
    code = "ledger_verification_failed"

    def __init__(self, finding: str, *, rows_verified: int) -> None:
        super().__init__(f"ledger verification failed: {finding}")
        self.finding = finding
        self.rows_verified = rows_verified

    def body(self) -> dict[str, Any]:
        return {**super().body(), "finding": self.finding, "rows_verified": self.rows_verified}


class UpstreamError(EurouteError):
    """The upstream answered with an error; its status is kept, its body reshaped."""

    type = "upstream_error"

    def __init__(self, status: int, message: str, *, type: str | None, param: str | None,
                 code: str | None) -> None:
        super().__init__(message, param=param, code=code)
        self.status = status
        if type:
            self.type = type


class UpstreamUnavailable(EurouteError):
    status = 502
    type = "upstream_error"
    code = "upstream_unavailable"


class UpstreamTimeout(EurouteError):
    status = 504
    type = "upstream_error"
    code = "upstream_timeout"


class Unavailable(EurouteError):
    status = 503
    type = "service_unavailable"
    code = "service_unavailable"


class StoreUnavailable(Unavailable):
    pass


class CredentialsMissing(Unavailable):
    code = "route_credentials_missing"
