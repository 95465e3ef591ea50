"""Idempotency keys: a retried request replays the stored response instead of acting twice.

The key is claimed with an INSERT at the start of the request's transaction and the
response is stored in the same transaction as the effect, so the two commit or vanish
together. A second request with the same key blocks on the first one's uncommitted row
(PostgreSQL's unique index makes it wait), then replays what the first stored; if the
first rolled back, the second claims the key and runs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, update
from sqlalchemy.orm import Session

from db import dialects
from db.models import IdempotencyRecord, utcnow
from service.errors import IdempotencyKeyMismatch, RequestInProgress

RETENTION = timedelta(hours=24)


@dataclass(frozen=True)
class StoredResponse:
    """A response kept under an idempotency key."""

    status: int
    body: Any
    headers: dict[str, str]


def fingerprint(method: str, path: str, body: Any) -> str:
    """A digest of what makes two requests the same request: method, path and JSON body."""
    canonical = json.dumps([method, path, body], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def claim(session: Session, key: str, request_fingerprint: str) -> StoredResponse | None:
    """Claim ``key`` for this request, or return the response stored under it.

    Raises ``IdempotencyKeyMismatch`` when the key was used for another request.
    """
    inserted = session.execute(
        dialects.insert(session, IdempotencyRecord)
        .values(key=key, fingerprint=request_fingerprint, created_at=utcnow())
        .on_conflict_do_nothing(index_elements=["key"])
        .returning(IdempotencyRecord.key)
    ).first()
    if inserted is not None:
        return None
    record = session.get(IdempotencyRecord, key, populate_existing=True)
    if record is None or record.status is None:
        # Only a committed claim is visible, and it is committed with its response:
        # this is a claim removed between our INSERT and SELECT. Let the caller retry.
        raise RequestInProgress("a request with this idempotency key is in progress")
    if record.fingerprint != request_fingerprint:
        raise IdempotencyKeyMismatch(
            "this idempotency key was used for a different method, path or body"
        )
    return StoredResponse(record.status, record.body, dict(record.headers or {}))


def store(session: Session, key: str, response: StoredResponse) -> None:
    """Keep ``response`` under the key claimed earlier in this transaction."""
    session.execute(
        update(IdempotencyRecord)
        .where(IdempotencyRecord.key == key)
        .values(status=response.status, body=response.body, headers=response.headers)
    )


def purge_expired(session: Session) -> int:
    """Remove keys older than the retention period; return how many were removed."""
    result = session.execute(
        delete(IdempotencyRecord).where(IdempotencyRecord.created_at < utcnow() - RETENTION)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]
