"""The per-request scope: fresh sessions, no stale reads, no poisoning, one commit, closed."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import Engine, event, inspect, text
from sqlalchemy.orm import Session

from db.models import User
from db.session import transaction
from tests.conftest import PROBE, Instance

pytestmark = pytest.mark.variants("direct", "pgbouncer", "untuned")

USER = {"name": "Ada", "email": "ada@example.com"}


def _create_user(instance: Instance, email: str) -> int:
    response = instance.client.post("/users", json={"name": "Someone", "email": email})
    assert response.status_code == 201, response.json
    return int(response.json["id"])


@pytest.fixture
def probe(pg: Engine, instances: Callable[..., Instance]) -> Instance:
    """The probe scenario app on the test PostgreSQL, with its session log emptied."""
    instance = instances("probe", PROBE)
    instance.module.sessions.clear()
    instance.module.held.clear()
    return instance


@pytest.fixture
def small_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """One connection and no overflow, so a failed request's connection is the next one's."""
    monkeypatch.setenv("DB_POOL_SIZE", "1")
    monkeypatch.setenv("DB_MAX_OVERFLOW", "0")
    monkeypatch.setenv("DB_POOL_TIMEOUT", "2")


def _count(engine: Engine, name: str) -> list[int]:
    counter = [0]

    def bump(*_args: object) -> None:
        counter[0] += 1

    event.listen(engine, name, bump)
    return counter


# Stale data


def test_instance_sees_change_made_by_another_instance(
    pg: Engine, instances: Callable[..., Instance]
) -> None:
    """A read on instance A after instance B changed the user returns B's change."""
    a, b = instances(), instances()
    user_id = _create_user(a, "stale@example.com")
    assert a.client.get(f"/users/{user_id}").json["name"] == "Someone"

    assert b.client.patch(f"/users/{user_id}", json={"name": "Changed"}).status_code == 200

    assert a.client.get(f"/users/{user_id}").json["name"] == "Changed"
    assert a.database.engine is not b.database.engine


def test_instance_sees_change_made_outside_the_service(
    pg: Engine, instances: Callable[..., Instance]
) -> None:
    """A read after plain SQL changed the row returns the new value."""
    a = instances()
    user_id = _create_user(a, "outside@example.com")
    assert a.client.get(f"/users/{user_id}").json["balance"] == 0

    with pg.begin() as connection:
        connection.execute(text("UPDATE users SET balance = 42 WHERE id = :id"), {"id": user_id})

    assert a.client.get(f"/users/{user_id}").json["balance"] == 42


def test_every_request_starts_with_a_new_empty_session(probe: Instance, pg: Engine) -> None:
    """Each request gets a never-used session with an empty identity map and no transaction."""
    user_id = _create_user(probe, "fresh@example.com")
    first = probe.client.get(f"/fresh?id={user_id}").json
    with pg.begin() as connection:
        connection.execute(
            text("UPDATE users SET name = 'Renamed' WHERE id = :id"), {"id": user_id}
        )
    second = probe.client.get(f"/fresh?id={user_id}").json

    for state in (first, second):
        assert state["reused"] is False
        assert state["identity_map"] == 0
        assert state["in_transaction"] is False
    # The first request's row is still referenced, yet detached, and the second read is fresh.
    assert inspect(probe.module.held[0]).detached
    assert first["name"] == "Someone"
    assert second["name"] == "Renamed"
    assert probe.module.sessions[0] is not probe.module.sessions[1]


# No poisoned session


FAILURES = [
    pytest.param("post", "/users", {"name": "", "email": "bad"}, 422, id="validation"),
    pytest.param("post", "/users", {"name": "D", "email": "taken@example.com"}, 409, id="unique"),
    pytest.param("post", "/overflow", None, 422, id="database-only-error"),
    pytest.param("post", "/boom", None, 500, id="handler-exception"),
    pytest.param("post", "/commit-fails", None, 500, id="commit-fails"),
    pytest.param("post", "/kill-connection", None, 503, id="connection-killed"),
]  # fmt: skip


@pytest.mark.usefixtures("small_pool")
@pytest.mark.parametrize(("method", "path", "body", "status"), FAILURES)
def test_failed_request_is_followed_by_a_good_one(
    probe: Instance, pg: Engine, method: str, path: str, body: object, status: int
) -> None:
    """On a warm instance with one pooled connection, a failure never breaks the next request."""
    _create_user(probe, "taken@example.com")

    failed = getattr(probe.client, method)(path, json=body)
    assert failed.status_code == status, failed.json
    assert set(failed.json) == {"error"}

    created = probe.client.post("/users", json={"name": "Next", "email": "next@example.com"})
    assert created.status_code == 201, created.json
    assert probe.client.get(f"/users/{created.json['id']}").status_code == 200
    # The failed request left nothing behind.
    with pg.connect() as connection:
        emails = set(connection.scalars(text("SELECT email FROM users")))
        assert emails == {"taken@example.com", "next@example.com"}
        assert connection.scalar(text("SELECT count(*) FROM commit_probe")) == 0


@pytest.mark.usefixtures("small_pool")
def test_connection_whose_rollback_failed_is_discarded(probe: Instance) -> None:
    """When even the rollback fails, the connection is invalidated, not returned to the pool."""
    invalidated: list[object] = []
    event.listen(probe.database.engine.pool, "invalidate", lambda *args: invalidated.append(args))

    assert probe.client.post("/kill-connection").status_code == 503

    assert invalidated
    assert probe.client.get("/users").status_code == 200


