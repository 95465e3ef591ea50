"""Idempotency-Key: a retried POST replays its stored response and never acts twice."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from sqlalchemy import Engine, text

from db.models import IdempotencyRecord, utcnow
from service.idempotency import purge_expired
from tests.conftest import Instance


@pytest.fixture
def api(pg: Engine, instances: Callable[..., Instance]) -> Instance:
    """An api instance on the test PostgreSQL."""
    return instances()


def count(pg: Engine, table: str) -> int:
    with pg.connect() as connection:
        return int(connection.scalar(text(f"SELECT count(*) FROM {table}")) or 0)


def two_users(api: Instance, balance: int = 100) -> tuple[int, int]:
    ada = api.client.post("/users", json={"name": "A", "email": "a@x.io", "balance": balance})
    bob = api.client.post("/users", json={"name": "B", "email": "b@x.io"})
    return int(ada.json["id"]), int(bob.json["id"])


def test_replay_returns_the_stored_response_without_a_second_effect(
    api: Instance, pg: Engine
) -> None:
    """Same key, method, path and body: the first status, body and Location, marked replayed."""
    body = {"name": "Ada", "email": "ada@example.com"}
    first = api.client.post("/users", json=body, headers={"Idempotency-Key": "create-ada"})
    again = api.client.post("/users", json=body, headers={"Idempotency-Key": "create-ada"})

    assert first.status_code == again.status_code == 201
    assert again.json == first.json
    assert again.headers["Location"] == first.headers["Location"]
    assert "Idempotent-Replayed" not in first.headers
    assert again.headers["Idempotent-Replayed"] == "true"
    assert count(pg, "users") == 1


def test_replayed_transfer_moves_money_once(api: Instance, pg: Engine) -> None:
    """A transfer retried with its key is recorded and applied once."""
    ada, bob = two_users(api)
    body = {"from_user_id": ada, "to_user_id": bob, "amount": 10}
    responses = [
        api.client.post("/transfers", json=body, headers={"Idempotency-Key": "t-1"})
        for _ in range(3)
    ]

    assert {r.status_code for r in responses} == {201}
    assert {r.json["id"] for r in responses} == {responses[0].json["id"]}
    assert count(pg, "transfers") == 1
    assert api.client.get(f"/users/{ada}").json["balance"] == 90


def test_replayed_item_batch_is_created_once(api: Instance, pg: Engine) -> None:
    """A batch of items retried with its key is stored once."""
    owner, _ = two_users(api)
    body = {"items": [{"owner_id": owner, "name": "pen", "quantity": 1}] * 10}
    for _ in range(2):
        assert (
            api.client.post("/items", json=body, headers={"Idempotency-Key": "b"}).status_code
            == 201
        )
    assert count(pg, "items") == 10


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/users", {"name": "Ada", "email": "other@example.com"}),
        ("/users/", {"name": "Ada", "email": "ada@example.com"}),
        ("/items", {"owner_id": 1, "name": "Ada", "quantity": 1}),
    ],
)
def test_same_key_for_another_request_is_a_mismatch(
    api: Instance, pg: Engine, path: str, body: dict[str, object]
) -> None:
    """Reusing a key with another body or path is a 422 idempotency_key_mismatch with no effect."""
    api.client.post(
        "/users", json={"name": "Ada", "email": "ada@example.com"}, headers={"Idempotency-Key": "k"}
    )

    response = api.client.post(path, json=body, headers={"Idempotency-Key": "k"})

    assert response.status_code == 422
    assert response.json["error"]["code"] == "idempotency_key_mismatch"
    assert count(pg, "users") == 1


def test_failed_attempt_stores_nothing_so_its_retry_runs(api: Instance, pg: Engine) -> None:
    """A 409 under a key keeps nothing: once the balance allows it, the same key succeeds."""
    ada, bob = two_users(api, balance=5)
    body = {"from_user_id": ada, "to_user_id": bob, "amount": 10}

    refused = api.client.post("/transfers", json=body, headers={"Idempotency-Key": "pay"})
    with pg.begin() as connection:
        connection.execute(text("UPDATE users SET balance = 50 WHERE id = :id"), {"id": ada})
    retried = api.client.post("/transfers", json=body, headers={"Idempotency-Key": "pay"})

    assert refused.status_code == 409
    assert retried.status_code == 201
    assert "Idempotent-Replayed" not in retried.headers
    assert count(pg, "idempotency_records") == 1


def test_rejected_body_stores_nothing_under_the_key(api: Instance, pg: Engine) -> None:
    """A 422 under a key keeps nothing: a corrected body with the same key runs."""
    bad = api.client.post("/users", json={"name": ""}, headers={"Idempotency-Key": "k"})
    good = api.client.post(
        "/users", json={"name": "A", "email": "a@x.io"}, headers={"Idempotency-Key": "k"}
    )

    assert bad.status_code == 422
    assert good.status_code == 201
    assert count(pg, "users") == 1


@pytest.mark.parametrize("key", ["", " ", "a b", "x" * 256, "ключ", "tab\there"])
def test_malformed_key_is_400_with_no_effect(api: Instance, pg: Engine, key: str) -> None:
    """A key that is not 1-255 visible ASCII characters is a 400 bad_request."""
    response = api.client.post(
        "/users", json={"name": "A", "email": "a@x.io"}, headers={"Idempotency-Key": key}
    )

    assert response.status_code == 400
    assert response.json["error"]["code"] == "bad_request"
    assert count(pg, "users") == 0


def test_longest_key_of_visible_ascii_is_accepted(api: Instance) -> None:
    """255 characters from ! to ~ make a valid key."""
    key = "".join(chr(33 + i % 94) for i in range(255))
    body = {"name": "A", "email": "a@x.io"}
    assert api.client.post("/users", json=body, headers={"Idempotency-Key": key}).status_code == 201
    assert (
        api.client.post("/users", json=body, headers={"Idempotency-Key": key}).headers[
            "Idempotent-Replayed"
        ]
        == "true"
    )


@pytest.mark.variants("direct", "pgbouncer")
def test_twenty_concurrent_requests_with_one_key_act_once(
    pg: Engine, instances: Callable[..., Instance], monkeypatch: pytest.MonkeyPatch
) -> None:
    """20 simultaneous transfers with one key, on two instances, make exactly one transfer."""
    monkeypatch.setenv("DB_POOL_SIZE", "10")
    first, second = instances(), instances()
    ada, bob = two_users(first, balance=1000)
    body = {"from_user_id": ada, "to_user_id": bob, "amount": 7}
    start = threading.Barrier(20)

    def send(n: int) -> tuple[int, object, str | None]:
        client = (first, second)[n % 2].client
        start.wait()
        response = client.post("/transfers", json=body, headers={"Idempotency-Key": "once"})
        return response.status_code, response.json, response.headers.get("Idempotent-Replayed")

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(send, range(20)))

    created = [r for r in results if r[0] == 201]
    assert all(r[0] in (201, 409) for r in results)
    assert all(r[1] == created[0][1] for r in created)
    assert sum(1 for r in created if r[2] is None) == 1
    assert count(pg, "transfers") == 1
    assert first.client.get(f"/users/{ada}").json["balance"] == 993


def test_keys_are_kept_24_hours_and_purged_after(api: Instance, pg: Engine) -> None:
    """purge_expired removes records older than 24 hours and keeps younger ones."""
    api.client.post(
        "/users", json={"name": "A", "email": "a@x.io"}, headers={"Idempotency-Key": "old"}
    )
    api.client.post(
        "/users", json={"name": "B", "email": "b@x.io"}, headers={"Idempotency-Key": "new"}
    )
    with pg.begin() as connection:
        connection.execute(
            text("UPDATE idempotency_records SET created_at = :at WHERE key = 'old'"),
            {"at": utcnow() - timedelta(hours=24, minutes=1)},
        )

    with api.database.sessionmaker.begin() as session:
        assert purge_expired(session) == 1
        assert [r.key for r in session.query(IdempotencyRecord)] == ["new"]


def test_key_on_a_read_is_ignored(api: Instance) -> None:
    """Only POST looks at Idempotency-Key; a GET with any value is served normally."""
    assert (
        api.client.get("/users", headers={"Idempotency-Key": "not valid here"}).status_code == 200
    )


CLOUD_TASKS = {"X-CloudTasks-QueueName": "payments", "X-CloudTasks-TaskName": "order-1234"}
CLOUD_SCHEDULER = {
    "X-CloudScheduler-JobName": "nightly-payout",
    "X-CloudScheduler-ScheduleTime": "2026-11-30T02:00:00.000Z",
}


@pytest.mark.parametrize("delivery", [CLOUD_TASKS, CLOUD_SCHEDULER], ids=["tasks", "scheduler"])
def test_a_retried_task_without_a_key_replays_its_first_answer(
    api: Instance, pg: Engine, delivery: dict[str, str]
) -> None:
    """Cloud Tasks and Cloud Scheduler send no Idempotency-Key; their delivery id stands for one:
    the retry after a committed first attempt replays it, one transfer."""
    ada, bob = two_users(api)
    body = {"from_user_id": ada, "to_user_id": bob, "amount": 10}

    first = api.client.post("/transfers", json=body, headers=delivery)
    retried = api.client.post("/transfers", json=body, headers=delivery)

    assert (first.status_code, retried.status_code) == (201, 201)
    assert retried.json == first.json
    assert retried.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert count(pg, "transfers") == 1


def test_each_scheduled_run_is_its_own_delivery(api: Instance, pg: Engine) -> None:
    """Another schedule time of the same job is another run: it acts."""
    ada, bob = two_users(api)
    body = {"from_user_id": ada, "to_user_id": bob, "amount": 10}
    later = {**CLOUD_SCHEDULER, "X-CloudScheduler-ScheduleTime": "2026-12-01T02:00:00.000Z"}

    api.client.post("/transfers", json=body, headers=CLOUD_SCHEDULER)
    second = api.client.post("/transfers", json=body, headers=later)

    assert "Idempotent-Replayed" not in second.headers
    assert count(pg, "transfers") == 2


def test_a_task_id_is_the_key_a_caller_could_send_itself(api: Instance, pg: Engine) -> None:
    """The task's identity is stored as ``cloudtasks:QUEUE/TASK``: the same as sending that key."""
    ada, bob = two_users(api)
    body = {"from_user_id": ada, "to_user_id": bob, "amount": 10}

    api.client.post("/transfers", json=body, headers=CLOUD_TASKS)
    by_key = api.client.post(
        "/transfers", json=body, headers={"Idempotency-Key": "cloudtasks:payments/order-1234"}
    )

    assert by_key.headers["Idempotent-Replayed"] == "true"
    assert count(pg, "transfers") == 1


