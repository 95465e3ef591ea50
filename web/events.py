"""Event functions: each Pub/Sub message applied once, in the same scope as an HTTP request.

Pub/Sub (pushing to the function directly, or through an Eventarc trigger) delivers every
message at least once, and redelivers it after any answer that is not a success. So the
answer says what happens next:

- applied, or handled by an earlier delivery: a success, and the message is acknowledged;
- refused for good (what HTTP would answer with a 4xx: malformed data, a broken field rule,
  an unknown user, a balance too low): recorded once with its reason, one WARNING line, and
  acknowledged, so a poison message is never redelivered;
- anything else (the database unreachable or busy after the retries, a lost connection, a
  refused login, a bug): an error answer, with the status HTTP would answer, and Pub/Sub
  redelivers the message with backoff until it is applied or its retry window ends.

The decision is made in ``web/errors.py``, the one place where failures become statuses.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import flask
from cloudevents.http import CloudEvent
from sqlalchemy.orm import Session
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException

from db.engine import Database
from db.session import transaction
from service import events
from web import errors, http
from web.errors import Reply
from web.logs import current_request, request_context

log = logging.getLogger(__name__)

PUBSUB_PUBLISHED = "google.cloud.pubsub.topic.v1.messagePublished"
# The attribute that names an event across its publishes (db/outbox.py sets it).
EVENT_ID_ATTRIBUTE = "event_id"
MAX_EVENT_ID = 255
_PUBSUB_SOURCE = re.compile(r"//pubsub\.googleapis\.com/projects/([^/]+)/topics/([^/]+)")
_LOG_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def malformed_event(message: str) -> errors.HttpError:
    """400: the event cannot be read (not a Pub/Sub message, data that is not JSON)."""
    return errors.HttpError(400, "malformed_event", message)


def unknown_event(message: str) -> errors.HttpError:
    """400: an event of a type, or from a topic, that the function does not take."""
    return errors.HttpError(400, "unknown_event", message)


class DeliveryFailed(HTTPException):
    """Fails a delivery so that it is redelivered; the answer is the one HTTP would give."""

    def __init__(self, reply: Reply) -> None:
        context = current_request.get()
        request_id = context.request_id if context else http.new_request_id()
        response = http.encode(reply, request_id)
        super().__init__(description=reply.body["error"]["message"], response=response)
        self.code = reply.status


@dataclass(frozen=True)
class Message:
    """A Pub/Sub message, as an event function receives it."""

    id: str
    data: bytes
    attributes: Mapping[str, str] = field(default_factory=dict)
    publish_time: str | None = None

    def json(self) -> dict[str, Any]:
        """The data as a JSON object; a 400 ``malformed_event`` when it is not one."""
        try:
            value = http.json_value(self.data)
        except ValueError as error:
            raise malformed_event(f"the message's data {error}") from None
        if not isinstance(value, dict):
            raise malformed_event("the message's data must be a JSON object")
        return value


EventFunction = Callable[[Session, Message], None]


def event_scope(
    database: Database, *, topic: str
) -> Callable[[EventFunction], Callable[[CloudEvent], None]]:
    """Give a ``@functions_framework.cloud_event`` function the whole scope, once per event.

    The decorated function receives a fresh session and the ``Message`` of a Pub/Sub
    message published on ``topic`` (pushed directly, with the topic in the push path, or
    through an Eventarc trigger). It runs in ``transaction()`` with the event's identity
    claimed in the same transaction: one commit after it returns, a rollback when it raises,
    retries of transient failures, the session always closed, and a redelivered message
    changes nothing. It raises what an HTTP view raises (``service/errors.py``); what HTTP
    answers with a 4xx is recorded and acknowledged, anything else is redelivered.
    ``deploy.sh`` deploys it with ``--trigger-topic=TOPIC --retry``::

        @functions_framework.cloud_event
        @event_scope(database, topic="transfer-requests")
        def transfer_events(session: Session, message: Message) -> None: ...
    """

    def decorate(function: EventFunction) -> Callable[[CloudEvent], None]:
        @functools.wraps(function)
        def entry_point(event: CloudEvent) -> None:
            identity = events.Identity(str(event["source"]), str(event["id"]), str(event["type"]))
            request_id = identity.id if _LOG_ID.fullmatch(identity.id) else http.new_request_id()
            headers = _headers()
            context = request_context(
                request_id,
                project=database.settings.trace_project,
                cloud_trace=headers.get("X-Cloud-Trace-Context"),
                traceparent=headers.get("traceparent"),
            )
            token = current_request.set(context)
            try:
                _deliver(database, function, topic, identity, event)
            finally:
                current_request.reset(token)

        return entry_point

    return decorate


def _deliver(
    database: Database,
    function: EventFunction,
    topic: str,
    identity: events.Identity,
    event: CloudEvent,
) -> None:
    started = time.perf_counter()

    def logged(level: int, outcome: str, detail: str = "") -> None:
        log.log(
            level,
            "event %s from %s %s%s (%.1f ms)",
            identity.id,
            identity.source,
            outcome,
            f": {detail}" if detail else "",
            (time.perf_counter() - started) * 1000,
            extra={"event_id": identity.id, "event_source": identity.source, "outcome": outcome},
        )

    try:
        message = _message(identity, event, topic)
        identity = _identity_of(identity, message)

        def apply(session: Session) -> None:
            claim = events.claim(session, identity)
            function(session, message)
            claim.settle()

        transaction(database, apply)
    except events.AlreadyHandled:
        logged(logging.INFO, "already handled", _recorded_outcome(database, identity))
        return
    except Exception as error:  # noqa: BLE001  # every failure is sorted as HTTP would sort it
        reply = errors.error_reply(error)
        if reply.status >= 500:
            logged(logging.WARNING, "not applied, to be redelivered", reply.body["error"]["code"])
            raise DeliveryFailed(reply) from None
        _reject(database, identity, _reason(reply), logged)
        return
    logged(logging.INFO, "applied")


def _reject(
    database: Database,
    identity: events.Identity,
    reason: str,
    logged: Callable[[int, str, str], None],
) -> None:
    """Record the refusal (unless an earlier delivery recorded an outcome) and acknowledge."""
    try:
        first = transaction(database, lambda session: events.reject(session, identity, reason))
    except Exception as error:  # noqa: BLE001  # nothing recorded: the redelivery judges again
        reply = errors.error_reply(error)
        if reply.status >= 500:
            logged(logging.WARNING, "not recorded, to be redelivered", reply.body["error"]["code"])
            raise DeliveryFailed(reply) from None
        # The database refuses the event's identity itself (too long, U+0000): no redelivery
        # would fare better, so it is acknowledged, and this line is its only record.
        logged(logging.WARNING, "rejected, not recorded", f"{reason}; {_reason(reply)}")
        return
    if first:
        logged(logging.WARNING, "rejected", reason)
    else:
        logged(logging.INFO, "already handled", _recorded_outcome(database, identity))


def _recorded_outcome(database: Database, identity: events.Identity) -> str:
    """How an earlier delivery ended: ``applied``, or ``rejected: REASON``."""

    def read(session: Session) -> str:
        row = events.outcome(session, identity)
        if row is None:  # only committed outcomes are seen, and none is ever removed early
            return "unknown"
        return f"{row.outcome}: {row.reason}" if row.reason else row.outcome

    try:
        return transaction(database, read, read_only=True)
    except Exception:  # noqa: BLE001  # only for the log line; the delivery is acknowledged
        return "outcome not read"


def _message(identity: events.Identity, event: CloudEvent, topic: str) -> Message:
    """The Pub/Sub message an event carries, from ``topic``; raises when it is none."""
    if identity.type != PUBSUB_PUBLISHED:
        raise unknown_event(f"events of type {identity.type} are not taken here")
    match = _PUBSUB_SOURCE.fullmatch(identity.source)
    if match is None:
        # The push endpoint's path names no topic: a setting to fix, not a message to drop,
        # so the answer is a 5xx (redelivered) that says what to fix.
        raise errors.HttpError(
            500,
            "misrouted_event",
            f"the push came to a path that names no topic (the event's source is"
            f" {identity.source}): set the push endpoint to a path ending in"
            f" /projects/PROJECT/topics/{topic}",
        )
    if match[2] != topic:
        raise unknown_event(f"messages from topic {match[2]} are not taken here, only {topic}")
    data = event.get_data()
    envelope = data.get("message") if isinstance(data, dict) else None
    if not isinstance(envelope, dict):
        raise malformed_event("the event carries no Pub/Sub message")
    attributes = envelope.get("attributes") or {}
    try:
        payload = base64.b64decode(envelope.get("data") or "", validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise malformed_event("the message's data is not base64") from None
    if not isinstance(attributes, dict):
        raise malformed_event("the message's attributes are not an object")
    return Message(
        identity.id,
        payload,
        {str(k): str(v) for k, v in attributes.items()},
        envelope.get("publishTime"),
    )


def _identity_of(delivered: events.Identity, message: Message) -> events.Identity:
    """The event a message stands for: the one its ``event_id`` attribute names, when it has
    one (its producer republishes it with the same value), else the message itself."""
    event_id = message.attributes.get(EVENT_ID_ATTRIBUTE)
    if event_id is None:
        return delivered
    if not event_id.strip() or len(event_id) > MAX_EVENT_ID:
        raise malformed_event(
            f"the message's event_id attribute must be 1 to {MAX_EVENT_ID} characters, not blank"
        )
    return dataclasses.replace(delivered, id=f"{EVENT_ID_ATTRIBUTE}:{event_id}")


def _reason(reply: Reply) -> str:
    """A refusal as one line: the error code, its message, and each failing value."""
    error = reply.body["error"]
    reason = f"{error['code']}: {error['message']}"
    details = "; ".join(
        f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}"
        for item in error.get("details", ())
    )
    return f"{reason} ({details})" if details else reason


def _headers() -> Mapping[str, str] | Headers:
    return flask.request.headers if flask.has_request_context() else {}
