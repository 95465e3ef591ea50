"""Logs: one JSON object per line on Cloud Run, readable lines in a terminal.

JSON is what Cloud Logging parses (severity, trace, httpRequest); a terminal gets one
line per record and tracebacks as Python prints them. ``LOG_FORMAT`` chooses (``json`` or
``text``); by default it is JSON where Cloud Run sets ``K_SERVICE``, text elsewhere.
Each line of a request carries its request id (and trace, when the caller sent one),
taken from a context variable set once per request.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from db.config import ConfigError, log_format, log_level
from web import jsontext


@dataclass(frozen=True)
class RequestContext:
    """What every log line of one request carries."""

    request_id: str
    trace: str | None = None  # projects/PROJECT/traces/TRACE_ID
    span_id: str | None = None
    sampled: bool = False


_CLOUD_TRACE = re.compile(r"^([0-9a-fA-F]{32})(?:/([0-9]{1,20}))?(?:;o=([01]))?$")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def request_context(
    request_id: str,
    *,
    project: str | None,
    cloud_trace: str | None = None,
    traceparent: str | None = None,
) -> RequestContext:
    """A request's log context: its id, and its trace in ``project``, from the values of its
    ``X-Cloud-Trace-Context`` or ``traceparent`` header."""
    trace_id = span_id = None
    sampled = False
    if cloud_trace and (match := _CLOUD_TRACE.match(cloud_trace.strip())):
        trace_id, span_id, sampled = match[1].lower(), match[2], match[3] == "1"
    elif traceparent and (match := _TRACEPARENT.match(traceparent.strip())):
        trace_id, span_id, sampled = match[1], match[2], int(match[3], 16) & 1 == 1
    if trace_id is None or project is None or trace_id == "0" * 32:
        return RequestContext(request_id)
    return RequestContext(request_id, f"projects/{project}/traces/{trace_id}", span_id, sampled)


current_request: ContextVar[RequestContext | None] = ContextVar("current_request", default=None)

# Attributes every LogRecord has; anything else given through ``extra=`` is logged as a field.
_STANDARD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """Formats a record as one Cloud Logging JSON line."""

    def __init__(self) -> None:
        super().__init__()
        self._second: tuple[int, str] = (0, "")  # a second, and its text: lines come in bursts

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "severity": record.levelname,
            "message": record.getMessage(),
            "time": self._time(record.created),
            "logger": record.name,
        }
        context = current_request.get()
        if context is not None:
            entry["request_id"] = context.request_id
            if context.trace:
                entry["logging.googleapis.com/trace"] = context.trace
                entry["logging.googleapis.com/trace_sampled"] = context.sampled
                if context.span_id:
                    entry["logging.googleapis.com/spanId"] = context.span_id
        attributes = vars(record)
        for key in sorted(attributes.keys() - _STANDARD_ATTRIBUTES):
            if not key.startswith("_"):
                entry[key] = attributes[key]
        if record.exc_info:
            entry["stack_trace"] = self.formatException(record.exc_info)
        return jsontext.loose(entry)

    def _time(self, created: float) -> str:
        """``created`` in RFC 3339, UTC, to the microsecond."""
        whole, micros = divmod(round(created * 1_000_000), 1_000_000)
        second, text = self._second
        if second != whole:
            text = datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._second = (whole, text)
        return f"{text}.{micros:06d}+00:00"


class DeadConnectionNoise(logging.Filter):
    """Keeps SQLAlchemy's pool from logging an ERROR with a traceback for each dead connection.

    When the server or the network drops a connection, the pool fails to close or reset
    its socket as it discards it. The loss itself is logged once (``db.outage``); these
    records are the same event again, shown only at DEBUG.
    """

    MESSAGES = (
        "Exception closing connection",
        "Exception terminating connection",
        "Exception during reset or similar",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("sqlalchemy.pool") and str(record.msg).startswith(self.MESSAGES):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.exc_info = record.exc_text = None
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


class TextFormatter(logging.Formatter):
    """Formats a record as one readable line: time, level, logger, message, request id."""

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        line = f"{moment} {record.levelname:<8} {record.name}: {record.getMessage()}"
        context = current_request.get()
        if context is not None:
            line += f"  [{context.request_id}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _StandardOutput(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stdout`` is when a record comes, not when it was configured."""

    @property
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


_FORMATTERS: dict[str, type[logging.Formatter]] = {"json": JsonFormatter, "text": TextFormatter}


def configure_logging() -> None:
    """Send every log record to stdout in the chosen format; called once, when ``main`` loads.

    A bad ``LOG_LEVEL`` or ``LOG_FORMAT`` falls back to the default here; the settings
    check that follows stops the process and names it.
    """
    try:
        level = log_level()
    except ConfigError:
        level = "INFO"
    try:
        chosen = log_format()
    except ConfigError:
        chosen = "json" if os.environ.get("K_SERVICE") else "text"
    # Neither format shows where a record was made, nor its thread or process: Python's logging
    # HOWTO ("Optimization") says how to skip gathering them (about a seventh of a line's cost).
    logging._srcfile = None  # the HOWTO's own way to skip sys._getframe()
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.logAsyncioTasks = False  # type: ignore[attr-defined,unused-ignore]  # 3.12+
    handler = _StandardOutput()
    handler.setFormatter(_FORMATTERS[chosen]())
    handler.addFilter(DeadConnectionNoise())
    root = logging.getLogger()
    for existing in [
        h for h in root.handlers if isinstance(h.formatter, tuple(_FORMATTERS.values()))
    ]:
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    # Alembic narrates every migration step at INFO; its warnings still show.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, root.level))
    # google-auth cuts the "google" loggers off from the root's handler at its first request
    # unless that logger was configured here (google/auth/_helpers.py): configure it, so that
    # google-auth's warnings and errors, and the Cloud SQL connector's lines at LOG_LEVEL,
    # reach the log. google-auth's own DEBUG lines narrate HTTP requests: kept out.
    google = logging.getLogger("google")
    google.setLevel(max(logging.WARNING, root.level))
    google.propagate = True  # turned off by google-auth if it decided before this ran
    logging.getLogger("google.cloud.sql.connector").setLevel(root.level)
