"""euroute's log: one line per event on stderr, readable text or one JSON object per line
(`EUROUTE_LOG_FORMAT`). uvicorn's own lines take the same form; its access log is off, because
the gateway writes one line per finished request instead (`log_request`), with what the ledger
knows about it, and one per request refused for want of a valid key (`log_unauthorized`). No
line carries a prompt, a completion or a key.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import orjson

from proxy.errors import EurouteError, UpstreamError
from proxy.ledger.record import RequestRecord
from proxy.settings import Settings

log = logging.getLogger("euroute")
_requests = logging.getLogger("euroute.request")
_second: tuple[int, str] = (-1, "")


def _plain(text: str) -> bool:
    """Whether a text value prints bare: a client-chosen model name must not forge a second
    line or a second field. (str methods, not a regular expression: measured, 20x faster.)"""
    return (text.isprintable() and " " not in text and '"' not in text and "=" not in text
            and "\\" not in text)


def _time(created: float) -> str:
    global _second
    whole = int(created)
    cached = _second  # one read: another thread may replace it
    if cached[0] != whole:
        cached = _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{cached[1]}.{int((created - whole) * 1000):03d}Z"


def _lean_records() -> None:
    # euroute's formatters print no thread, process or source line: records need not look them
    # up (the logging HOWTO's "Optimization"); measured, a third of a line's cost.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None  # type: ignore[attr-defined]


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the line's fields."""

    def __init__(self) -> None:
        super().__init__()
        _lean_records()

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"time": _time(record.created), "level": record.levelname.lower(),
                               "logger": record.name, "message": record.getMessage()}
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return orjson.dumps(out).decode()


class TextFormatter(logging.Formatter):
    """`time level message key=value ...`, values quoted when they are not plain words."""

    def __init__(self) -> None:
        super().__init__()
        _lean_records()

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_time(record.created)} {record.levelname.lower():7} {record.getMessage()}"
        fields = getattr(record, "fields", None)
        if fields:
            pairs = [(k, str(v)) for k, v in fields.items() if v is not None]
            # Usually every value is plain: one check for all of them.
            if _plain("".join([v for _, v in pairs])):
                line += "".join([f" {k}={v}" for k, v in pairs])
            else:
                line += "".join([f" {k}={_text(v)}" for k, v in pairs])
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _text(text: str) -> str:
    return text if _plain(text) else orjson.dumps(text).decode()


def config(settings: Settings) -> dict[str, Any]:
    """A `logging.config.dictConfig` for euroute's and uvicorn's loggers (uvicorn applies it
    in every worker process)."""
    level = settings.log_level.upper()
    formatter = JsonFormatter if settings.log_format == "json" else TextFormatter
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"euroute": {"()": f"{__name__}.{formatter.__name__}"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "euroute",
                                "stream": "ext://sys.stderr"}},
        "loggers": {
            "euroute": {"handlers": ["stderr"], "level": level, "propagate": False},
            "uvicorn": {"handlers": ["stderr"], "level": level, "propagate": False},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
    }


def log_request(record: RequestRecord, failure: EurouteError | None = None) -> None:
    """The one line for a finished request, from its ledger record (and the error that ended
    it). Never the prompt, the completion, a key or an upstream's error text (which may quote
    the prompt): for upstream failures, their status, type and code."""
    level = logging.WARNING if record.status >= 500 else logging.INFO
    if not _requests.isEnabledFor(level):
        return
    fields: dict[str, Any] = {
        "request_id": record.request_id, "app": record.app, "endpoint": record.endpoint,
        "model": record.model, "route": record.route, "policy": record.policy,
        "decision_id": record.decision_id, "outcome": record.outcome, "status": record.status,
        # Microseconds, as in the ledger: an int prints several times faster than a float.
        "latency_us": record.latency_us, "ttfb_us": record.ttfb_us,
        "prompt_tokens": record.prompt_tokens, "completion_tokens": record.completion_tokens,
        "failed_requirements": record.failed_requirements,
    }
    if isinstance(failure, UpstreamError) or (failure is not None
                                              and failure.type == "upstream_error"):
        fields.update(error_type=failure.type, error_code=failure.code)
        if isinstance(failure, UpstreamError):
            fields["upstream_status"] = failure.status
        else:  # euroute's own words: unreachable, timed out, credentials refused (HTTP 401)
            fields["error"] = failure.message
    _requests.log(level, "request", extra={"fields": fields})


def log_unauthorized(scope: Mapping[str, Any], reason: str) -> None:
    """The one line for a request refused with 401: why, from which address (the TCP peer: a
    load balancer's when there is one) and to what. Nothing of the key it presented, not even
    its prefix. The path is cut short: an unauthenticated client must not make long lines. The
    request id is the one the answer names in `x-request-id`."""
    client = scope.get("client")
    _requests.warning("unauthorized", extra={"fields": {
        "request_id": scope.get("euroute.request_id"), "reason": reason,
        "client": client[0] if client else None, "method": scope.get("method"),
        "path": str(scope.get("path", ""))[:200]}})
