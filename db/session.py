"""The per-request scope: one fresh Session, one transaction, always closed.

Every HTTP function runs its work through ``transaction()``. The work receives
the session, may flush, and never commits: the commit policy lives here alone, and so does
publishing the events a committed transaction emitted (``db/outbox.py``).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from db import outbox
from db.engine import Database
from db.errors import CommitOutcomeUnknown, Failure, classify, lost_connection
from db.outage import describe, outages

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_ATTEMPTS = 4
_BACKOFF_BASE = 0.025  # seconds; doubled per attempt, fully jittered
_BACKOFF_CAP = 0.5


def transaction(
    database: Database,
    work: Callable[[Session], T],
    *,
    read_only: bool = False,
    max_attempts: int = MAX_ATTEMPTS,
) -> T:
    """Run ``work`` in a new session and transaction, and return what it returns.

    ``read_only``: PostgreSQL refuses any write in the transaction (SQLSTATE 25006), which
    lets its COMMIT go without waiting for the answer (``db/driver.py``); the HTTP layer asks
    for it for GET and HEAD.

    The commit policy: commit exactly once, after ``work`` returns; roll back when
    it raises anything at all (``BaseException`` included: a worker may inject a
    timeout into the thread). The session is closed on every path.

    A serialization failure, a deadlock, or a connection lost before COMMIT was
    sent means the server kept nothing, so the whole of ``work`` runs again in a
    new session, up to ``max_attempts`` times with jittered backoff. A connection
    lost during COMMIT raises ``CommitOutcomeUnknown`` and is not retried, unless the
    transaction was read-only: then there was nothing to lose, and the result stands.

    Once committed, the events ``work`` emitted (``outbox.emit``) are published, before this
    returns and so before the answer; one that cannot be published waits in the outbox.
    """
    attempt = 1
    while True:
        try:
            result, emitted = _attempt(database, work, read_only=read_only)
        except (DBAPIError, OSError) as error:
            if attempt >= max_attempts or not _retryable(error):
                raise
            if not lost_connection(error):  # a lost one is logged where the pool drops it
                log.info("transaction attempt %d failed (%s), retrying", attempt, describe(error))
        else:
            outages.success()
            if emitted:
                outbox.publish_committed(database, emitted)
            return result
        # Jitter spreads the retries of colliding transactions; it needs no cryptographic quality.
        time.sleep(random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2**attempt)))  # noqa: S311
        attempt += 1


def _retryable(error: DBAPIError | OSError) -> bool:
    return classify(error) is Failure.TRANSIENT or lost_connection(error)


def _attempt(
    database: Database, work: Callable[[Session], T], *, read_only: bool
) -> tuple[T, list[outbox.Event]]:
    """One try of ``work``: its result and the events it emitted, once committed."""
    session = database.sessionmaker()
    try:
        session.info["read_only"] = read_only  # db/engine.py opens the transaction so
        result = work(session)
        session.flush()  # failures here are before COMMIT, like any other statement
        _commit(session, read_only=read_only)
        return result, session.info.get(outbox.EMITTED, [])
    except BaseException:
        _roll_back(session)
        raise
    finally:
        session.close()


def _commit(session: Session, *, read_only: bool) -> None:
    try:
        session.commit()
    except (DBAPIError, OSError) as error:
        if lost_connection(error):
            if read_only:
                # Nothing was written: what was read stands, and the pool drops the connection.
                return
            raise CommitOutcomeUnknown("connection lost during COMMIT") from error
        raise


def _roll_back(session: Session) -> None:
    try:
        session.rollback()
    except BaseException:
        # The connection's state is unknown: discard it rather than return it to the pool.
        log.debug("rollback failed; discarding the connection", exc_info=True)
        session.invalidate()
