"""Errors that belong to the caller's request rather than to the service.

Each carries the API error code; only the HTTP layer decides the status code.
"""

from __future__ import annotations

from typing import Any, ClassVar


class DomainError(Exception):
    """Base of the errors a request can run into by asking for something impossible."""

    code: ClassVar[str]

    def __init__(self, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class NotFound(DomainError):
    """Raised when an id in the path or the body names no row."""

    code = "not_found"


class Conflict(DomainError):
    """Raised when the request is valid but clashes with the data, such as a taken email."""

    code = "conflict"


class InsufficientFunds(Conflict):
    """Raised when a transfer would take a balance below zero."""

    code = "insufficient_funds"


class RequestInProgress(Conflict):
    """Raised when a request with the same idempotency key is still running."""

    code = "request_in_progress"


class ValidationFailed(DomainError):
    """Raised when input breaks a field rule; ``details`` names each failing value."""

    code = "validation_failed"

    def __init__(
        self, details: list[dict[str, Any]], message: str = "the request is not valid"
    ) -> None:
        super().__init__(message, details)


class IdempotencyKeyMismatch(DomainError):
    """Raised when an idempotency key is reused for a different request."""

    code = "idempotency_key_mismatch"
