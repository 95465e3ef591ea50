"""Google's Pub/Sub emulator on 127.0.0.1, for the tests and the benchmarks.

It is a real Google component (Debian package ``google-cloud-cli-pubsub-emulator``, Java 17),
started with ``gcloud beta emulators pubsub start``. Topics, push subscriptions and publishing
go through its REST API, as a client library would.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Self

from dev.postgres import free_port

PACKAGE = "google-cloud-cli-pubsub-emulator"
PROJECT = "test-project"


class PubSubEmulator:
    """One emulator process; ``stop()`` ends it and removes its files."""

    def __init__(self, project: str = PROJECT) -> None:
        self.project = project
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="pubsub-"))
        self.process: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/projects/{self.project}"

    def start(self, timeout: float = 60) -> Self:
        gcloud = shutil.which("gcloud")
        if gcloud is None or not _installed():
            raise RuntimeError(
                f"the Pub/Sub emulator is not installed: apt-get install {PACKAGE} (with gcloud"
                " and Java 17)"
            )
        (self.root / "config").mkdir()
        (self.root / "data").mkdir()
        self._log = (self.root / "emulator.log").open("wb")
        self.process = subprocess.Popen(
            [gcloud, "beta", "emulators", "pubsub", "start", f"--host-port=127.0.0.1:{self.port}",
             f"--project={self.project}", f"--data-dir={self.root / 'data'}"],
            env={**os.environ, "CLOUDSDK_CONFIG": str(self.root / "config"),
                 "CLOUDSDK_CORE_DISABLE_PROMPTS": "1"},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # gcloud starts the Java server as its child: stop both
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the Pub/Sub emulator exited:\n{self.log()}")
            try:
                self._call("GET", "/topics")
                return self
            except OSError as error:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the Pub/Sub emulator did not start:\n{self.log()}"
                    ) from error
                time.sleep(0.2)

    def log(self) -> str:
        path = self.root / "emulator.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=20)
        if self._log is not None:
            self._log.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def create_topic(self, topic: str) -> None:
        self._call("PUT", f"/topics/{topic}", {})

    def create_push_subscription(
        self, name: str, topic: str, endpoint: str, *, ack_deadline: int = 10
    ) -> None:
        """A push subscription delivering ``topic``'s messages to ``endpoint``."""
        self._call(
            "PUT",
            f"/subscriptions/{name}",
            {
                "topic": f"projects/{self.project}/topics/{topic}",
                "pushConfig": {"pushEndpoint": endpoint},
                "ackDeadlineSeconds": ack_deadline,
            },
        )

    def create_pull_subscription(self, name: str, topic: str) -> None:
        """A pull subscription on ``topic``, to read what was published there."""
        self._call(
            "PUT",
            f"/subscriptions/{name}",
            {"topic": f"projects/{self.project}/topics/{topic}", "ackDeadlineSeconds": 60},
        )

    def pull(self, subscription: str, *, wait: float = 2.0) -> list[dict[str, Any]]:
        """Every message the subscription holds (each acknowledged), with its data decoded;
        returns once a pull finds none for ``wait`` seconds."""
        received: list[dict[str, Any]] = []
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < wait:
            answer = self._call(
                "POST", f"/subscriptions/{subscription}:pull",
                {"maxMessages": 1000, "returnImmediately": True},
            )  # fmt: skip
            messages = answer.get("receivedMessages", [])
            if not messages:
                time.sleep(0.1)
                continue
            quiet_since = time.monotonic()
            for item in messages:
                message = item["message"]
                message["data"] = base64.b64decode(message.get("data", ""))
                received.append(message)
            acks = [item["ackId"] for item in messages]
            self._call("POST", f"/subscriptions/{subscription}:acknowledge", {"ackIds": acks})
        return received

    def publish(
        self, topic: str, messages: list[bytes], attributes: dict[str, str] | None = None
    ) -> list[str]:
        """Publish each of ``messages`` as a message's data; their ids, in order."""
        ids: list[str] = []
        for start in range(0, len(messages), 100):
            batch = [
                {"data": base64.b64encode(data).decode(), "attributes": attributes or {}}
                for data in messages[start : start + 100]
            ]
            answer = self._call("POST", f"/topics/{topic}:publish", {"messages": batch})
            ids += answer["messageIds"]
        return ids

    def push_path(self, topic: str) -> str:
        """The path a push endpoint gets so that the event's source names the topic."""
        return f"/projects/{self.project}/topics/{topic}"

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310  # an http URL of our own
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310  # loopback
            return json.loads(answer.read() or b"{}")


def _installed() -> bool:
    roots = ["/usr/lib/google-cloud-sdk", "/usr/share/google-cloud-sdk"]
    gcloud = shutil.which("gcloud")
    if gcloud:
        roots.append(str(Path(os.path.realpath(gcloud)).parent.parent))
    return any((Path(root) / "platform" / "pubsub-emulator").is_dir() for root in roots)
