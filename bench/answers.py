"""The JSON answers of the comparison variants (``sample.py``, ``floor.py``, ``variants.py``):
a user's row with its timestamps as the contract writes them, without importing any of the
service's modules."""

from __future__ import annotations

import json
from datetime import UTC
from typing import Any

import flask


def answer(status: int, body: Any) -> flask.Response:
    """``body`` as a JSON response."""
    return flask.Response(json.dumps(body), status=status, content_type="application/json")


def user(fields: dict[str, Any]) -> dict[str, Any]:
    """A user's columns, ``created_at`` and ``updated_at`` in RFC 3339 UTC with microseconds."""
    shown = dict(fields)
    for key in ("created_at", "updated_at"):
        moment = shown[key].astimezone(UTC).replace(tzinfo=None)
        shown[key] = moment.isoformat(timespec="microseconds") + "Z"
    return shown
