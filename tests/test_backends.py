"""The embedded SQLite default answers exactly as PostgreSQL: status, error code and message."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine

from tests.conftest import Instance

BATCH_ITEM = {"owner_id": 3, "name": "a", "quantity": 1}
# Each step: method, path, JSON body. Run in order on an empty database of each backend.
SCENARIO: list[tuple[str, str, Any]] = [
    ("POST", "/users", {"name": "Ada", "email": "ada@x.io", "balance": 50}),
    ("POST", "/users", {"name": "Bob", "email": "bob@x.io"}),
    ("POST", "/users", {"name": "Cy", "email": "cy@x.io"}),
    ("POST", "/users", {"name": "Ada again", "email": "ADA@x.io"}),  # the email is taken
    ("PATCH", "/users/2", {"email": "ada@x.io"}),  # taken, by a change
    ("PATCH", "/users/99", {"name": "Nobody"}),
    ("POST", "/transfers", {"from_user_id": 1, "to_user_id": 2, "amount": 20}),
    ("POST", "/transfers", {"from_user_id": 2, "to_user_id": 1, "amount": 500}),  # too little
    ("POST", "/transfers", {"from_user_id": 1, "to_user_id": 99, "amount": 1}),
    ("POST", "/transfers", {"from_user_id": 1, "to_user_id": 1, "amount": 1}),
    ("DELETE", "/users/1", None),  # a sender of a transfer
    ("DELETE", "/users/2", None),  # a receiver of one
    ("POST", "/items", {"owner_id": 99, "name": "pen", "quantity": 1}),
    ("POST", "/items", {"items": [BATCH_ITEM, {**BATCH_ITEM, "owner_id": 98}]}),
    ("POST", "/items", {"items": []}),
    ("POST", "/users", {"name": "", "email": "no-at-sign", "balance": -1, "extra": 1}),
    ("GET", "/transfers?userid=1", None),
    ("GET", "/users?limit=0&after=x", None),
    ("GET", "/items/99", None),
    ("DELETE", "/users/3", None),  # no transfers: removed
    ("DELETE", "/users/3", None),
]


def _answers(client: FlaskClient) -> list[tuple[str, int, Any]]:
    """Each step's status and error (code, message, details), or its body's user-visible
    fields without timestamps."""
    answers = []
    for method, path, body in SCENARIO:
        response = client.open(path, method=method, json=body)
        payload = response.json if response.data else None
        if isinstance(payload, dict) and "error" in payload:
            shown: Any = payload["error"]
        elif isinstance(payload, dict):
            shown = {k: v for k, v in payload.items() if not k.endswith("_at")}
        else:
            shown = payload
        answers.append((f"{method} {path}", response.status_code, shown))
    return answers


def test_sqlite_answers_every_scenario_as_postgresql_does(
    pg: Engine,
    instances: Callable[..., Instance],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same requests on PostgreSQL (through pg8000) and on the embedded SQLite file get the
    same statuses, codes, messages and details, and the domain's own messages on both."""
    on_postgres = _answers(instances().client)
    monkeypatch.delenv("DATABASE_URL")
    monkeypatch.chdir(tmp_path)
    on_sqlite = _answers(instances().client)

    for postgres_answer, sqlite_answer in zip(on_postgres, on_sqlite, strict=True):
        assert sqlite_answer == postgres_answer
    assert on_postgres[10][1:] == (
        409,
        {"code": "conflict", "message": "user 1 has transfers and cannot be removed"},
    )
    assert on_postgres[11][2]["message"] == "user 2 has transfers and cannot be removed"
    taken = (409, {"code": "conflict", "message": "a user with this email already exists"})
    assert on_postgres[3][1:] == on_postgres[4][1:] == taken
    assert [status for _, status, _ in on_postgres[-2:]] == [204, 404]
