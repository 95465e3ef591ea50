"""The Cloud SQL connector path, end to end, with the real Cloud SQL Python Connector.

Only Google's side is a stand-in (``tests/google/cloudsql.py``): a token endpoint for the
service account, the Cloud SQL Admin API (connect settings and ephemeral certificates signed
by a CA made at run time) and the instance's TLS proxy on port 3307, which forwards to the
test PostgreSQL. The connector fetches, refreshes and presents its certificates for real.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
from flask.testing import FlaskClient
from google.cloud.sql.connector import Connector
from sqlalchemy import Engine, create_engine, inspect, text
from sqlalchemy.pool import NullPool

from dev.postgres import PASSWORD, PostgresServer, free_port
from tests.conftest import PROBE, ROOT, Instance
from tests.deploying import OWNER_SECRET_IN_SECRET_MANAGER, Deploy, needs_gcloud
from tests.google.cloudsql import CloudSql

INSTANCE = "acme-prod:europe-west1:main"
IAM_USER = "functions@acme-prod.iam"  # the service account's database user
APP_NAME = "connector-check"


@pytest.fixture(scope="module")
def cloud_sql_stand_in(
    postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CloudSql]:
    """Google's side of the connector, in front of the test server."""
    stand_in = CloudSql.start(INSTANCE, postgres.port, tmp_path_factory.mktemp("google"))
    yield stand_in
    stand_in.stop()


@pytest.fixture
def cloud_sql(
    cloud_sql_stand_in: CloudSql, pg: Engine, monkeypatch: pytest.MonkeyPatch
) -> Iterator[CloudSql]:
    """Instances configured for the connector path, with the stand-in's records emptied."""
    stand_in = cloud_sql_stand_in
    stand_in.admin.issued.clear()
    stand_in.admin.received.clear()
    stand_in.admin.certificate_lifetime = timedelta(hours=1)
    stand_in.proxy.tunnels.clear()
    monkeypatch.delenv("DATABASE_URL")
    for name, value in {
        **stand_in.environment(),
        "INSTANCE_CONNECTION_NAME": INSTANCE,
        "DB_USER": "postgres",
        "DB_PASS": PASSWORD,
        "DB_NAME": "app",
        "DB_POOL_SIZE": "4",
        "K_SERVICE": APP_NAME,
    }.items():
        monkeypatch.setenv(name, value)
    yield stand_in
    _terminate(pg)


def _terminate(pg: Engine) -> None:
    with pg.connect() as connection:
        connection.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = :name"
            ),
            {"name": APP_NAME},
        )


def _backends(pg: Engine) -> int:
    with pg.connect() as connection:
        query = text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :name")
        return int(connection.scalar(query, {"name": APP_NAME}) or 0)


def _admin_calls(cloud_sql: CloudSql) -> list[str]:
    return [request.path.rsplit("/", 1)[-1].split(":")[-1] for request in cloud_sql.admin.received]


def test_requests_succeed_through_the_connector(
    cloud_sql: CloudSql, instances: Callable[..., Instance]
) -> None:
    """16 concurrent writes succeed over TLS tunnels; one certificate serves them all."""
    instance = instances()
    assert cloud_sql.admin.received == []  # nothing at import
    start = threading.Barrier(16)

    def create(n: int) -> int:
        start.wait()
        body = {"name": "U", "email": f"u{n}@example.com"}
        return int(instance.client.post("/users", json=body).status_code)

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(create, range(16))) == [201] * 16

    assert len(instance.client.get("/users?limit=100").json["users"]) == 16
    assert isinstance(instance.database._connector, Connector)
    assert sorted(_admin_calls(cloud_sql)) == ["connectSettings", "generateEphemeralCert"]
    assert 1 <= len(cloud_sql.proxy.tunnels) <= 4  # the pool, never a connection per request
    assert {tunnel.serial for tunnel in cloud_sql.proxy.tunnels} == {
        cloud_sql.admin.issued[0].serial
    }


