"""What production does to the service, done to a real PostgreSQL: restarts, killed connections,
an exhausted pool, a database down at start or full, runaway statements, killed and frozen
instances, and sustained mixed traffic, with what each leaves in the logs. Every loop here is
bounded in count and time. Each test runs with the tuned driver and with pg8000 as installed."""

from __future__ import annotations

import contextlib
import json
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pg8000.dbapi
import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL

from db.migrate import upgrade
from dev.postgres import PASSWORD, PostgresServer
from tests.conftest import PROBE, Instance
from tests.serving import ServedProbe, row_is_free_and_unchanged, server_connections, wait_for

pytestmark = pytest.mark.variants("direct", "untuned")


def _untuned(variant: str) -> dict[str, str]:
    return {"DB_DRIVER_TUNING": "false"} if variant == "untuned" else {}


def _log_lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


def _migrated_server(max_connections: int = 200) -> PostgresServer:
    """A new running server whose database ``app`` is migrated."""
    server = PostgresServer(max_connections=max_connections)
    server.init()
    server.start()
    engine = create_engine(server.create_database("app"))
    upgrade(engine)
    engine.dispose()
    return server


@pytest.fixture(scope="module")
def own_server() -> Iterator[PostgresServer]:
    """A server of this module's own, which the tests stop and start."""
    server = _migrated_server()
    yield server
    server.destroy()


@pytest.fixture
def own_db(
    own_server: PostgresServer, monkeypatch: pytest.MonkeyPatch, variant: str
) -> Iterator[Engine]:
    """Instances configured for the module's own server, which is running and empty."""
    for name, value in _untuned(variant).items():
        monkeypatch.setenv(name, value)
    if not (own_server.data / "postmaster.pid").exists():
        own_server.start()
    engine = create_engine(own_server.url("app"), pool_pre_ping=True)
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "TRUNCATE users, items, transfers, idempotency_records, handled_events CASCADE"
        )
    monkeypatch.setenv("DATABASE_URL", own_server.url("app").render_as_string(hide_password=False))
    yield engine
    engine.dispose()


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
    assert server_connections(pg, "fault-terminate") >= 1

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
        wait_for(lambda: server_connections(pg, "fault-pool", "active") == 2, 10)

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


def test_killed_instance_leaves_no_lock_and_no_partial_write(
    pg: Engine, database_url: URL, served_user: int, tmp_path: Path, variant: str
) -> None:
    """SIGKILL while a request holds a row lock and an uncommitted write: both vanish at once."""
    served = ServedProbe(database_url, "fault-killed", tmp_path, **_untuned(variant))
    try:
        served.post_in_background(f"/hold?id={served_user}")
        wait_for(lambda: not row_is_free_and_unchanged(pg, served_user), 15)  # the UPDATE ran

        served.signal(signal.SIGKILL)
        served.process.wait(timeout=30)

        wait_for(lambda: server_connections(pg, "fault-killed") == 0, 10)
        assert row_is_free_and_unchanged(pg, served_user)
    finally:
        served.stop()


def test_frozen_instance_is_cut_off_by_idle_in_transaction_timeout(
    pg: Engine, database_url: URL, served_user: int, tmp_path: Path, variant: str
) -> None:
    """A frozen (SIGSTOP) instance inside a transaction loses its session after the idle timeout."""
    served = ServedProbe(
        database_url, "fault-frozen", tmp_path, DB_IDLE_IN_TRANSACTION_TIMEOUT="1",
        **_untuned(variant),
    )  # fmt: skip
    try:
        served.post_in_background(f"/hold?id={served_user}")
        wait_for(lambda: not row_is_free_and_unchanged(pg, served_user), 15)  # the UPDATE ran

        served.signal(signal.SIGSTOP)

        wait_for(lambda: server_connections(pg, "fault-frozen") == 0, 10)
        assert row_is_free_and_unchanged(pg, served_user)
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
            peak[0] = max(peak[0], server_connections(pg, "fault-sustained"))
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
    assert server_connections(pg, "fault-sustained", "idle in transaction") == 0


