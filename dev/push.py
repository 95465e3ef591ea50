"""Deliver a Pub/Sub message to an event function served locally, as a push subscription does.

    scripts/serve.sh transfer_events         # in another terminal
    .venv/bin/python -m dev.push transfer-requests \
        '{"from_user_id": 1, "to_user_id": 2, "amount": 5}'

The message goes in Pub/Sub's push envelope (``message.data`` in base64, ``messageId``,
``publishTime``, ``attributes``, ``subscription``) to the path that names its topic,
``/projects/PROJECT/topics/TOPIC``, which is where the event function reads the topic from.
Each run is a new message unless ``--id`` repeats one: the way to see a redelivery change
nothing. It prints the answer and what Pub/Sub would do with it; the server's log line says
whether the message was applied or rejected, and why.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime


def envelope(topic: str, data: bytes, message_id: str, attributes: dict[str, str]) -> bytes:
    """The JSON body of a push delivery of one message."""
    published = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return json.dumps({
        "message": {
            "data": base64.b64encode(data).decode(),
            "messageId": message_id,
            "publishTime": published,
            "attributes": attributes,
        },
        "subscription": f"projects/local-project/subscriptions/{topic}-push",
    }).encode()  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dev.push",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("topic", help="the topic the event function takes (its event_scope's)")
    parser.add_argument("data", help="the message's data, as it is published (JSON, say)")
    parser.add_argument("--id", help="the message id (default: a new one each run)")
    parser.add_argument(
        "--attribute", action="append", default=[], metavar="KEY=VALUE", help="an attribute"
    )
    parser.add_argument(
        "--url", default="http://localhost:8080", help="where the function is served"
    )
    parser.add_argument("--project", default="local-project", help="the topic's project")
    args = parser.parse_args(argv)

    attributes = {}
    for pair in args.attribute:
        key, equals, value = pair.partition("=")
        if not equals or not key:
            parser.error(f"--attribute takes KEY=VALUE, got '{pair}'")
        attributes[key] = value
    message_id = args.id or str(time.time_ns())
    body = envelope(args.topic, args.data.encode(), message_id, attributes)
    url = f"{args.url.rstrip('/')}/projects/{args.project}/topics/{args.topic}"
    if not url.startswith(("http://", "https://")):
        parser.error(f"--url must be an http:// or https:// address, got '{args.url}'")
    request = urllib.request.Request(  # noqa: S310  # the scheme is checked above
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:  # noqa: S310  # checked above
            status, text = answer.status, answer.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode(errors="replace")
    except OSError as error:
        print(f"could not reach {url}: {error}; is the function served there?", file=sys.stderr)
        return 1
    print(f"message {message_id} to {url}: {status} {text.strip()}")
    if 200 <= status < 300:
        print("acknowledged: applied, or refused for good (the server's log says which)")
        return 0
    print("not acknowledged: Pub/Sub would deliver it again")
    return 1


if __name__ == "__main__":
    sys.exit(main())
