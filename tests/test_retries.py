"""Transient failures are retried as a whole transaction; an unknown commit outcome is not."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import Engine, event, text

from db.session import MAX_ATTEMPTS
from tests.conftest import PROBE, Instance


@pytest.fixture
def probe(pg: Engine, instances: Callable[..., Instance]) -> Instance:
    """The probe app with its attempt log emptied."""
    instance = instances("probe", PROBE)
    instance.module.attempts.clear()
    instance.module.backend_pids.clear()
    instance.module.meet = None
    return instance


def test_serialization_failure_is_retried_and_both_transactions_succeed(
    probe: Instance, pg: Engine
) -> None:
    """Two SERIALIZABLE read-modify-writes collide; the loser runs again and no update is lost."""
    user = probe.client.post("/users", json={"name": "A", "email": "a@example.com"}).json
    probe.module.meet = threading.Barrier(2)

    def increment(_: int) -> int:
        return int(probe.client.post(f"/serial-increment?id={user['id']}").status_code)

    with ThreadPoolExecutor(2) as pool:
        statuses = list(pool.map(increment, range(2)))

    assert statuses == [200, 200]
    assert len(probe.module.attempts) == 3  # both once, the loser twice
    with pg.connect() as connection:
        balance = connection.scalar(text("SELECT balance FROM users WHERE id = :id"), user)
    assert balance == 2


def test_handler_that_keeps_failing_ends_in_503_after_bounded_attempts(probe: Instance) -> None:
    """A serialization failure every time: MAX_ATTEMPTS tries, then 503 with Retry-After."""
    response = probe.client.post("/always-conflicts")

    assert response.status_code == 503
    assert response.json["error"]["code"] == "service_unavailable"
    assert response.headers["Retry-After"]
    assert len(probe.module.attempts) == MAX_ATTEMPTS


def test_connection_lost_before_commit_is_retried_in_a_new_session(
    probe: Instance, pg: Engine
) -> None:
    """A connection that dies mid-transaction is retried; the write happens exactly once."""
    response = probe.client.post("/kill-once")

    assert response.status_code == 201
    assert response.json == {"attempts": 2}
    with pg.connect() as connection:
        assert connection.scalar(text("SELECT count(*) FROM users")) == 1


def test_bare_socket_error_from_the_driver_is_retried_as_a_lost_connection(
    probe: Instance, pg: Engine
) -> None:
    """A ConnectionResetError escaping pg8000 is a lost connection: retried, not a 500."""
    response = probe.client.post("/reset-once")

    assert response.status_code == 201
    assert response.json == {"attempts": 2}
    with pg.connect() as connection:
        assert connection.scalar(text("SELECT count(*) FROM users")) == 1


def test_connection_lost_during_commit_is_not_retried(probe: Instance, pg: Engine) -> None:
    """When the connection dies as COMMIT is sent the outcome is unknown: 503, one attempt only."""

    def terminate_before_commit(_connection: object) -> None:
        with pg.connect() as outside:
            outside.execute(
                text("SELECT pg_terminate_backend(:pid, 5000)"),
                {"pid": probe.module.backend_pids[-1]},
            )

    event.listen(probe.database.engine, "commit", terminate_before_commit)

    response = probe.client.post("/write")

    assert response.status_code == 503
    assert len(probe.module.attempts) == 1
    event.remove(probe.database.engine, "commit", terminate_before_commit)
    assert probe.client.get("/users").status_code == 200
