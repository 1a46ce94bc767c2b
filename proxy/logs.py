"""euroute's log: one line per event on stderr, readable text or one JSON object per line
(`EUROUTE_LOG_FORMAT`). uvicorn's own lines take the same form; its access log is off, because
the gateway writes one line per finished request instead (`log_request`), with what the ledger
knows about it. No line carries a prompt, a completion or a key.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from typing import Any

import orjson

from proxy.settings import Settings

log = logging.getLogger("euroute")
_requests = logging.getLogger("euroute.request")
# Text values made only of these print bare; anything else is quoted, so a client-chosen model
# name cannot forge a second line or a second field.
_BARE = re.compile(r"[\w.:/@+\-,*]+")


def _time(created: float) -> str:
    return dt.datetime.fromtimestamp(created, dt.UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the line's fields."""

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

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_time(record.created)} {record.levelname.lower():7} {record.getMessage()}"
        fields = getattr(record, "fields", None)
        if fields:
            line += "".join(f" {k}={_text(v)}" for k, v in fields.items() if v is not None)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _text(value: Any) -> str:
    if isinstance(value, int | float):
        return str(value)
    text = str(value)
    return text if _BARE.fullmatch(text) else orjson.dumps(text).decode()


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
