"""Rotating the database password of running instances, without a redeploy or a restart.

The password comes from a file (``DB_PASS_FILE``: on Cloud Run, a Secret Manager secret
mounted as a file, read anew at each access), read whenever a connection is opened.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

from db.roles import DEFAULT_RUNTIME_ROLE, add_runtime_user
from tests.conftest import Instance
from tests.serving import server_connections

USER = "rotating"
OLD, NEW = "rotation-old-password-1", "rotation-new-password-2"


@pytest.fixture
def rotating_user(pg: Engine, database_url: URL) -> Iterator[URL]:
    """A login user of the runtime role, with the old password; its URL without a password."""
    with pg.begin() as connection:
        add_runtime_user(connection, USER, OLD, DEFAULT_RUNTIME_ROLE)
    yield database_url.set(username=USER, password=None)
    with pg.begin() as connection:
        connection.execute(
            text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = :u"),
            {"u": USER},
        )


@pytest.mark.variants("direct", "untuned")
def test_a_rotated_password_is_used_by_running_instances(
    pg: Engine,
    rotating_user: URL,
    instances: Callable[..., Instance],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    variant: str,
) -> None:
    """Under steady reads: a new value in the file, the server's password changed, the old
    connections killed. Every request still succeeds (those that met a killed connection were
    retried), new connections log in with the new password, and the instance never restarted."""
    secret = tmp_path / "db-pass"
    secret.write_text(OLD + "\n")
    monkeypatch.setenv("DATABASE_URL", rotating_user.render_as_string(hide_password=False))
    monkeypatch.setenv("DB_PASS_FILE", str(secret))
    monkeypatch.setenv("K_SERVICE", "rotation-check")
    monkeypatch.setenv("DB_POOL_SIZE", "4")
    instance = instances()
    user = instance.client.post("/users", json={"name": "A", "email": "a@x.io"}).json["id"]
    statuses: Counter[int] = Counter()
    stop = threading.Event()

    def reads() -> None:
        while not stop.is_set():
            statuses[instance.client.get(f"/users/{user}").status_code] += 1

    readers = [threading.Thread(target=reads) for _ in range(4)]
    for reader in readers:
        reader.start()
    time.sleep(0.5)
    new_version = tmp_path / "db-pass.new"
    new_version.write_text(NEW + "\n")
    new_version.replace(secret)  # a new version of the mounted secret, seen whole or not at all
    with pg.begin() as connection:
        connection.exec_driver_sql(f"ALTER ROLE {USER} PASSWORD '{NEW}'")
    # Killed only once the new password is committed: a connection killed before would
    # reconnect while the server still expects the old one.
    with pg.begin() as connection:
        killed = connection.scalar(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = :u"
            ),
            {"u": USER},
        )
    time.sleep(1)
    stop.set()
    for reader in readers:
        reader.join()
    written = instance.client.post("/users", json={"name": "B", "email": "b@x.io"})

    assert killed >= 1
    assert set(statuses) == {200}, statuses
    assert statuses[200] > 20
    assert written.status_code == 201
    assert server_connections(pg, "rotation-check") >= 1  # logged in again, with NEW
    assert instance.database.is_built  # the same engine throughout: no restart
