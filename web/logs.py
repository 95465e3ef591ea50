"""Structured logs: one JSON object per line on stdout, as Cloud Logging reads them.

Each line of a request carries its request id (and trace, when the caller sent one),
taken from a context variable set once per request.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from db.config import ConfigError, log_level


@dataclass(frozen=True)
class RequestContext:
    """What every log line of one request carries."""

    request_id: str
    trace: str | None = None


current_request: ContextVar[RequestContext | None] = ContextVar("current_request", default=None)

# Attributes every LogRecord has; anything else given through ``extra=`` is logged as a field.
_STANDARD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """Formats a record as one Cloud Logging JSON line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "severity": record.levelname,
            "message": record.getMessage(),
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "logger": record.name,
        }
        context = current_request.get()
        if context is not None:
            entry["request_id"] = context.request_id
            if context.trace:
                entry["logging.googleapis.com/trace"] = context.trace
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRIBUTES and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["stack_trace"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging() -> None:
    """Send every log record as JSON to stdout; called once, when ``main`` is imported."""
    try:
        level = log_level()
    except ConfigError as error:
        level = "INFO"
        problem: str | None = str(error)
    else:
        problem = None
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for existing in [h for h in root.handlers if isinstance(h.formatter, JsonFormatter)]:
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    # Alembic narrates every migration step at INFO; its warnings still show.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, root.level))
    if problem:
        logging.getLogger(__name__).error("configuration error: %s", problem)
