"""Transfers: atomic, never negative, never lost, never a deadlock, on one instance or many."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import Engine, text

from tests.conftest import Instance

MAX_BIGINT = 2**63 - 1


@pytest.fixture
def api(pg: Engine, instances: Callable[..., Instance]) -> Instance:
    """An api instance on the test PostgreSQL."""
    return instances()


def make_user(api: Instance, email: str, balance: int = 0) -> int:
    response = api.client.post("/users", json={"name": "U", "email": email, "balance": balance})
    assert response.status_code == 201
    return int(response.json["id"])


def balances(pg: Engine) -> dict[int, int]:
    with pg.connect() as connection:
        return {row[0]: row[1] for row in connection.execute(text("SELECT id, balance FROM users"))}


def transfer_count(pg: Engine) -> int:
    with pg.connect() as connection:
        return int(connection.scalar(text("SELECT count(*) FROM transfers")) or 0)


def test_transfer_moves_the_amount_and_returns_201(api: Instance, pg: Engine) -> None:
    """POST /transfers answers 201 with the transfer; both balances change by the amount."""
    ada, bob = make_user(api, "a@x.io", 100), make_user(api, "b@x.io", 5)
    body = {"from_user_id": ada, "to_user_id": bob, "amount": 30}

    response = api.client.post("/transfers", json=body)

    assert response.status_code == 201
    assert set(response.json) == {"id", "from_user_id", "to_user_id", "amount", "created_at"}
    assert {k: response.json[k] for k in body} == body
    assert response.headers["Location"] == f"/transfers/{response.json['id']}"
    assert balances(pg) == {ada: 70, bob: 35}
    assert api.client.get(f"/transfers/{response.json['id']}").json == response.json


def test_transfer_marks_both_users_updated_at_its_own_time(api: Instance) -> None:
    """Both users' ``updated_at`` become the transfer's ``created_at``; their ``created_at``
    stays."""
    ada, bob = make_user(api, "a@x.io", 100), make_user(api, "b@x.io")
    before = {user: api.client.get(f"/users/{user}").json for user in (ada, bob)}

    made = api.client.post("/transfers", json={"from_user_id": ada, "to_user_id": bob, "amount": 1})

    for user in (ada, bob):
        after = api.client.get(f"/users/{user}").json
        assert after["updated_at"] == made.json["created_at"] > before[user]["updated_at"]
        assert after["created_at"] == before[user]["created_at"]


def test_transfer_of_the_whole_balance_leaves_zero(api: Instance, pg: Engine) -> None:
    """A sender may spend its balance down to exactly 0."""
    ada, bob = make_user(api, "a@x.io", 10), make_user(api, "b@x.io")
    body = {"from_user_id": ada, "to_user_id": bob, "amount": 10}
    assert api.client.post("/transfers", json=body).status_code == 201
    assert balances(pg) == {ada: 0, bob: 10}


def test_transfer_above_the_balance_is_insufficient_funds(api: Instance, pg: Engine) -> None:
    """409 insufficient_funds; neither balance changes and no transfer is recorded."""
    ada, bob = make_user(api, "a@x.io", 10), make_user(api, "b@x.io")

    response = api.client.post(
        "/transfers", json={"from_user_id": ada, "to_user_id": bob, "amount": 11}
    )

    assert response.status_code == 409
    assert response.json["error"]["code"] == "insufficient_funds"
    assert balances(pg) == {ada: 10, bob: 0}
    assert transfer_count(pg) == 0


def test_transfer_that_would_overflow_the_receiver_is_a_conflict(api: Instance, pg: Engine) -> None:
    """A receiver at 2^63-1 cannot receive more: 409 conflict, nothing changes."""
    ada, bob = make_user(api, "a@x.io", 10), make_user(api, "b@x.io", MAX_BIGINT)

    response = api.client.post(
        "/transfers", json={"from_user_id": ada, "to_user_id": bob, "amount": 1}
    )

    assert response.status_code == 409
    assert response.json["error"]["code"] == "conflict"
    assert balances(pg) == {ada: 10, bob: MAX_BIGINT}


@pytest.mark.parametrize("missing", ["from_user_id", "to_user_id"])
def test_transfer_with_an_unknown_user_is_404(api: Instance, pg: Engine, missing: str) -> None:
    """Either user missing is a 404, and nothing changes."""
    ada, bob = make_user(api, "a@x.io", 10), make_user(api, "b@x.io")
    body = {"from_user_id": ada, "to_user_id": bob, "amount": 1, missing: 999}

    assert api.client.post("/transfers", json=body).status_code == 404
    assert balances(pg) == {ada: 10, bob: 0}


@pytest.mark.parametrize(
    ("change", "loc"),
    [
        ({"to_user_id": "sender"}, ["to_user_id"]),
        ({"amount": 0}, ["amount"]),
        ({"amount": -5}, ["amount"]),
        ({"amount": MAX_BIGINT + 1}, ["amount"]),
        ({"amount": True}, ["amount"]),
        ({"amount": 2.0}, ["amount"]),
        ({"amount": None}, ["amount"]),
        ({"from_user_id": 0}, ["from_user_id"]),
        ({"note": "hi"}, ["note"]),
    ],
)
def test_invalid_transfer_is_422(
    api: Instance, pg: Engine, change: dict[str, Any], loc: list[str]
) -> None:
    """Same user on both sides, a bad amount or an unknown field is a 422 naming it."""
    ada, bob = make_user(api, "a@x.io", 10), make_user(api, "b@x.io")
    body = {"from_user_id": ada, "to_user_id": bob, "amount": 1, **change}
    if body["to_user_id"] == "sender":
        body["to_user_id"] = ada

    response = api.client.post("/transfers", json=body)

    assert response.status_code == 422
    assert loc in [d["loc"] for d in response.json["error"]["details"]]
    assert balances(pg) == {ada: 10, bob: 0}


def test_list_transfers_of_a_user_covers_both_directions(api: Instance) -> None:
    """user_id= lists transfers sent and received, ascending, paged."""
    ada, bob, cy = (
        make_user(api, "a@x.io", 10),
        make_user(api, "b@x.io", 10),
        make_user(api, "c@x.io", 10),
    )
    made = [
        api.client.post("/transfers", json={"from_user_id": s, "to_user_id": r, "amount": 1}).json
        for s, r in ((ada, bob), (bob, cy), (cy, ada), (bob, ada))
    ]

    page = api.client.get(f"/transfers?user_id={ada}&limit=2").json
    rest = api.client.get(f"/transfers?user_id={ada}&limit=2&after={page['next_after']}").json

    assert page["transfers"] + rest["transfers"] == [made[0], made[2], made[3]]
    assert rest["next_after"] is None
    assert api.client.get("/transfers").json["transfers"] == made


def test_user_with_transfers_cannot_be_removed(api: Instance) -> None:
    """DELETE of a user who sent or received money is a 409 conflict; the user stays."""
    ada, bob = make_user(api, "a@x.io", 10), make_user(api, "b@x.io")
    api.client.post("/transfers", json={"from_user_id": ada, "to_user_id": bob, "amount": 1})

    for user in (ada, bob):
        response = api.client.delete(f"/users/{user}")
        assert response.status_code == 409
        assert response.json["error"]["code"] == "conflict"
        assert api.client.get(f"/users/{user}").status_code == 200


@pytest.mark.variants("direct", "pgbouncer")
def test_concurrent_random_transfers_keep_every_balance_consistent(
    pg: Engine, instances: Callable[..., Instance], monkeypatch: pytest.MonkeyPatch
) -> None:
    """8 threads x 200 random transfers among 10 users, two instances: nothing lost or negative."""
    monkeypatch.setenv("DB_POOL_SIZE", "4")
    first, second = instances(), instances()
    users = [make_user(first, f"u{i}@x.io", 1_000) for i in range(10)]
    start = balances(pg)
    with pg.connect() as connection:
        deadlocks_before = connection.scalar(
            text("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
        )

    def worker(seed: int) -> Counter[int]:
        rng = random.Random(seed)
        client = (first, second)[seed % 2].client
        statuses: Counter[int] = Counter()
        for _ in range(200):
            sender, receiver = rng.sample(users, 2)
            body = {"from_user_id": sender, "to_user_id": receiver, "amount": rng.randint(1, 300)}
            statuses[client.post("/transfers", json=body).status_code] += 1
        return statuses

    with ThreadPoolExecutor(8) as pool:
        statuses = sum(pool.map(worker, range(8)), Counter[int]())

    assert set(statuses) <= {201, 409}
    assert statuses[201] > 0
    end = balances(pg)
    assert sum(end.values()) == sum(start.values())
    assert min(end.values()) >= 0
    with pg.connect() as connection:
        moved = connection.execute(
            text(
                "SELECT u.id, coalesce(sum(t.amount) FILTER (WHERE t.to_user_id = u.id), 0)"
                " - coalesce(sum(t.amount) FILTER (WHERE t.from_user_id = u.id), 0)"
                " FROM users u LEFT JOIN transfers t ON u.id IN (t.from_user_id, t.to_user_id)"
                " GROUP BY u.id"
            )
        ).all()
        assert {user: start[user] + net for user, net in moved} == end
        assert connection.scalar(text("SELECT count(*) FROM transfers")) == statuses[201]
        deadlocks_after = connection.scalar(
            text("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
        )
    assert deadlocks_after == deadlocks_before