def test_backends_carry_the_timeouts_and_the_application_name(
    cloud_sql: CloudSql, instances: Callable[..., Instance], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside a request, statement_timeout, the idle timeout and application_name are in force."""
    monkeypatch.setenv("DB_STATEMENT_TIMEOUT", "7")
    monkeypatch.setenv("DB_IDLE_IN_TRANSACTION_TIMEOUT", "11")

    response = instances("probe", PROBE).client.get("/settings")

    assert response.status_code == 200
    assert response.json == {
        "statement_timeout": "7s",
        "idle_in_transaction_session_timeout": "11s",
        "application_name": APP_NAME,
    }


def test_a_killed_backend_is_replaced(
    cloud_sql: CloudSql, instances: Callable[..., Instance], pg: Engine
) -> None:
    """After the server ends every pooled connection, the next requests open new tunnels."""
    client = instances().client
    assert client.get("/healthz").status_code == 200
    before = len(cloud_sql.proxy.tunnels)

    _terminate(pg)

    assert [client.get("/healthz").status_code for _ in range(4)] == [200] * 4
    assert len(cloud_sql.proxy.tunnels) > before


def test_an_expiring_certificate_is_refreshed_without_a_failed_request(
    cloud_sql: CloudSql, instances: Callable[..., Instance], pg: Engine
) -> None:
    """A certificate near its end is replaced when the next connection is opened; no request
    fails on the way."""
    # The connector renews a certificate within 4 minutes of its end: this one gets there in 2 s.
    cloud_sql.admin.certificate_lifetime = timedelta(minutes=4, seconds=2)
    client = instances().client
    assert client.get("/healthz").status_code == 200
    time.sleep(2.5)

    _terminate(pg)
    statuses = [client.get("/healthz").status_code for _ in range(3)]

    assert statuses == [200] * 3
    first, second = cloud_sql.admin.issued
    assert second.not_after > first.not_after
    assert cloud_sql.proxy.tunnels[-1].serial == second.serial


def test_the_connector_reads_the_password_file_at_each_new_connection(
    cloud_sql: CloudSql,
    instances: Callable[..., Instance],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    pg: Engine,
) -> None:
    """DB_PASS_FILE on the connector path: a wrong password in the file refuses the next new
    connection (a 500, not a 503); the right one back, the next request is served, with no
    restart."""
    secret = tmp_path / "db-pass"
    secret.write_text(PASSWORD + "\n")
    monkeypatch.delenv("DB_PASS")
    monkeypatch.setenv("DB_PASS_FILE", str(secret))
    client = instances().client
    assert client.get("/healthz").status_code == 200

    secret.write_text("not-the-password")
    _terminate(pg)
    refused = client.get("/healthz").status_code
    secret.write_text(PASSWORD)
    served = client.get("/healthz").status_code

    assert (refused, served) == (500, 200)


def test_the_connectors_own_lines_reach_the_log(
    cloud_sql: CloudSql,
    instances: Callable[..., Instance],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A refused certificate request: a 500 with one ERROR line naming the refusal, and the
    connector's own line about its failed refresh reaches the output as a JSON line like the
    service's, though google-auth's token request came first (google-auth cuts an unconfigured
    "google" logger off from the root's handler)."""
    monkeypatch.setenv("LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("LOG_FORMAT", "json")
    client = instances().client
    capsys.readouterr()
    cloud_sql.admin.refuse_certificates = True
    try:
        refused = client.get("/healthz")
    finally:
        cloud_sql.admin.refuse_certificates = False

    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert refused.status_code == 500  # a missing role: retrying will not help
    [refusal] = [line for line in lines if line["severity"] == "ERROR"]
    assert "refuses this service (ClientResponseError: 403" in refusal["message"]
    refresh = [
        line for line in lines
        if line["logger"].startswith("google.cloud.sql.connector")
        and "refresh operation failed" in line["message"]
    ]  # fmt: skip
    assert refresh, sorted({line["logger"] for line in lines})
    assert {"severity", "time", "message"} <= set(refresh[0])


def test_iam_authentication_logs_in_as_the_service_account(
    cloud_sql: CloudSql,
    instances: Callable[..., Instance],
    postgres: PostgresServer,
    pg: Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With DB_IAM_AUTH=true there is no password: the certificate carries the login token and
    the database user is the service account's."""
    with pg.begin() as connection:
        if not connection.scalar(
            text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": IAM_USER}
        ):
            connection.exec_driver_sql(f'CREATE ROLE "{IAM_USER}" LOGIN')
        connection.exec_driver_sql(f'GRANT ALL ON ALL TABLES IN SCHEMA public TO "{IAM_USER}"')
        connection.exec_driver_sql(f'GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO "{IAM_USER}"')
    postgres.trust(IAM_USER)
    monkeypatch.setenv("DB_IAM_AUTH", "true")
    monkeypatch.setenv("DB_USER", cloud_sql.oauth.account)
    monkeypatch.delenv("DB_PASS")

    client = instances().client
    created = client.post("/users", json={"name": "Iam", "email": "iam@example.com"})

    assert created.status_code == 201
    assert {issued.iam_user for issued in cloud_sql.admin.issued} == {IAM_USER}
    assert {tunnel.user for tunnel in cloud_sql.proxy.tunnels} == {IAM_USER}


def test_dispose_closes_the_connector_and_its_tunnels(
    cloud_sql: CloudSql, instances: Callable[..., Instance]
) -> None:
    """Disposing the instance's database closes its connector; the next request builds anew."""
    instance = instances()
    assert instance.client.get("/healthz").status_code == 200
    connector = instance.database._connector

    instance.database.dispose()

    assert connector._closed
    cloud_sql.wait_for_tunnels(0)
    assert instance.client.get("/healthz").status_code == 200
    assert instance.database._connector is not connector


def test_sigterm_closes_the_connector_and_every_connection(
    cloud_sql: CloudSql, pg: Engine, tmp_path: Path
) -> None:
    """functions-framework stopped with SIGTERM exits 0 and leaves no tunnel and no backend."""
    port = free_port()
    log = tmp_path / "server.log"
    env = {**os.environ, "THREADS": "2"}
    with log.open("w") as output:
        server = subprocess.Popen(
            [str(Path(sys.executable).with_name("functions-framework")), "--target=api",
             f"--source={ROOT / 'main.py'}", f"--port={port}"],
            cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        _wait_until_healthy(port, server, log)
        assert cloud_sql.proxy.open_tunnels == 1
        assert _backends(pg) == 1

        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0, log.read_text()[-3000:]
    finally:
        if server.poll() is None:
            server.kill()

    cloud_sql.wait_for_tunnels(0)
    assert _backends(pg) == 0
    assert "database disposed" in log.read_text()


def _wait_until_healthy(port: int, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        assert server.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as reply:
                assert reply.status == 200
                return
        except OSError:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)


def test_no_connector_without_instance_connection_name(
    cloud_sql_stand_in: CloudSql, client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With DATABASE_URL, no connector is built and Google is never asked for anything."""
    for name, value in cloud_sql_stand_in.environment().items():
        monkeypatch.setenv(name, value)
    asked = len(cloud_sql_stand_in.admin.received) + len(cloud_sql_stand_in.oauth.received)

    assert client.post("/users", json={"name": "A", "email": "a@example.com"}).status_code == 201
    assert client.get("/healthz").status_code == 200

    assert sys.modules["main"].database._connector is None
    assert len(cloud_sql_stand_in.admin.received) + len(cloud_sql_stand_in.oauth.received) == asked


@needs_gcloud
def test_migrate_reads_the_password_from_secret_manager_and_migrates_through_the_connector(
    cloud_sql_stand_in: CloudSql, deploy: Deploy, postgres: PostgresServer
) -> None:
    """deploy.sh --migrate: the real gcloud reads the owner's secret, the real connector
    migrates an empty database as the owner, then the functions deploy with their own."""
    admin = create_engine(postgres.url(), poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql("DROP DATABASE IF EXISTS deployed")
        connection.exec_driver_sql("DROP ROLE IF EXISTS deployer")
        connection.exec_driver_sql(
            f"CREATE ROLE deployer LOGIN PASSWORD '{OWNER_SECRET_IN_SECRET_MANAGER}'"
        )
        connection.exec_driver_sql("CREATE DATABASE deployed OWNER deployer")
        # The one-time setup of docs/deploying.md: the owner may not create roles.
        connection.exec_driver_sql(
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'app_runtime')"
            " THEN CREATE ROLE app_runtime NOLOGIN; END IF; END $$"
        )
    admin.dispose()

    result = deploy(
        "--migrate", "health", DB_NAME="deployed", DB_OWNER="deployer", FUNCTIONS="health",
        **cloud_sql_stand_in.environment(),
    )  # fmt: skip

    assert result.returncode == 0, result.stderr[-3000:]
    migrated = create_engine(postgres.url("deployed"), poolclass=NullPool)
    assert {"users", "items", "transfers"} <= set(inspect(migrated).get_table_names())
    migrated.dispose()
    assert OWNER_SECRET_IN_SECRET_MANAGER not in result.stdout + result.stderr
    assert list(deploy.api.functions) == ["health"]
    [secret] = deploy.function("health")["serviceConfig"]["secretVolumes"]
    assert secret["secret"] == "db-pass"  # never the owner's
