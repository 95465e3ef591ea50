"""Publishing to Pub/Sub through its REST API, with bounded time-outs.

Google's client library would bring gRPC and protobuf into every cold start; one HTTPS call
does what the outbox needs. urllib3 (its pool keeps the connection open between publishes) and
google-auth (the instance's credentials) come with the Cloud SQL connector, and are imported
at the first publish, never before. With ``PUBSUB_EMULATOR_HOST`` set, the calls go there over
plain HTTP without credentials, as Google's client libraries do.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from db.config import PubSubSettings

log = logging.getLogger(__name__)

SCOPE = "https://www.googleapis.com/auth/pubsub"
GOOGLE_ENDPOINT = "https://pubsub.googleapis.com"
MAX_MESSAGES_PER_CALL = 1000  # Pub/Sub's limit for one publish request
# After a failure, requests skip publishing for this long: their events wait in the outbox
# for the relay, and no request pays a time-out while Pub/Sub is away.
PAUSE_AFTER_FAILURE = 15.0


@dataclass(frozen=True)
class Message:
    """One message to publish: its data and attributes."""

    data: bytes
    attributes: Mapping[str, str]


class PublishFailed(Exception):
    """Pub/Sub did not take the messages (unreachable, too slow, or refusing them)."""


class Publisher:
    """Publishes to the topics of one project; safe to share between threads."""

    def __init__(self, settings: PubSubSettings) -> None:
        self.settings = settings
        host = settings.emulator_host
        self.endpoint = f"http://{host}" if host else GOOGLE_ENDPOINT
        self._lock = threading.Lock()
        self._pool: Any = None
        self._credentials: Any = None
        self._paused_until = 0.0

    @property
    def paused(self) -> bool:
        """Whether a recent failure says to leave publishing to the relay for now."""
        return time.monotonic() < self._paused_until

    def publish(
        self, topic: str, messages: Sequence[Message], *, timeout: float | None = None
    ) -> list[str]:
        """Publish ``messages`` on ``topic``, in calls of up to 1000; Pub/Sub's message ids.

        Each call may take ``timeout`` seconds (``PUBLISH_TIMEOUT`` by default), connecting
        included. Raises ``PublishFailed``, and pauses publishing from requests for a while.
        """
        ids: list[str] = []
        try:
            for start in range(0, len(messages), MAX_MESSAGES_PER_CALL):
                batch = messages[start : start + MAX_MESSAGES_PER_CALL]
                ids += self._call(topic, batch, timeout or self.settings.publish_timeout)
        except PublishFailed:
            self._paused_until = time.monotonic() + PAUSE_AFTER_FAILURE
            raise
        self._paused_until = 0.0
        return ids

    def close(self) -> None:
        """Close the kept connections."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.clear()

    def _call(self, topic: str, messages: Sequence[Message], timeout: float) -> list[str]:
        import urllib3  # noqa: PLC0415  # loaded at the first publish, not at cold start

        path = f"/v1/projects/{quote(self.settings.project)}/topics/{quote(topic)}:publish"
        body = json.dumps(
            {
                "messages": [
                    {"data": base64.b64encode(m.data).decode(), "attributes": dict(m.attributes)}
                    for m in messages
                ]
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        try:
            pool = self._connections()
            self._authorize(pool, path, headers)
            answer = pool.request(
                "POST",
                self.endpoint + path,
                body=body,
                headers=headers,
                timeout=urllib3.Timeout(total=timeout),
                retries=False,
            )
        except PublishFailed:
            raise
        except Exception as error:  # noqa: BLE001  # urllib3's, google-auth's: none published
            raise PublishFailed(f"Pub/Sub at {self.endpoint} did not answer: {error}") from None
        if answer.status != 200:
            raise PublishFailed(
                f"Pub/Sub refused the publish on topic {topic} ({answer.status}):"
                f" {_message_of(answer.data)}"
            )
        ids = json.loads(answer.data).get("messageIds", [])
        return [str(message_id) for message_id in ids]

    def _connections(self) -> Any:
        with self._lock:
            if self._pool is None:
                import urllib3  # noqa: PLC0415

                self._pool = urllib3.PoolManager(num_pools=2, maxsize=8)
            return self._pool

    def _authorize(self, pool: Any, path: str, headers: dict[str, str]) -> None:
        """Add the instance's access token (refreshed when due), unless on the emulator."""
        if self.settings.emulator_host:
            return
        import google.auth  # noqa: PLC0415
        import google.auth.transport.urllib3  # noqa: PLC0415

        with self._lock:
            if self._credentials is None:
                self._credentials, _ = google.auth.default(scopes=[SCOPE])
            request = google.auth.transport.urllib3.Request(pool)  # type: ignore[no-untyped-call]
            self._credentials.before_request(request, "POST", self.endpoint + path, headers)


def _message_of(data: bytes) -> str:
    """The message of Google's error body, or the start of whatever came back."""
    try:
        return str(json.loads(data)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return data[:200].decode(errors="replace") or "no body"