# Every path returns its connection and closes its session


PATHS = [
    pytest.param("get", "/fresh?id=1", None, 200, id="read"),
    pytest.param("post", "/autoflush", None, 200, id="write"),
    pytest.param("get", "/users/999", None, 404, id="not-found"),
    pytest.param("post", "/users", {"name": "A", "email": "taken@example.com"}, 409, id="conflict"),
    pytest.param("post", "/overflow", None, 422, id="database-error"),
    pytest.param("post", "/boom", None, 500, id="exception"),
    pytest.param("post", "/commit-fails", None, 500, id="failed-commit"),
    pytest.param("post", "/kill-connection", None, 503, id="lost-connection"),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "body", "status"), PATHS)
def test_every_path_returns_its_connection_and_closes_its_session(
    probe: Instance, method: str, path: str, body: object, status: int
) -> None:
    """After any outcome nothing is checked out and no row is left attached to a session."""
    _create_user(probe, "taken@example.com")
    probe.module.held.clear()
    began: list[Session] = []
    event.listen(probe.database.sessionmaker, "after_begin", lambda s, *_: began.append(s))

    response = getattr(probe.client, method)(path, json=body)

    assert response.status_code == status, response.json
    assert probe.database.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert began, "the request ran no transaction"
    for session in began:
        assert session.get_transaction() is None
        assert len(session.identity_map) == 0
    # A committed but unclosed session would still hold its rows as persistent.
    for row in probe.module.held:
        assert inspect(row).detached or inspect(row).transient


def test_rows_keep_what_they_held_at_commit(probe: Instance) -> None:
    """A row a committed transaction returns is detached with its values loaded: nothing was
    expired at COMMIT, so reading it after the session closed needs no query."""
    user_id = _create_user(probe, "kept@example.com")

    user = transaction(probe.database, lambda session: session.get_one(User, user_id))

    assert inspect(user).detached
    assert inspect(user).expired_attributes == set()
    assert (user.id, user.email) == (user_id, "kept@example.com")


def test_base_exception_rolls_back_and_returns_the_connection(probe: Instance, pg: Engine) -> None:
    """A BaseException (as a worker's injected timeout) still rolls back, closes and re-raises."""
    _create_user(probe, "taken@example.com")

    def interrupted(session: Session) -> None:
        session.add(probe.module._new_user("interrupted@example.com"))
        session.flush()
        raise SystemExit("injected timeout")

    with pytest.raises(SystemExit):
        transaction(probe.database, interrupted)

    assert probe.database.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    with pg.connect() as connection:
        assert connection.scalar(text("SELECT count(*) FROM users")) == 1


# Commit exactly once


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "commits"),
    [
        pytest.param("post", "/users", {"name": "A", "email": "a@b.c"}, 201, 1, id="create"),
        pytest.param("patch", "/users/1", {"name": "B"}, 200, 1, id="update"),
        pytest.param("delete", "/users/1", None, 204, 1, id="delete"),
        pytest.param("post", "/users", {"name": "A", "email": "taken@x.io"}, 409, 0, id="dup"),
        pytest.param("post", "/users", {"name": "", "email": "x"}, 422, 0, id="invalid"),
        pytest.param("patch", "/users/999", {"name": "B"}, 404, 0, id="missing"),
        pytest.param("post", "/boom", None, 500, 0, id="exception"),
    ],
)  # fmt: skip
def test_write_request_commits_exactly_once_and_failed_one_never(
    probe: Instance, method: str, path: str, body: object, status: int, commits: int
) -> None:
    """A successful write commits once; a failed request commits nothing."""
    _create_user(probe, "taken@x.io")
    committed = _count(probe.database.engine, "commit")

    response = getattr(probe.client, method)(path, json=body)

    assert response.status_code == status, response.json
    assert committed[0] == commits


def test_commit_refused_by_the_server_is_a_5xx_and_stores_nothing(
    probe: Instance, pg: Engine
) -> None:
    """When COMMIT itself fails the caller gets a 500, not a 2xx, and no row is kept."""
    committed = _count(probe.database.engine, "commit")

    response = probe.client.post("/commit-fails")

    assert response.status_code == 500
    assert committed[0] == 1  # attempted once, not retried
    with pg.connect() as connection:
        assert connection.scalar(text("SELECT count(*) FROM users")) == 0


# Autoflush


def test_handler_finds_the_row_it_added_in_the_same_request(probe: Instance) -> None:
    """A query after session.add() sees the pending row without an explicit flush."""
    response = probe.client.post("/autoflush")

    assert response.status_code == 200
    assert response.json == {"found": True}


# Reads are read-only


def test_a_get_runs_read_only_and_a_write_in_it_is_refused(probe: Instance, pg: Engine) -> None:
    """GET is a safe method: its transaction is read-only, so a write in it fails and stays out;
    the next request is served."""
    response = probe.client.get("/write-on-get")

    assert response.status_code == 500
    with pg.connect() as connection:
        assert connection.scalar(text("SELECT count(*) FROM users")) == 0
    assert probe.client.get("/users").status_code == 200
