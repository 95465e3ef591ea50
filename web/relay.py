"""The outbox's relay: publishes every event still waiting, and purges what has expired.

Cloud Scheduler calls it every minute (``deploy.sh`` creates the job). Events wait when
Pub/Sub was away at their commit, or the instance stopped between the commit and the
publish. Each batch is taken ``FOR UPDATE SKIP LOCKED`` in a transaction that publishes it and
marks it published: relays running at once take different events, and a batch whose marks are
lost (the transaction rolled back) is published again by the next relay, a duplicate that the
``event_id`` attribute lets consumers recognise, never a loss.
"""

from __future__ import annotations

import time

import flask
from sqlalchemy.orm import Session

from db import outbox
from db.engine import Database
from db.models import utcnow
from db.pubsub import Publisher
from db.session import transaction
from service import events, idempotency
from web import errors, http
from web.errors import Reply

BATCH = 500
# Seconds one publish may take here: no request waits on this one.
PUBLISH_TIMEOUT = 10.0
# Seconds after which no further batch starts, inside the function's time-out (60 s).
DEADLINE = 40.0


def serve(request: flask.Request, database: Database) -> flask.Response:
    """``POST``: publish what waits, purge what expired. 200 with the counts once nothing
    waits; 503 ``pubsub_unavailable`` while Pub/Sub does not take them, so that the
    scheduler tries again."""
    return http.respond(request, database, lambda: _relay(request, database))


def _relay(request: flask.Request, database: Database) -> Reply:
    if request.method != "POST":
        raise errors.method_not_allowed(["POST"])
    publisher = database.publisher
    if publisher is None:
        raise errors.HttpError(
            500,
            "pubsub_not_configured",
            "no Pub/Sub configured: set GOOGLE_CLOUD_PROJECT (and PUBSUB_EMULATOR_HOST for the"
            " emulator)",
        )
    published = 0
    started = time.monotonic()
    while True:
        count = transaction(database, lambda session: _publish_batch(session, publisher))
        published += count
        if count < BATCH or time.monotonic() - started > DEADLINE:
            break
    purged = transaction(database, _purge)
    return Reply(200, {"published": published, "purged": purged})


def _publish_batch(session: Session, publisher: Publisher) -> int:
    """Publish the oldest waiting events this relay can lock, and mark them; how many."""
    rows = outbox.waiting(session, BATCH)
    outbox.publish(publisher, [outbox.as_event(row) for row in rows], timeout=PUBLISH_TIMEOUT)
    now = utcnow()
    for row in rows:
        row.published_at = now
    return len(rows)


def _purge(session: Session) -> int:
    """Remove what is kept past its retention: published events, event outcomes, and
    idempotency records."""
    return (
        outbox.purge_expired(session)
        + events.purge_expired(session)
        + idempotency.purge_expired(session)
    )
