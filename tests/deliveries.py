"""Delivering a Pub/Sub message to an event function's test client, as Google delivers it."""

from __future__ import annotations

import base64
import json
from typing import Any

from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

PROJECT = "test-project"
TOPIC = "transfer-requests"


def push(
    client: FlaskClient,
    data: Any,
    message_id: str = "1001",
    *,
    topic: str = TOPIC,
    attributes: dict[str, str] | None = None,
) -> TestResponse:
    """Deliver a message as a Pub/Sub push subscription does, to a path naming the topic."""
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    body = {
        "subscription": f"projects/{PROJECT}/subscriptions/{topic}-push",
        "message": {
            "data": base64.b64encode(raw).decode(),
            "messageId": message_id,
            "publishTime": "2026-11-30T12:00:00.000Z",
            "attributes": attributes or {},
        },
    }
    return client.post(f"/projects/{PROJECT}/topics/{topic}", json=body)


def eventarc(
    client: FlaskClient,
    data: Any,
    message_id: str = "1001",
    *,
    event_type: str = "google.cloud.pubsub.topic.v1.messagePublished",
    topic: str = TOPIC,
) -> TestResponse:
    """Deliver a message as an Eventarc trigger does: a binary-mode CloudEvent."""
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    event = CloudEvent(
        {
            "type": event_type,
            "source": f"//pubsub.googleapis.com/projects/{PROJECT}/topics/{topic}",
            "id": message_id,
        },
        {
            "message": {"data": base64.b64encode(raw).decode(), "messageId": message_id},
            "subscription": f"projects/{PROJECT}/subscriptions/eventarc-trigger",
        },
    )
    headers, body = to_binary(event)
    return client.post("/", headers=headers, data=body)
