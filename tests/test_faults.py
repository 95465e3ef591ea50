"""What production does to the service, done to a real PostgreSQL: restarts, killed connections,
an exhausted pool, a database down at start, runaway statements, killed and frozen instances,
and sustained mixed traffic. Every loop here is bounded in count and time."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL

from db.migrate import upgrade
from dev.postgres import PostgresServer, free_port
from tests.conftest import PROBE, ROOT, Instance


@pytest.fixture(scope="module")
def own_server() -> Iterator[PostgresServer]:
    """A server of this module's own, which the tests stop and start."""
    server = PostgresServer()
    server.init()
    server.start()
    admin = create_engine(server.url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql("CREATE DATABASE app")
    admin.dispose()
    engine = create_engine(server.url("app"))
    upgrade(engine)
    engine.dispose()
    yield server
    server.destroy()


@pytest.fixture
def own_db(own_server: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    """Instances configured for the module's own server, which is running and empty."""
    if not (own_server.data / "postmaster.pid").exists():
        own_server.start()
    engine = create_engine(own_server.url("app"), pool_pre_ping=True)
    with engine.begin() as connection:
        connection.exec_driver_sql("TRUNCATE users, items, transfers, idempotency_records CASCADE")
    monkeypatch.setenv("DATABASE_URL", own_server.url("app").render_as_string(hide_password=False))
    yield engine
    engine.dispose()


def _server_connections(engine: Engine, name: str, state: str | None = None) -> int:
    query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = :name"
    if state is not None:
        query += " AND state = :state"
    with engine.connect() as connection:
        return int(connection.scalar(text(query), {"name": name, "state": state}) or 0)


def _wait_for(condition: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def test_restart_during_traffic_gives_fast_503_then_serves_again(
    own_server: PostgresServer,
    own_db: Engine,
    instances: Callable[..., Instance],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While PostgreSQL restarts, requests get 503 with Retry-After, never a hang; then 200."""
    monkeypatch.setenv("DB_POOL_TIMEOUT", "1")
    monkeypatch.setenv("DB_POOL_SIZE", "4")
    client = instances().client
    user = client.post("/users", json={"name": "A", "email": "a@x.io"}).json["id"]
    results: list[tuple[int, float, Any]] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set() and len(results) < 20_000:
            started = time.perf_counter()
            response = client.get(f"/users/{user}")
            results.append(
                (
                    response.status_code,
                    time.perf_counter() - started,
                    response.headers.get("Retry-After"),
                )
            )
            time.sleep(0.005)

    workers = [threading.Thread(target=traffic) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        time.sleep(0.3)
        own_server.stop("fast")
        time.sleep(1.0)
        own_server.start()
        served_again = len(results)
        time.sleep(1.0)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=30)

    statuses = Counter(status for status, _, _ in results)
    assert set(statuses) <= {200, 503}
    assert statuses[503] > 0
    assert all(retry for status, _, retry in results if status == 503)
    assert max(elapsed for _, elapsed, _ in results) < 1 + 2  # DB_POOL_TIMEOUT, plus slack
    after = [status for status, _, _ in results[served_again + 40 :]]
    assert after
    assert set(after) == {200}


def test_connections_killed_between_requests_are_replaced_unseen(
    pg: Engine, instances: Callable[..., Instance], monkeypatch: pytest.MonkeyPatch
) -> None:
    """pg_terminate_backend on every pooled connection: the next requests still succeed."""
    monkeypatch.setenv("K_SERVICE", "fault-terminate")
    monkeypatch.setenv("DB_POOL_SIZE", "3")
    client = instances().client
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda _: client.get("/users").status_code, range(9)))
    assert _server_connections(pg, "fault-terminate") >= 1

    with pg.connect() as connection:
        connection.execute(
            text(
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
                " WHERE application_name = :n"
            ),
            {"n": "fault-terminate"},
        )

    assert [client.get("/users").status_code for _ in range(6)] == [200] * 6


def test_exhausted_pool_answers_a_fast_503_and_recovers(
    pg: Engine, instances: Callable[..., Instance], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both connections held by slow requests: a third gets 503 after DB_POOL_TIMEOUT; then 200."""
    monkeypatch.setenv("K_SERVICE", "fault-pool")
    monkeypatch.setenv("DB_POOL_SIZE", "2")
    monkeypatch.setenv("DB_POOL_TIMEOUT", "0.5")
    client = instances("probe", PROBE).client
    with ThreadPoolExecutor(2) as pool:
        slow = [pool.submit(client.post, "/sleep?seconds=2") for _ in range(2)]
        _wait_for(lambda: _server_connections(pg, "fault-pool", "active") == 2, 10)

        started = time.perf_counter()
        refused = client.get("/users")
        elapsed = time.perf_counter() - started

        assert [future.result().status_code for future in slow] == [200, 200]
    assert refused.status_code == 503
    assert refused.headers["Retry-After"]
    assert 0.4 < elapsed < 1.5
    assert client.get("/users").status_code == 200


def test_database_down_at_start_then_up(
    own_server: PostgresServer,
    own_db: Engine,
    instances: Callable[..., Instance],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An instance started while PostgreSQL is down starts, reports 503, then 200 once it is up."""
    monkeypatch.setenv("DB_POOL_TIMEOUT", "1")
    own_db.dispose()
    own_server.stop("fast")

    client = instances("health").client
    down = client.get("/healthz")
    own_server.start()
    up = client.get("/healthz")

    assert down.status_code == 503
    assert down.json["error"]["code"] == "service_unavailable"
    assert up.status_code == 200


def test_runaway_statement_is_cut_off_by_statement_timeout(
    pg: Engine, instances: Callable[..., Instance], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A statement over DB_STATEMENT_TIMEOUT is cancelled: a prompt 503; the next request works."""
    monkeypatch.setenv("DB_STATEMENT_TIMEOUT", "0.5")
    probe = instances("probe", PROBE)

    started = time.perf_counter()
    response = probe.client.post("/sleep?seconds=30")
    elapsed = time.perf_counter() - started

    assert response.status_code == 503
    assert response.json["error"]["code"] == "service_unavailable"
    assert elapsed < 3
    assert probe.database.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert probe.client.get("/users").status_code == 200


class ServedProbe:
    """The probe app served by functions-framework in its own process, to be killed or frozen."""

    def __init__(self, url: URL, name: str, tmp_path: Path, **env: str) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [str(Path(sys.executable).with_name("functions-framework")), "--target=probe",
             f"--source={PROBE}", f"--port={self.port}"],
            cwd=tmp_path,
            env={**os.environ, "DATABASE_URL": url.render_as_string(hide_password=False),
                 "K_SERVICE": name, "THREADS": "2", "PYTHONPATH": str(ROOT), **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # gunicorn's master and its worker form one process group
        )  # fmt: skip
        _wait_for(self._listening, 30)

    def _listening(self) -> bool:
        assert self.process.poll() is None
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def post_in_background(self, path: str) -> None:
        def send() -> None:
            with socket.create_connection(("127.0.0.1", self.port), timeout=60) as conn:
                conn.sendall(
                    f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode()
                )
                with contextlib.suppress(OSError):
                    conn.recv(1024)

        threading.Thread(target=send, daemon=True).start()

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the server and its worker alike, as a host stopping would."""
        os.killpg(self.process.pid, signum)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGKILL)
        self.process.wait(timeout=30)


@pytest.fixture
def served_user(pg: Engine) -> int:
    """A user whose row the served instance will lock and change."""
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


def _row_is_free_and_unchanged(pg: Engine, user: int) -> bool:
    with pg.begin() as connection:
        connection.execute(text("SET LOCAL lock_timeout = '200ms'"))
        try:
            balance = connection.scalar(
                text("SELECT balance FROM users WHERE id = :id FOR UPDATE"), {"id": user}
            )
        except Exception:  # noqa: BLE001  # the row is still locked: not yet
            return False
    return bool(balance == 10)


def test_killed_instance_leaves_no_lock_and_no_partial_write(
    pg: Engine, database_url: URL, served_user: int, tmp_path: Path
) -> None:
    """SIGKILL while a request holds a row lock and an uncommitted write: both vanish at once."""
    served = ServedProbe(database_url, "fault-killed", tmp_path)
    try:
        served.post_in_background(f"/hold?id={served_user}")
        _wait_for(lambda: _server_connections(pg, "fault-killed", "idle in transaction") == 1, 15)

        served.signal(signal.SIGKILL)
        served.process.wait(timeout=30)

        _wait_for(lambda: _server_connections(pg, "fault-killed") == 0, 10)
        assert _row_is_free_and_unchanged(pg, served_user)
    finally:
        served.stop()


def test_frozen_instance_is_cut_off_by_idle_in_transaction_timeout(
    pg: Engine, database_url: URL, served_user: int, tmp_path: Path
) -> None:
    """A frozen (SIGSTOP) instance inside a transaction loses its session after the idle timeout."""
    served = ServedProbe(database_url, "fault-frozen", tmp_path, DB_IDLE_IN_TRANSACTION_TIMEOUT="1")
    try:
        served.post_in_background(f"/hold?id={served_user}")
        _wait_for(lambda: _server_connections(pg, "fault-frozen", "idle in transaction") == 1, 15)

        served.signal(signal.SIGSTOP)

        _wait_for(lambda: _server_connections(pg, "fault-frozen") == 0, 10)
        assert _row_is_free_and_unchanged(pg, served_user)
    finally:
        served.stop()


def test_sustained_mixed_traffic_stays_within_the_pool(
    pg: Engine, instances: Callable[..., Instance], monkeypatch: pytest.MonkeyPatch
) -> None:
    """16 threads of mixed reads and writes: no 5xx, never more connections than pool + overflow,
    and no connection left idle in transaction."""
    monkeypatch.setenv("K_SERVICE", "fault-sustained")
    monkeypatch.setenv("DB_POOL_SIZE", "6")
    monkeypatch.setenv("DB_MAX_OVERFLOW", "2")
    client = instances().client
    body = {"name": "U", "balance": 10_000}
    users = [
        client.post("/users", json={**body, "email": f"u{i}@x.io"}).json["id"] for i in range(8)
    ]
    stop = threading.Event()
    peak = [0]

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _server_connections(pg, "fault-sustained"))
            time.sleep(0.02)

    def traffic(seed: int) -> Counter[int]:
        rng = random.Random(seed)
        statuses: Counter[int] = Counter()
        deadline = time.monotonic() + 4
        for n in range(2_000):
            if time.monotonic() > deadline:
                break
            choice = rng.random()
            if choice < 0.4:
                response = client.get(f"/users/{rng.choice(users)}")
            elif choice < 0.55:
                response = client.get(f"/transfers?user_id={rng.choice(users)}&limit=20")
            elif choice < 0.75:
                sender, receiver = rng.sample(users, 2)
                body = {
                    "from_user_id": sender,
                    "to_user_id": receiver,
                    "amount": rng.randint(1, 50),
                }
                response = client.post("/transfers", json=body)
            elif choice < 0.9:
                body = {"items": [{"owner_id": rng.choice(users), "name": "x", "quantity": 1}] * 20}
                response = client.post("/items", json=body)
            else:
                response = client.post("/users", json={"name": "N", "email": f"n{seed}-{n}@x.io"})
            statuses[response.status_code] += 1
        return statuses

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(16) as pool:
            statuses = sum(pool.map(traffic, range(16)), Counter[int]())
    finally:
        stop.set()
        watcher.join(timeout=10)

    assert sum(statuses.values()) > 500
    assert not [status for status in statuses if status >= 500], statuses
    assert 1 <= peak[0] <= 6 + 2
    assert _server_connections(pg, "fault-sustained", "idle in transaction") == 0
