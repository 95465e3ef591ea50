"""The one place where errors become HTTP responses.

Bodies are ``{"error": {"code", "message", "details"?}}`` and never carry SQL,
driver or exception names, stack traces or connection strings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from db.errors import Failure, classify, sqlstate
from db.outage import describe, outages
from db.pubsub import PublishFailed
from service.errors import (
    Conflict,
    DomainError,
    IdempotencyKeyMismatch,
    NotFound,
    ValidationFailed,
)

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = "1"


@dataclass
class Reply:
    """A response before it is encoded: status, JSON body (None for no body), headers."""

    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


class HttpError(Exception):
    """Raised by the HTTP layer for requests it refuses before any domain code runs."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


def bad_request(message: str) -> HttpError:
    """400: the body is not a JSON object, or a header is malformed."""
    return HttpError(400, "bad_request", message)


def not_found() -> HttpError:
    """404: no resource at this path."""
    return HttpError(404, "not_found", "no resource at this path")


def method_not_allowed(allowed: list[str]) -> HttpError:
    """405, naming the methods the path accepts."""
    allow = ", ".join(allowed)
    return HttpError(405, "method_not_allowed", f"allowed: {allow}", {"Allow": allow})


def payload_too_large(limit: int) -> HttpError:
    """413: the body is over ``limit`` bytes."""
    return HttpError(413, "payload_too_large", f"the body is over {limit} bytes")


def request_timeout() -> HttpError:
    """408: the body did not arrive in time (``BODY_TIMEOUT``)."""
    return HttpError(408, "request_timeout", "the body did not arrive in time")


def unsupported_media_type(message: str) -> HttpError:
    """415: a body was needed and it was not declared as UTF-8 JSON."""
    return HttpError(415, "unsupported_media_type", message)


_DOMAIN_STATUS: list[tuple[type[DomainError], int]] = [
    (NotFound, 404),
    (Conflict, 409),
    (ValidationFailed, 422),
    (IdempotencyKeyMismatch, 422),
]

_FAILURE_REPLY: dict[Failure, tuple[int, str, str]] = {
    Failure.UNIQUE_VIOLATION: (409, "conflict", "the request conflicts with existing data"),
    Failure.FOREIGN_KEY_VIOLATION: (409, "conflict", "the request conflicts with related data"),
    Failure.TRANSIENT: (503, "service_unavailable", "the database is busy; try again"),
    Failure.UNAVAILABLE: (503, "service_unavailable", "the database is unavailable; try again"),
}


def error_reply(error: BaseException) -> Reply:
    """The response for an exception raised while serving a request."""
    if isinstance(error, HttpError):
        return _reply(error.status, error.code, error.message, headers=error.headers)
    if isinstance(error, DomainError):
        status = next(code for kind, code in _DOMAIN_STATUS if isinstance(error, kind))
        return _reply(status, error.code, error.message, error.details)
    if isinstance(error, PublishFailed):
        log.warning("the outbox's events were not published: %s", error)
        return _reply(
            503, "pubsub_unavailable", "Pub/Sub did not take the events; they wait in the outbox"
        )
    failure = classify(error)
    if failure is Failure.SCHEMA_MISMATCH:
        log.error(
            "the database has no table or column the code uses; the schema is behind the "
            "models: write the migration (python -m db revision) and apply it (python -m db "
            "upgrade)",
            exc_info=error,
        )
        return _reply(500, "internal", "internal error")
    if failure is Failure.REFUSED and sqlstate(error) == "42501":
        log.error(
            "the database user lacks a privilege (%s): the runtime role is given its privileges"
            " by python -m db upgrade (db/roles.py); run it, and check that the functions' user"
            " is a member of the runtime role",
            describe(error),
        )
        return _reply(500, "internal", "internal error")
    if failure is Failure.REFUSED:
        log.error(
            "the database refuses this service (%s); retrying will not help: check the "
            "database settings, the user and its password or grants",
            describe(error),
        )
        return _reply(500, "internal", "internal error")
    if failure is Failure.INVALID_DATA:
        log.warning("the database rejected a value that validation let through", exc_info=error)
        details = [{"loc": ["body"], "msg": "a value is out of range or malformed"}]
        return _reply(422, "validation_failed", "the request is not valid", details)
    if failure in _FAILURE_REPLY:
        status, code, message = _FAILURE_REPLY[failure]
        if status == 503:
            if failure is Failure.UNAVAILABLE:
                outages.failure(describe(error))
            return _reply(status, code, message, headers={"Retry-After": RETRY_AFTER_SECONDS})
        return _reply(status, code, message)
    log.error("unhandled error", exc_info=error)
    return _reply(500, "internal", "internal error")


def _reply(
    status: int,
    code: str,
    message: str,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    error: dict[str, Any] = {"code": code, "message": message}
    if details:
        error["details"] = details
    return Reply(status, {"error": error}, headers or {})
