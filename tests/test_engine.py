"""One engine per instance: built lazily, exactly once, even when many threads ask at once."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import Engine, event
from sqlalchemy.dialects.postgresql.pg8000 import PGDialect_pg8000
from sqlalchemy.pool import Pool

import db.engine
from tests.conftest import PROBE, Instance

THREADS = 32


@pytest.fixture
def counted_engines(monkeypatch: pytest.MonkeyPatch) -> list[Engine]:
    """Record every engine the service creates; each creation is slowed to widen any race."""
    created: list[Engine] = []
    real = sqlalchemy.create_engine

    def create_engine(*args: Any, **kwargs: Any) -> Engine:
        time.sleep(0.05)
        engine = real(*args, **kwargs)
        created.append(engine)
        return engine

    monkeypatch.setattr(db.engine, "create_engine", create_engine)
    return created


def test_importing_main_opens_no_connection(pg: Engine, instances: Callable[..., Instance]) -> None:
    """Loading the entry points builds no engine and opens no connection."""
    connects: list[object] = []

    def record(*args: object) -> None:
        connects.append(args)

    event.listen(Pool, "connect", record)
    try:
        instance = instances()
        assert not instance.database.is_built
        assert connects == []
    finally:
        event.remove(Pool, "connect", record)


def test_concurrent_first_requests_build_one_engine(
    pg: Engine, instances: Callable[..., Instance], counted_engines: list[Engine]
) -> None:
    """32 threads making their first request at the same moment create one engine and one pool."""
    instance = instances()
    start = threading.Barrier(THREADS)

    def first_request(_: int) -> int:
        start.wait()
        return int(instance.client.get("/healthz").status_code)

    with ThreadPoolExecutor(THREADS) as pool:
        statuses = list(pool.map(first_request, range(THREADS)))

    assert statuses == [200] * THREADS
    assert len(counted_engines) == 1
    assert instance.database.engine is counted_engines[0]
    assert instance.database.engine.pool is counted_engines[0].pool


def test_concurrent_requests_each_get_their_own_session(
    pg: Engine, instances: Callable[..., Instance], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests running at once on one instance never share a session, and all succeed."""
    monkeypatch.setenv("DB_POOL_SIZE", "16")
    probe = instances("probe", PROBE)
    probe.module.sessions.clear()
    user_id = probe.client.post("/users", json={"name": "A", "email": "a@example.com"}).json["id"]
    start = threading.Barrier(16)

    def read(_: int) -> dict[str, Any]:
        start.wait()
        response = probe.client.get(f"/fresh?id={user_id}")
        assert response.status_code == 200
        return dict(response.json)

    with ThreadPoolExecutor(16) as pool:
        states = list(pool.map(read, range(16)))

    assert all(state == {**states[0], "reused": False} for state in states)
    assert len({id(session) for session in probe.module.sessions}) == 16


@pytest.mark.variants("direct", "pgbouncer", "untuned")
def test_connections_carry_the_server_side_timeouts_in_every_transaction(
    pg: Engine, instances: Callable[..., Instance], monkeypatch: pytest.MonkeyPatch
) -> None:
    """statement_timeout and idle_in_transaction_session_timeout hold in each transaction."""
    monkeypatch.setenv("DB_STATEMENT_TIMEOUT", "7")
    monkeypatch.setenv("DB_IDLE_IN_TRANSACTION_TIMEOUT", "11")
    instance = instances()

    with instance.database.engine.connect() as connection:
        assert connection.exec_driver_sql("SHOW statement_timeout").scalar() == "7s"
        assert (
            connection.exec_driver_sql("SHOW idle_in_transaction_session_timeout").scalar() == "11s"
        )


@pytest.mark.variants("direct", "pgbouncer", "untuned")
def test_sqlalchemys_first_queries_on_a_connection_run_under_the_timeouts(
    pg: Engine, instances: Callable[..., Instance], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dialect's own queries on a new connection are inside the timeouts as well: an
    instance frozen among them does not hold its transaction for ever."""
    monkeypatch.setenv("DB_IDLE_IN_TRANSACTION_TIMEOUT", "11")
    seen: list[str] = []
    real: Callable[[PGDialect_pg8000, Any], None] = PGDialect_pg8000.initialize

    def initialize(self: PGDialect_pg8000, connection: Any) -> None:
        seen.append(connection.exec_driver_sql("SHOW idle_in_transaction_session_timeout").scalar())
        real(self, connection)

    monkeypatch.setattr(PGDialect_pg8000, "initialize", initialize)

    assert instances().client.get("/users").status_code == 200
    assert seen == ["11s"]


def test_pool_size_follows_the_configuration(
    pg: Engine, instances: Callable[..., Instance], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pool is sized from THREADS unless DB_POOL_SIZE says otherwise."""
    monkeypatch.setenv("THREADS", "6")
    assert instances().database.engine.pool.size() == 6  # type: ignore[attr-defined]
    monkeypatch.setenv("DB_POOL_SIZE", "3")
    assert instances().database.engine.pool.size() == 3  # type: ignore[attr-defined]
