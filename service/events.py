"""Events handled once: an event's identity is claimed in the transaction of its effect.

An event (a Pub/Sub message, an Eventarc CloudEvent) is named by its CloudEvent ``source``
and ``id``. ``claim`` inserts that identity as ``applied`` at the start of the transaction
that applies the event, so the two commit or vanish together. A second delivery of the same
event finds the row and raises ``AlreadyHandled``; one arriving while the first is still
running waits on the first one's uncommitted row (PostgreSQL's primary key makes it wait),
then finds it, or claims the event itself if the first rolled back.

An event refused for good is recorded as ``rejected`` with its reason, in a transaction of
its own, after the one that tried it was rolled back: its redeliveries find that record.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from db import dialects
from db.models import HandledEvent, utcnow

# Pub/Sub keeps an unacknowledged message for 7 days at most: a redelivery comes within that.
RETENTION = timedelta(days=7)
MAX_REASON = 2000

# The claim as the tuned driver sends it, ahead of the transaction's first statement.
_CLAIM = (
    "INSERT INTO handled_events (source, id, type, outcome, handled_at)"
    " VALUES ($1, $2, $3, 'applied', now()) ON CONFLICT DO NOTHING"
)


@dataclass(frozen=True)
class Identity:
    """What names one event across its deliveries."""

    source: str
    id: str
    type: str


class AlreadyHandled(Exception):
    """Raised when an earlier delivery of the event committed its outcome."""

    def __init__(self, identity: Identity) -> None:
        super().__init__(f"event {identity.id} from {identity.source} was handled before")
        self.identity = identity


class Claim:
    """The claim of one event in one transaction; ``settle`` makes sure it reached the server."""

    def __init__(self, identity: Identity, tuned: Any = None) -> None:
        self.identity = identity
        self.tuned = tuned  # db/driver.py's connection, when the claim travels ahead
        self.settled = False

    def check(self, inserted: int) -> None:
        """Raise ``AlreadyHandled`` unless the claim inserted its row."""
        self.settled = True
        if inserted != 1:
            raise AlreadyHandled(self.identity)

    def settle(self) -> None:
        """Send a claim still waiting for a statement to travel with (the work ran none)."""
        if not self.settled and self.tuned is not None:
            self.tuned.flush()


def claim(session: Session, identity: Identity) -> Claim:
    """Claim the event for the session's transaction; raise ``AlreadyHandled`` if it was handled.

    On a connection tuned by ``db/driver.py`` the claim costs no round trip of its own: it
    travels in the same write as the transaction's first statement, and that statement
    raises ``AlreadyHandled``. Elsewhere it is a statement of its own, run here. Either way,
    call ``Claim.settle`` before the transaction commits.
    """
    raw = session.connection().connection.dbapi_connection
    held = Claim(identity, getattr(raw, "tuned", None))
    if held.tuned is not None:
        held.tuned.send_ahead(_CLAIM, (identity.source, identity.id, identity.type), held.check)
        return held
    inserted = _record(session, identity, "applied")
    held.check(1 if inserted else 0)
    return held


def reject(session: Session, identity: Identity, reason: str) -> bool:
    """Record the event as refused for good, with ``reason``; whether this was its first
    outcome (otherwise an earlier delivery's stands)."""
    return _record(session, identity, "rejected", reason[:MAX_REASON])


def outcome(session: Session, identity: Identity) -> HandledEvent | None:
    """The recorded outcome of the event, if any."""
    return session.scalars(
        select(HandledEvent).where(
            HandledEvent.source == identity.source, HandledEvent.id == identity.id
        )
    ).first()


def purge_expired(session: Session) -> int:
    """Remove outcomes older than the retention period; return how many were removed."""
    result = session.execute(
        delete(HandledEvent).where(HandledEvent.handled_at < utcnow() - RETENTION)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def _record(session: Session, identity: Identity, outcome: str, reason: str | None = None) -> bool:
    """Insert the event's outcome unless one is recorded; whether it was inserted."""
    inserted = session.execute(
        dialects.insert(session, HandledEvent)
        .values(
            source=identity.source,
            id=identity.id,
            type=identity.type,
            outcome=outcome,
            reason=reason,
            handled_at=utcnow(),
        )
        .on_conflict_do_nothing(index_elements=["source", "id"])
        .returning(HandledEvent.id)
    ).first()
    return inserted is not None