def test_a_dropped_connection_is_one_warning_line(
    pg: Engine,
    instances: Callable[..., Instance],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every pooled connection ended by the server: requests succeed, and the logs hold one
    WARNING line for it, with no ERROR and no traceback."""
    monkeypatch.setenv("K_SERVICE", "fault-dropped")
    monkeypatch.setenv("LOG_FORMAT", "json")
    monkeypatch.setenv("DB_POOL_SIZE", "3")
    client = instances().client
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda _: client.get("/users").status_code, range(9)))
    with pg.connect() as connection:
        connection.execute(
            text("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
                 " WHERE application_name = 'fault-dropped'")
        )  # fmt: skip
    capsys.readouterr()

    assert [client.get("/users").status_code for _ in range(6)] == [200] * 6

    lines = [line for line in _log_lines(capsys) if line["logger"] != "web.http"]
    assert [(line["severity"], line["logger"]) for line in lines] == [("WARNING", "db.outage")]
    assert lines[0]["message"].startswith("database connection failed: a connection was lost")
    assert "stack_trace" not in lines[0]


def test_an_outage_logs_where_it_starts_and_where_it_ends(
    own_server: PostgresServer,
    own_db: Engine,
    instances: Callable[..., Instance],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """PostgreSQL down for a while: its first failure at WARNING with the cause, then one line
    counting them once it is back; between them only the requests' own lines."""
    monkeypatch.setenv("LOG_FORMAT", "json")
    monkeypatch.setenv("DB_POOL_TIMEOUT", "1")
    client = instances().client
    assert client.get("/users").status_code == 200
    own_server.stop("fast")
    capsys.readouterr()

    down = [client.get("/users").status_code for _ in range(5)]
    own_server.start()
    time.sleep(1.1)  # the quiet second after which a success ends the outage
    up = [client.get("/users").status_code for _ in range(3)]

    assert (down, up) == ([503] * 5, [200] * 3)
    lines = [line for line in _log_lines(capsys) if line["logger"] != "web.http"]
    assert [line["severity"] for line in lines] == ["WARNING", "WARNING"]
    assert lines[0]["message"].startswith("database connection failed: ")
    assert "reachable again after" in lines[1]["message"]
    assert int(lines[1]["message"].split("after ")[1].split()[0]) >= 5


@pytest.fixture(scope="module")
def crowded_server() -> Iterator[PostgresServer]:
    """A server that takes 12 connections at most."""
    server = _migrated_server(max_connections=12)
    yield server
    server.destroy()


def _on_crowded_server(
    server: PostgresServer, monkeypatch: pytest.MonkeyPatch, variant: str, pool_size: int
) -> None:
    """Instances started next use ``server``, ``pool_size`` connections each, waiting 1 s."""
    monkeypatch.setenv("DATABASE_URL", server.url("app").render_as_string(hide_password=False))
    monkeypatch.setenv("DB_POOL_SIZE", str(pool_size))
    monkeypatch.setenv("DB_POOL_TIMEOUT", "1")
    for name, value in _untuned(variant).items():
        monkeypatch.setenv(name, value)


def _fill(server: PostgresServer) -> list[pg8000.dbapi.Connection]:
    """Take every connection the server has left: any new one is refused."""
    taken: list[pg8000.dbapi.Connection] = []
    with contextlib.suppress(pg8000.dbapi.DatabaseError):
        while len(taken) < 20:
            taken.append(
                pg8000.dbapi.connect(user="postgres", password=PASSWORD, host="127.0.0.1",
                                     port=server.port, database="app")
            )  # fmt: skip
    return taken


def test_an_instance_serves_again_once_a_full_server_frees_connections(
    crowded_server: PostgresServer,
    instances: Callable[..., Instance],
    monkeypatch: pytest.MonkeyPatch,
    variant: str,
) -> None:
    """Every connection taken by someone else: a prompt 503 each; freed: every request is
    served again within a few seconds, without a restart."""
    _on_crowded_server(crowded_server, monkeypatch, variant, pool_size=4)
    client = instances().client
    assert client.get("/users").status_code == 200
    others = _fill(crowded_server)

    def timed(_: int) -> tuple[int, str | None, float]:
        began = time.perf_counter()
        response = client.get("/users")
        return (
            response.status_code,
            response.headers.get("Retry-After"),
            time.perf_counter() - began,
        )

    try:
        with ThreadPoolExecutor(4) as pool:
            full = list(pool.map(timed, range(12)))
    finally:
        for connection in others:
            connection.close()
    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        freed = list(pool.map(lambda _: client.get("/users").status_code, range(40)))

    assert {status for status, _, _ in full} <= {200, 503}
    assert 503 in {status for status, _, _ in full}
    assert all(retry for status, retry, _ in full if status == 503)
    assert max(seconds for _, _, seconds in full) < 1 + 1  # DB_POOL_TIMEOUT, plus slack
    assert freed == [200] * 40
    assert time.monotonic() - started < 5


def test_instances_at_the_connection_limit_serve_from_the_connections_they_hold(
    crowded_server: PostgresServer,
    instances: Callable[..., Instance],
    monkeypatch: pytest.MonkeyPatch,
    variant: str,
) -> None:
    """Two instances on a full server, each holding 4 idle connections and 4 pool entries whose
    connections were lost: 10 sequential reads each are all served from the 4, and no new
    connection is tried while one sits idle. One more read than connections waits, then a quick
    503."""
    _on_crowded_server(crowded_server, monkeypatch, variant, pool_size=8)
    fleet = [instances(), instances()]
    email = f"{variant}-limit@x.io"
    user = fleet[0].client.post("/users", json={"name": "A", "email": email}).json["id"]
    for instance in fleet:
        entries = [instance.database.engine.pool.connect() for _ in range(8)]
        for lost in entries[:4]:
            lost.invalidate()  # as a dropped connection is: its entry goes back empty
        for kept in entries[4:]:
            kept.close()
    others = _fill(crowded_server)

    try:
        reads: dict[int, list[int]] = {}
        for number, instance in enumerate(fleet):
            reads[number] = []
            for _ in range(10):
                reads[number].append(instance.client.get(f"/users/{user}").status_code)
                time.sleep(0.1)
        began = time.perf_counter()
        with ThreadPoolExecutor(5) as threads:
            crowd = list(threads.map(lambda _: fleet[0].client.get(f"/users/{user}"), range(5)))
        crowded = time.perf_counter() - began
    finally:
        for connection in others:
            connection.close()

    assert reads == {0: [200] * 10, 1: [200] * 10}
    held = [instance.database.engine.pool.checkedin() for instance in fleet]  # type: ignore[attr-defined]
    assert held == [4, 4]
    assert sorted(answer.status_code for answer in crowd)[:4] == [200] * 4
    assert crowded < 1 + 1  # DB_POOL_TIMEOUT, plus slack: nothing hangs
