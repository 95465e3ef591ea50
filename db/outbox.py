"""The transactional outbox: events written with what they announce, published once committed.

A function that changes something others should hear of calls ``emit`` inside its work, as it
would add a row: it takes the session, never commits, and the event is a row of
``outbox_events`` in the same transaction. A transaction that rolls back leaves no event; one
that commits cannot lose its events, whatever happens to the instance next.

After the commit, before the answer (Cloud Run may throttle the CPU once the answer is sent),
``db/session.py`` hands the transaction's events to ``publish_committed``: one call to Pub/Sub,
bounded by ``PUBLISH_TIMEOUT``, then the rows are marked published (on a tuned connection
without waiting for the server's answer). When Pub/Sub is away, or none is configured, the
events stay waiting and the request goes on; the ``relay_outbox`` function (``web/relay.py``,
called every minute by Cloud Scheduler) publishes whatever waits.
An event may be published twice (a relay and a request at the same moment, a mark that was
lost), never lost: consumers tell its publishes apart by its ``event_id`` attribute.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from itertools import groupby
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from db.models import OutboxEvent, utcnow
from db.pubsub import Message, Publisher, PublishFailed

if TYPE_CHECKING:
    from db.engine import Database

log = logging.getLogger(__name__)

# Published events are kept as long as Pub/Sub keeps a message, for looking back.
RETENTION = timedelta(days=7)
EMITTED = "outbox.emitted"  # the session.info key of the transaction's events
_RESERVED_ATTRIBUTE = "event_id"
_MAX_ATTRIBUTES = 99  # Pub/Sub's limit is 100, with event_id

# The outbox row as the tuned driver sends it, with the transaction's next statement.
_INSERT = (
    "INSERT INTO outbox_events (event_id, topic, data, attributes, created_at)"
    " VALUES ($1, $2, $3, $4, now())"
)
# ``mark_published`` as the tuned driver sends it, its answer not waited for; event ids are
# UUIDs, so a comma separates them.
_MARK_PUBLISHED = (
    "UPDATE outbox_events SET published_at = now() WHERE id IN (SELECT id FROM outbox_events"
    " WHERE event_id = ANY(string_to_array($1, ',')) AND published_at IS NULL"
    " FOR UPDATE SKIP LOCKED)"
)


@dataclass(frozen=True)
class Event:
    """An event of the outbox, as it is published."""

    event_id: str
    topic: str
    data: bytes
    attributes: Mapping[str, str]

    @property
    def message(self) -> Message:
        return Message(self.data, self.attributes)


def emit(
    session: Session,
    topic: str,
    data: Any,
    *,
    attributes: Mapping[str, str] | None = None,
) -> str:
    """Publish ``data`` (a JSON value) on ``topic`` once the session's transaction commits.

    The message carries ``attributes`` and ``event_id``, a new UUID that every publish of this
    event repeats; it is returned. On a connection tuned by ``db/driver.py`` the outbox row
    costs no round trip of its own: it goes in the same write as the transaction's next
    statement or its COMMIT. Raises ``ValueError`` for attributes Pub/Sub would refuse.
    """
    given = dict(attributes or {})
    _check_attributes(topic, given)
    event_id = str(uuid.uuid4())
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    event = Event(event_id, topic, text.encode(), {**given, _RESERVED_ATTRIBUTE: event_id})
    raw = session.connection().connection.dbapi_connection
    tuned = getattr(raw, "tuned", None)
    if tuned is not None:
        values = (event_id, topic, text, json.dumps(event.attributes))
        tuned.send_with_next(_INSERT, values, _one_row)
    else:
        session.add(
            OutboxEvent(
                event_id=event_id,
                topic=topic,
                data=text,
                attributes=dict(event.attributes),
                created_at=utcnow(),
            )
        )
    session.info.setdefault(EMITTED, []).append(event)
    return event_id


def publish_committed(database: Database, events: Sequence[Event]) -> None:
    """Publish a committed transaction's events and mark them published; never raises.

    Nothing is attempted without Pub/Sub, or while a recent failure pauses publishing: the
    events wait for the relay.
    """
    publisher = database.publisher
    if publisher is None or publisher.paused:
        return
    try:
        publish(publisher, events)
    except PublishFailed as error:
        log.warning("%d events wait in the outbox for the relay: %s", len(events), error)
        return
    event_ids = [event.event_id for event in events]
    try:
        with database.engine.connect() as connection:
            tuned = getattr(connection.connection.dbapi_connection, "tuned", None)
            if tuned is not None:
                # No round trip: a lost mark costs a duplicate publish, never a loss.
                tuned.send_unwaited(_MARK_PUBLISHED, (",".join(event_ids),))
                return
            with database.sessionmaker(bind=connection) as session:
                mark_published(session, event_ids)
                session.commit()
    except Exception:  # the relay publishes them again: a duplicate, never a loss
        log.warning("events published, not marked: the relay publishes them again", exc_info=True)


def publish(publisher: Publisher, events: Sequence[Event], *, timeout: float | None = None) -> None:
    """Publish ``events``, one call per run of the same topic; raises ``PublishFailed``."""
    for topic, same in groupby(events, key=lambda event: event.topic):
        publisher.publish(topic, [event.message for event in same], timeout=timeout)


def waiting(session: Session, limit: int) -> Sequence[OutboxEvent]:
    """Up to ``limit`` events waiting to be published, oldest first, locked for this
    transaction; those another transaction holds are skipped."""
    query = (
        select(OutboxEvent)
        .where(OutboxEvent.published_at.is_(None))
        .order_by(OutboxEvent.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return session.scalars(query).all()


def as_event(row: OutboxEvent) -> Event:
    """A waiting row as the event to publish."""
    return Event(row.event_id, row.topic, row.data.encode(), row.attributes)


def mark_published(session: Session, event_ids: Sequence[str]) -> None:
    """Mark these events published, unless another transaction holds them (a relay, which
    marks them itself)."""
    free = (
        select(OutboxEvent.id)
        .where(OutboxEvent.event_id.in_(event_ids), OutboxEvent.published_at.is_(None))
        .with_for_update(skip_locked=True)
    )
    session.execute(
        update(OutboxEvent).where(OutboxEvent.id.in_(free)).values(published_at=utcnow())
    )


def purge_expired(session: Session) -> int:
    """Remove events published longer ago than the retention period; how many were removed."""
    result = session.execute(
        delete(OutboxEvent).where(OutboxEvent.published_at < utcnow() - RETENTION)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def _one_row(inserted: int) -> None:
    if inserted != 1:
        raise RuntimeError(f"the outbox row was not written ({inserted} rows)")


def _check_attributes(topic: str, attributes: Mapping[str, str]) -> None:
    """Refuse what Pub/Sub would refuse at publish time, when it is too late to say so."""
    if not topic or len(topic) > 255 or topic.startswith("goog"):
        raise ValueError(f"not a Pub/Sub topic name: {topic!r}")
    if len(attributes) > _MAX_ATTRIBUTES:
        raise ValueError(f"at most {_MAX_ATTRIBUTES} attributes, got {len(attributes)}")
    for key, value in attributes.items():
        if key == _RESERVED_ATTRIBUTE:
            raise ValueError("event_id is set by emit: every event gets its own")
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"attribute {key!r}: keys and values are strings")
        if not key or len(key.encode()) > 256 or key.startswith("goog"):
            raise ValueError(f"attribute key {key!r}: 1 to 256 bytes, not starting with goog")
        if len(value.encode()) > 1024:
            raise ValueError(f"attribute {key!r}: the value passes 1024 bytes")
