"""Through PgBouncer in transaction mode, with its default rules, as Cloud SQL's Managed
Connection Pooling runs: the timeouts still hold, nothing leaks between clients, and a
refusal that retrying cannot cure is told apart from an outage.

The session-scope invariants, concurrent transfers and one Idempotency-Key under
concurrency also run through PgBouncer (``@pytest.mark.variants``, tests/conftest.py).
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pg8000.dbapi
import pytest
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from db.errors import Failure, classify
from dev.pgbouncer import PgBouncer
from dev.postgres import PASSWORD, PostgresServer
from tests.conftest import PROBE, Instance
from tests.serving import ServedProbe, row_is_free_and_unchanged, server_connections, wait_for

WRONG_PASSWORD = "not-the-password-31c7"


def _error_of(url: URL, **connect_args: object) -> DBAPIError:
    engine = create_engine(url, poolclass=NullPool, connect_args=connect_args)
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")
    except DBAPIError as error:
        return error
    finally:
        engine.dispose()
    raise AssertionError("the connection was not refused")


def test_pgbouncer_refuses_settings_sent_at_connect(pgbouncer: PgBouncer) -> None:
    """Why the timeouts travel with each transaction: PgBouncer's default rules refuse them in
    the startup packet (08P01), a refusal no retry cures."""
    error = _error_of(pgbouncer.url("app"), startup_params={"statement_timeout": "5000"})

    assert "unsupported startup parameter" in str(error)
    assert classify(error) is Failure.REFUSED


@pytest.mark.usefixtures("database_url")
def test_a_full_pgbouncer_pool_is_an_outage_not_a_refusal(postgres: PostgresServer) -> None:
    """A client that waited too long for a server connection is dropped (query_wait_timeout):
    that passes, so it is an outage (503), not a refusal."""
    bouncer = PgBouncer(postgres, default_pool_size=1, query_wait_timeout=1).start()
    try:
        holder = pg8000.dbapi.connect(
            user="postgres", password=PASSWORD, host="127.0.0.1", port=bouncer.port,
            database="app",
        )  # fmt: skip
        try:
            holder.cursor().execute("SELECT 1")  # holds the one server connection in a transaction
            error = _error_of(bouncer.url("app"))
        finally:
            holder.close()
    finally:
        bouncer.stop()

    assert classify(error) is Failure.UNAVAILABLE


@pytest.fixture
def bounced(pg: Engine, pgbouncer: PgBouncer, monkeypatch: pytest.MonkeyPatch) -> URL:
    """Instances configured to reach the test database through PgBouncer."""
    url = pgbouncer.url("app")
    monkeypatch.setenv("DATABASE_URL", url.render_as_string(hide_password=False))
    return url


@pytest.mark.usefixtures("bounced")
def test_the_timeouts_hold_in_every_transaction_and_leave_no_session_state(
    instances: Callable[..., Instance], pgbouncer: PgBouncer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside each request the timeouts are the configured ones; the server connections the
    pooler hands to other clients keep their defaults."""
    monkeypatch.setenv("DB_STATEMENT_TIMEOUT", "7")
    monkeypatch.setenv("DB_IDLE_IN_TRANSACTION_TIMEOUT", "11")
    probe = instances("probe", PROBE).client

    seen = [probe.get("/settings").json for _ in range(10)]

    assert {json.dumps(s, sort_keys=True) for s in seen} == {
        json.dumps({"application_name": "cloud-function", "statement_timeout": "7s",
                    "idle_in_transaction_session_timeout": "11s"}, sort_keys=True)
    }  # fmt: skip
    other = pg8000.dbapi.connect(
        user="postgres", password=PASSWORD, host="127.0.0.1", port=pgbouncer.port, database="app"
    )
    other.autocommit = True
    cursor = other.cursor()
    cursor.execute("SELECT current_setting('statement_timeout')")
    assert cursor.fetchall() == (["0"],)
    other.close()


@pytest.mark.usefixtures("bounced")
def test_a_runaway_statement_is_cancelled_through_pgbouncer(
    instances: Callable[..., Instance], monkeypatch: pytest.MonkeyPatch
) -> None:
    """DB_STATEMENT_TIMEOUT cancels a long statement behind the pooler: a prompt 503."""
    monkeypatch.setenv("DB_STATEMENT_TIMEOUT", "0.5")
    probe = instances("probe", PROBE)

    started = time.perf_counter()
    response = probe.client.post("/sleep?seconds=30")

    assert response.status_code == 503
    assert time.perf_counter() - started < 3
    assert probe.client.get("/users").status_code == 200


