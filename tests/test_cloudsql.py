"""The Cloud SQL connector path, end to end, with only Google's network faked.

``FakeConnector`` stands in for ``google.cloud.sql.connector.Connector``: constructing the
real one starts a refresh thread and asks Google for credentials and certificates, which
cannot happen here. Its ``connect()`` opens a real pg8000 connection to the test server
with the arguments the service passed, so everything after the network edge is real.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import pg8000.dbapi
import pytest
from google.cloud.sql.connector import IPTypes
from sqlalchemy import Engine
from sqlalchemy.engine import URL

import db.cloudsql
from tests.conftest import Instance
from tests.postgres import PASSWORD


class FakeConnector:
    """Records how it is built and used; connects to the test PostgreSQL."""

    instances: ClassVar[list[FakeConnector]] = []
    server: ClassVar[URL]

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.connects: list[tuple[str, str, dict[str, Any]]] = []
        self.closed = False
        FakeConnector.instances.append(self)

    def connect(self, instance_connection_name: str, driver: str, **kwargs: Any) -> Any:
        self.connects.append((instance_connection_name, driver, dict(kwargs)))
        assert not self.closed, "connect() after close()"
        # With IAM authentication the real connector supplies a token as the password.
        password = kwargs.pop("password", None) or PASSWORD
        return pg8000.dbapi.connect(
            user=kwargs.pop("user"),
            password=password,
            database=self.server.database,
            host=self.server.host,
            port=self.server.port,
            startup_params=kwargs.pop("startup_params"),
            timeout=kwargs.pop("timeout"),
        )

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake_connector(database_url: URL, monkeypatch: pytest.MonkeyPatch) -> type[FakeConnector]:
    """Replace the Cloud SQL connector class with the stand-in."""
    FakeConnector.instances = []
    FakeConnector.server = database_url
    monkeypatch.setattr(db.cloudsql, "Connector", FakeConnector)
    return FakeConnector


@pytest.fixture
def connector_env(pg: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Configure instances for the connector path instead of DATABASE_URL."""
    monkeypatch.delenv("DATABASE_URL")
    monkeypatch.setenv("INSTANCE_CONNECTION_NAME", "my-project:europe-west1:main")
    monkeypatch.setenv("DB_USER", "postgres")
    monkeypatch.setenv("DB_NAME", "app")
    monkeypatch.setenv("DB_PASS", PASSWORD)
    monkeypatch.setenv("DB_POOL_SIZE", "4")


@pytest.mark.usefixtures("connector_env")
def test_connector_is_built_once_lazily_and_serves_many_threads(
    fake_connector: type[FakeConnector], instances: Callable[..., Instance]
) -> None:
    """One lazy connector per instance, whatever the requests and threads; requests work."""
    instance = instances()
    assert fake_connector.instances == []  # nothing at import

    start = threading.Barrier(16)

    def request(n: int) -> int:
        start.wait()
        body = {"name": "U", "email": f"u{n}@example.com"}
        return int(instance.client.post("/users", json=body).status_code)

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(request, range(16))) == [201] * 16
    assert instance.client.get("/users?limit=100").status_code == 200

    assert len(fake_connector.instances) == 1
    connector = fake_connector.instances[0]
    assert connector.options == {
        "ip_type": IPTypes.PUBLIC,
        "enable_iam_auth": False,
        "refresh_strategy": "lazy",
    }
    assert 1 <= len(connector.connects) <= 4  # the pool, never a connection per request
    name, driver, kwargs = connector.connects[0]
    assert (name, driver) == ("my-project:europe-west1:main", "pg8000")
    assert (kwargs["user"], kwargs["db"], kwargs["password"]) == ("postgres", "app", PASSWORD)


@pytest.mark.usefixtures("connector_env")
def test_private_ip_and_iam_authentication_reach_the_connector(
    fake_connector: type[FakeConnector],
    instances: Callable[..., Instance],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DB_IP_TYPE and DB_IAM_AUTH reach the connector as ip_type and IAM flag; no password."""
    monkeypatch.setenv("DB_IP_TYPE", "PRIVATE")
    monkeypatch.setenv("DB_IAM_AUTH", "true")
    monkeypatch.delenv("DB_PASS")

    assert instances().client.get("/healthz").status_code == 200

    connector = fake_connector.instances[0]
    assert connector.options["ip_type"] is IPTypes.PRIVATE
    assert connector.options["enable_iam_auth"] is True
    _, _, kwargs = connector.connects[0]
    assert "password" not in kwargs
    assert kwargs["ip_type"] is IPTypes.PRIVATE
    assert kwargs["enable_iam_auth"] is True


@pytest.mark.usefixtures("connector_env")
def test_dispose_closes_the_connector(
    fake_connector: type[FakeConnector], instances: Callable[..., Instance]
) -> None:
    """Disposing the instance's database closes its connector; the next request builds anew."""
    instance = instances()
    instance.client.get("/healthz")

    instance.database.dispose()

    assert fake_connector.instances[0].closed
    assert instance.client.get("/healthz").status_code == 200
    assert len(fake_connector.instances) == 2


@pytest.mark.usefixtures("connector_env")
def test_sigterm_disposes_and_then_runs_the_previous_handler(
    fake_connector: type[FakeConnector], instances: Callable[..., Instance]
) -> None:
    """SIGTERM closes the connector, then hands the signal to whoever handled it before."""
    received: list[int] = []
    original = signal.signal(signal.SIGTERM, lambda signum, _frame: received.append(signum))
    try:
        instance = instances()
        instance.client.get("/healthz")
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler)

        handler(signal.SIGTERM, None)

        assert fake_connector.instances[0].closed
        assert received == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, original)


def test_no_connector_without_instance_connection_name(
    fake_connector: type[FakeConnector], client: Any
) -> None:
    """With DATABASE_URL, no connector is ever constructed and no Google credentials are needed."""
    assert client.post("/users", json={"name": "A", "email": "a@example.com"}).status_code == 201
    assert client.get("/healthz").status_code == 200
    assert fake_connector.instances == []
