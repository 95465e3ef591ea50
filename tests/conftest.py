"""Fixtures: the PostgreSQL server, a clean environment, instances built from real entry points."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from functions_framework import create_app
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

from db.engine import Database
from db.migrate import upgrade
from db.outage import outages
from dev.pgbouncer import PgBouncer
from dev.postgres import RUNTIME_PASSWORD, RUNTIME_USER, PostgresServer
from tests.deploying import Deploy, start_deploy

ROOT = Path(__file__).resolve().parent.parent
MAIN = ROOT / "main.py"
PROBE = Path(__file__).resolve().parent / "scenarios" / "probe.py"

CONFIG_VARIABLES = (
    "DATABASE_URL", "INSTANCE_CONNECTION_NAME", "DB_USER", "DB_PASS", "DB_NAME", "DB_IAM_AUTH",
    "DB_IP_TYPE", "DB_POOL_SIZE", "DB_MAX_OVERFLOW", "DB_POOL_TIMEOUT", "DB_POOL_RECYCLE",
    "DB_STATEMENT_TIMEOUT", "DB_IDLE_IN_TRANSACTION_TIMEOUT", "LOG_LEVEL", "THREADS",
    "CLOUD_SQL_ADMIN_API_ENDPOINT", "GOOGLE_APPLICATION_CREDENTIALS", "K_SERVICE", "LOG_FORMAT",
    "DB_DRIVER_TUNING", "DB_PASS_FILE", "DB_RUNTIME_ROLE", "BODY_TIMEOUT", "GOOGLE_CLOUD_PROJECT",
    "PUBSUB_EMULATOR_HOST", "PUBLISH_TIMEOUT",
)  # fmt: skip

# A table whose constraint trigger fails at COMMIT: the only honest way to make a commit fail.
COMMIT_PROBE_DDL = """
CREATE TABLE commit_probe (id int PRIMARY KEY);
CREATE FUNCTION commit_probe_refuse() RETURNS trigger LANGUAGE plpgsql AS
  $$ BEGIN RAISE EXCEPTION 'refused at commit'; END $$;
CREATE CONSTRAINT TRIGGER commit_probe_refuse AFTER INSERT ON commit_probe
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION commit_probe_refuse();
"""


@dataclass
class Instance:
    """One function instance: its test client, its per-instance Database and its module."""

    app: Flask
    client: FlaskClient
    database: Database
    module: Any  # the entry point module, with its scenario state


VARIANTS = ("direct", "pgbouncer", "untuned")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``@pytest.mark.variants("direct", "pgbouncer", ...)`` runs a test once per variant."""
    marker = metafunc.definition.get_closest_marker("variants")
    if marker is not None and "variant" in metafunc.fixturenames:
        assert set(marker.args) <= set(VARIANTS), marker.args
        metafunc.parametrize("variant", marker.args, indirect=True)


@pytest.fixture
def variant(request: pytest.FixtureRequest) -> str:
    """How instances reach PostgreSQL: ``direct``, through ``pgbouncer`` in transaction mode,
    or ``untuned`` (direct, with pg8000 as installed: DB_DRIVER_TUNING=false)."""
    return str(getattr(request, "param", "direct"))


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts with none of the service's configuration set and no outage noted."""
    for variable in CONFIG_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    outages.reset()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole run."""
    server = PostgresServer()
    server.init()
    server.start()
    yield server
    server.destroy()


@pytest.fixture(scope="session")
def database_url(postgres: PostgresServer) -> URL:
    """The URL of a migrated database, ``app``, on the test server."""
    admin = create_engine(postgres.url(), poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql("CREATE DATABASE app")
    admin.dispose()
    url = postgres.url("app")
    engine = create_engine(url, poolclass=NullPool)
    with engine.begin() as connection:
        connection.exec_driver_sql(COMMIT_PROBE_DDL)
    upgrade(engine)  # after the probe table, so that the runtime role may use it too
    engine.dispose()
    postgres.add_runtime_user("app")
    return url


@pytest.fixture(scope="session")
def outside(database_url: URL) -> Iterator[Engine]:
    """An engine for the tests' own SQL, outside any instance of the service."""
    engine = create_engine(database_url, pool_size=2, pool_pre_ping=True)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def pgbouncer(postgres: PostgresServer) -> Iterator[PgBouncer]:
    """PgBouncer in transaction mode, with its default rules, in front of the test server."""
    bouncer = PgBouncer(postgres).start()
    yield bouncer
    bouncer.stop()


@pytest.fixture
def pg(
    database_url: URL,
    outside: Engine,
    monkeypatch: pytest.MonkeyPatch,
    variant: str,
    request: pytest.FixtureRequest,
) -> Engine:
    """Configure instances for the test PostgreSQL (as ``variant`` says), every table emptied."""
    with outside.begin() as connection:
        tables = connection.scalars(
            text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                 " AND tablename <> 'alembic_version'")
        ).all()  # fmt: skip
        connection.exec_driver_sql(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")
    # Instances log in as the functions do: with the runtime role's privileges only.
    url = database_url.set(username=RUNTIME_USER, password=RUNTIME_PASSWORD)
    if variant == "pgbouncer":
        url = request.getfixturevalue("pgbouncer").runtime_url(database_url.database)
    if variant == "untuned":
        monkeypatch.setenv("DB_DRIVER_TUNING", "false")
    monkeypatch.setenv("DATABASE_URL", url.render_as_string(hide_password=False))
    return outside


@pytest.fixture
def instances() -> Iterator[Callable[..., Instance]]:
    """Start instances from an entry point's source; each is disposed afterwards."""
    started: list[Instance] = []

    def start(target: str = "api", source: Path = MAIN) -> Instance:
        app = create_app(target, str(source))  # type: ignore[no-untyped-call]
        module = sys.modules[source.stem]
        instance = Instance(app, app.test_client(), module.database, module)
        started.append(instance)
        return instance

    yield start
    for instance in started:
        instance.database.dispose()


@pytest.fixture
def client(pg: Engine, instances: Callable[..., Instance]) -> FlaskClient:
    """A client of the ``api`` entry point on the test PostgreSQL."""
    return instances().client


@pytest.fixture
def deploy(tmp_path: Path) -> Iterator[Deploy]:
    """deploy.sh in a copy of the project, with the real gcloud and an empty stand-in project."""
    runner = start_deploy(tmp_path)
    yield runner
    runner.api.stop()
    assert runner.hosts_called() <= {runner.api.url}, "gcloud called a host other than the stand-in"


@pytest.fixture
def served_user(pg: Engine) -> int:
    """A user with a balance of 10, whose row a served instance will lock and change."""
    with pg.begin() as connection:
        return int(
            connection.scalar(
                text(
                    "INSERT INTO users (name, email, balance, created_at, updated_at)"
                    " VALUES ('A', 'a@x.io', 10, now(), now()) RETURNING id"
                )
            )
            or 0
        )