def test_an_idempotency_key_takes_precedence_over_the_task(api: Instance, pg: Engine) -> None:
    """A caller's own key decides; the task headers beside it are not a second key."""
    ada, bob = two_users(api)
    body = {"from_user_id": ada, "to_user_id": bob, "amount": 10}

    api.client.post("/transfers", json=body, headers={**CLOUD_TASKS, "Idempotency-Key": "k-1"})
    other_key = api.client.post(
        "/transfers", json=body, headers={**CLOUD_TASKS, "Idempotency-Key": "k-2"}
    )

    assert "Idempotent-Replayed" not in other_key.headers
    assert count(pg, "transfers") == 2


def test_a_task_name_too_long_for_a_key_is_hashed(api: Instance, pg: Engine) -> None:
    """A 500-character task id still names one delivery: its retry replays."""
    ada, bob = two_users(api)
    body = {"from_user_id": ada, "to_user_id": bob, "amount": 10}
    long_task = {**CLOUD_TASKS, "X-CloudTasks-TaskName": "t" * 500}

    api.client.post("/transfers", json=body, headers=long_task)
    retried = api.client.post("/transfers", json=body, headers=long_task)

    assert retried.headers["Idempotent-Replayed"] == "true"
    assert count(pg, "transfers") == 1


def test_a_failed_task_attempt_stores_nothing_so_its_retry_runs(api: Instance, pg: Engine) -> None:
    """A 409 on the first attempt (no funds yet) is not kept: the retry, after a deposit, acts."""
    ada, bob = two_users(api, balance=0)
    body = {"from_user_id": ada, "to_user_id": bob, "amount": 10}

    assert api.client.post("/transfers", json=body, headers=CLOUD_TASKS).status_code == 409
    with pg.begin() as connection:
        connection.execute(text("UPDATE users SET balance = 10 WHERE id = :id"), {"id": ada})
    retried = api.client.post("/transfers", json=body, headers=CLOUD_TASKS)

    assert retried.status_code == 201
    assert "Idempotent-Replayed" not in retried.headers
