"""request_scope: a plain functions-framework function gets the whole per-request scope."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Engine, event, text

from tests.conftest import Instance

PLAIN = Path(__file__).resolve().parent / "scenarios" / "plain.py"


@pytest.fixture
def user(pg: Engine) -> int:
    """A user with a balance of 10."""
    with pg.begin() as connection:
        query = text(
            "INSERT INTO users (name, email, balance, created_at, updated_at)"
            " VALUES ('A', 'a@x.io', 10, now(), now()) RETURNING id"
        )
        return int(connection.scalar(query) or 0)


def _balance(pg: Engine, user: int) -> int:
    with pg.connect() as connection:
        return int(
            connection.scalar(text("SELECT balance FROM users WHERE id = :id"), {"id": user})
        )


@pytest.mark.parametrize(
    ("fail", "status", "stored"),
    [("", 201, 15), ("domain", 404, 10), ("bug", 500, 10)],
)
def test_a_write_commits_once_or_not_at_all_and_returns_its_connection(
    pg: Engine, instances: Callable[..., Instance], user: int, fail: str, status: int, stored: int
) -> None:
    """Success commits once; a domain error or a bug rolls back into the contract's error body."""
    deposit = instances("deposit", PLAIN)
    commits: list[object] = []
    event.listen(deposit.database.engine, "commit", commits.append)

    response = deposit.client.post(f"/?user={user}&amount=5&fail={fail}")

    assert response.status_code == status
    assert set(response.json) == ({"deposited"} if status == 201 else {"error"})
    assert len(commits) == (1 if status == 201 else 0)
    assert _balance(pg, user) == stored
    assert deposit.database.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert deposit.module.sessions[-1].get_transaction() is None


def test_each_request_gets_its_own_session_and_sees_fresh_data(
    pg: Engine, instances: Callable[..., Instance], user: int
) -> None:
    """Two requests, two sessions; a change made between them is seen."""
    balance = instances("balance", PLAIN)
    assert balance.client.get(f"/?user={user}").json["balance"] == 10
    with pg.begin() as connection:
        connection.execute(text("UPDATE users SET balance = 99 WHERE id = :id"), {"id": user})

    assert balance.client.get(f"/?user={user}").json["balance"] == 99
    first, second = balance.module.sessions[-2:]
    assert first is not second


def test_a_post_with_an_idempotency_key_acts_once(
    pg: Engine, instances: Callable[..., Instance], user: int
) -> None:
    """The same keyed POST twice deposits once; the second answer is the first, replayed."""
    client = instances("deposit", PLAIN).client
    headers = {"Idempotency-Key": "deposit-1"}

    first = client.post(f"/?user={user}&amount=5", headers=headers)
    second = client.post(f"/?user={user}&amount=5", headers=headers)

    assert (first.status_code, second.status_code) == (201, 201)
    assert second.json == first.json
    assert second.headers["Idempotent-Replayed"] == "true"
    assert _balance(pg, user) == 15


def test_methods_limits_what_the_function_answers(
    pg: Engine, instances: Callable[..., Instance], user: int
) -> None:
    """A method outside ``methods`` is a 405 naming those allowed; without it any method runs."""
    refused = instances("deposit", PLAIN).client.get(f"/?user={user}&amount=5")
    assert refused.status_code == 405
    assert refused.headers["Allow"] == "POST"
    assert refused.json["error"]["code"] == "method_not_allowed"
    assert instances("balance", PLAIN).client.delete(f"/?user={user}").json["method"] == "DELETE"