def test_a_frozen_instance_is_cut_off_through_pgbouncer(
    pg: Engine, bounced: URL, served_user: int, tmp_path: Path
) -> None:
    """An instance frozen (SIGSTOP) inside a transaction loses it after the idle timeout,
    behind the pooler too: the row lock and the uncommitted write are gone."""
    served = ServedProbe(bounced, "pooled-frozen", tmp_path, DB_IDLE_IN_TRANSACTION_TIMEOUT="1")
    try:
        served.post_in_background(f"/hold?id={served_user}")
        wait_for(lambda: not row_is_free_and_unchanged(pg, served_user), 15)

        served.signal(signal.SIGSTOP)

        wait_for(lambda: row_is_free_and_unchanged(pg, served_user), 10)
    finally:
        served.stop()
    assert server_connections(pg, "pooled-frozen", "idle in transaction") == 0


@pytest.fixture
def refused(
    request: pytest.FixtureRequest,
    pg: Engine,
    pgbouncer: PgBouncer,
    monkeypatch: pytest.MonkeyPatch,
) -> str:
    """Instances configured with a setting the database refuses: the SQLSTATE it answers."""
    route, mistake = request.param
    url = pgbouncer.url("app") if route == "pgbouncer" else pg.url
    if mistake == "password":
        url = url.set(password=WRONG_PASSWORD)
    else:
        url = url.set(database="no_such_database")
    monkeypatch.setenv("DATABASE_URL", url.render_as_string(hide_password=False))
    monkeypatch.setenv("LOG_FORMAT", "json")
    return "08P01" if route == "pgbouncer" else {"password": "28P01", "database": "3D000"}[mistake]


REFUSALS = [("direct", "password"), ("direct", "database"), ("pgbouncer", "password"),
            ("pgbouncer", "database")]  # fmt: skip


@pytest.mark.parametrize("refused", REFUSALS, indirect=True, ids="-".join)
def test_a_refusal_is_a_500_and_one_error_line(
    refused: str, instances: Callable[..., Instance], capsys: pytest.CaptureFixture[str]
) -> None:
    """A wrong password or database name is no outage: /healthz answers 500 without
    Retry-After, and one ERROR line names the SQLSTATE, never the password."""
    client = instances().client
    capsys.readouterr()

    response = client.get("/healthz")

    assert response.status_code == 500
    assert response.json == {"error": {"code": "internal", "message": "internal error"}}
    assert "Retry-After" not in response.headers
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    [error] = [line for line in lines if line["severity"] == "ERROR"]
    assert f"SQLSTATE {refused}" in error["message"]
    assert "stack_trace" not in error
    assert WRONG_PASSWORD not in json.dumps(lines)
    assert PASSWORD not in json.dumps(lines)


@pytest.mark.parametrize("refused", [("direct", "password")], indirect=True, ids="-".join)
def test_a_refusal_is_logged_once_per_request(
    refused: str, instances: Callable[..., Instance], capsys: pytest.CaptureFixture[str]
) -> None:
    """Each refused request logs its own ERROR line: a misconfiguration never goes quiet."""
    client = instances().client
    capsys.readouterr()

    statuses = [client.get("/users").status_code for _ in range(3)]

    assert statuses == [500] * 3
    lines = capsys.readouterr().out.splitlines()
    assert sum(json.loads(line)["severity"] == "ERROR" for line in lines) == 3


def test_concurrent_requests_share_few_server_connections(
    bounced: URL, pg: Engine, instances: Callable[..., Instance], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two instances with pools of 8 run 16 threads of reads through PgBouncer, all served."""
    monkeypatch.setenv("DB_POOL_SIZE", "8")
    first, second = instances(), instances()
    statuses: list[int] = []
    lock = threading.Lock()

    def reads(n: int) -> None:
        client = (first, second)[n % 2].client
        for _ in range(20):
            status = client.get("/users").status_code
            with lock:
                statuses.append(status)

    threads = [threading.Thread(target=reads, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert statuses == [200] * 320
