"""How connections are opened and used: TCP_NODELAY, one SSL context per engine, few round trips."""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pg8000.core
import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy.engine import URL

import db.engine
from db import driver
from db.config import ConfigError, load_settings
from dev.round_trips import counting_round_trips
from tests.conftest import PROBE, Instance


def _returned_by(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[Any]:
    """Every value ``owner.name`` returns from now on, in order."""
    returned: list[Any] = []
    real = getattr(owner, name)

    def recording(*args: Any, **kwargs: Any) -> Any:
        returned.append(real(*args, **kwargs))
        return returned[-1]

    monkeypatch.setattr(owner, name, recording)
    return returned


@pytest.fixture
def contexts_built(monkeypatch: pytest.MonkeyPatch) -> list[ssl.SSLContext]:
    """Every SSL context built, directly or through ssl.create_default_context (pg8000's way)."""
    built: list[ssl.SSLContext] = []
    new = ssl.SSLContext.__new__

    def recording(cls: type[ssl.SSLContext], *args: Any, **kwargs: Any) -> ssl.SSLContext:
        built.append(new(cls, *args, **kwargs))
        return built[-1]

    monkeypatch.setattr(ssl.SSLContext, "__new__", staticmethod(recording))
    return built


def _open_connections(instance: Instance, count: int) -> list[Any]:
    connections = [instance.database.engine.connect() for _ in range(count)]
    sockets = [c.connection.dbapi_connection._usock for c in connections]  # type: ignore[union-attr]
    for connection in connections:
        connection.close()
    return sockets


def test_every_connection_sends_without_nagle_delay(
    pg: Engine, instances: Callable[..., Instance]
) -> None:
    """TCP_NODELAY is set on each pooled connection's socket."""
    for sock in _open_connections(instances(), 3):
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_ssl_context_is_built_once_per_engine_not_per_connect(
    pg: Engine, instances: Callable[..., Instance], contexts_built: list[ssl.SSLContext]
) -> None:
    """Five connections build one SSL context; after the server refused TLS once, none is asked."""
    instance = instances()

    _open_connections(instance, 5)

    assert len(contexts_built) == 1
    assert instance.client.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    ("mode", "verified", "hostname_checked"),
    [
        ("allow", False, False),
        ("prefer", False, False),
        ("require", False, False),
        ("verify-ca", True, False),
        ("verify-full", True, True),
    ],
)
def test_only_the_verifying_sslmodes_load_the_ca_bundle(
    mode: str, verified: bool, hostname_checked: bool, contexts_built: list[ssl.SSLContext]
) -> None:
    """A mode that checks no certificate skips loading the CA bundle (about 30 ms of a cold
    start); verify-ca and verify-full load it and require a valid certificate."""
    loaded: list[ssl.SSLContext] = []
    load_default_certs = ssl.SSLContext.load_default_certs

    def recording(context: ssl.SSLContext, *args: Any) -> None:
        loaded.append(context)
        load_default_certs(context, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ssl.SSLContext, "load_default_certs", recording)
        context = db.engine._TlsNegotiation(mode).context

    assert isinstance(context, ssl.SSLContext)
    assert contexts_built == [context]
    assert loaded == ([context] if verified else [])
    assert context.verify_mode == (ssl.CERT_REQUIRED if verified else ssl.CERT_NONE)
    assert context.check_hostname is hostname_checked


def test_sslmode_disable_builds_no_context(
    instances: Callable[..., Instance],
    database_url: URL,
    contexts_built: list[ssl.SSLContext],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """?sslmode=disable connects in plaintext without building any SSL context."""
    url = database_url.update_query_dict({"sslmode": "disable"})
    monkeypatch.setenv("DATABASE_URL", url.render_as_string(hide_password=False))

    instance = instances()
    _open_connections(instance, 2)

    assert contexts_built == []


def test_sslmode_require_refuses_a_server_without_tls(
    instances: Callable[..., Instance], database_url: URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    """?sslmode=require never falls back to plaintext: the health check says 503."""
    url = database_url.update_query_dict({"sslmode": "require"})
    monkeypatch.setenv("DATABASE_URL", url.render_as_string(hide_password=False))
    monkeypatch.setenv("DB_POOL_TIMEOUT", "1")

    assert instances().client.get("/healthz").status_code == 503


@pytest.fixture
def resetting_server() -> Iterator[int]:
    """A port whose server resets every connection as soon as the TLS request arrives, as a
    PostgreSQL that is going down does."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(8)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    listener.close()


def test_a_connect_the_server_resets_closes_its_socket_at_once(
    instances: Callable[..., Instance],
    database_url: URL,
    resetting_server: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server that resets the connection during the TLS request: a 503, and every socket the
    attempts opened is closed then, not left to the garbage collector."""
    opened: list[socket.socket] = _returned_by(monkeypatch, socket, "create_connection")
    url = database_url.set(port=resetting_server)
    monkeypatch.setenv("DATABASE_URL", url.render_as_string(hide_password=False))

    assert instances().client.get("/users").status_code == 503
    assert opened
    assert [sock.fileno() for sock in opened] == [-1] * len(opened)


@pytest.mark.parametrize(
    "mode", ["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
)
def test_sslmode_is_read_from_the_url_and_removed_from_it(mode: str) -> None:
    """sslmode is taken out of DATABASE_URL (pg8000 has no such argument) and kept."""
    settings = load_settings({"DATABASE_URL": f"postgresql://u:p@db/app?sslmode={mode}"})
    assert settings.ssl_mode == mode
    assert "sslmode" not in settings.url.query


def test_unknown_sslmode_is_a_configuration_error() -> None:
    """A misspelt sslmode names DATABASE_URL, without echoing it."""
    with pytest.raises(ConfigError, match="DATABASE_URL's sslmode"):
        load_settings({"DATABASE_URL": "postgresql://u:secret@db/app?sslmode=on"})


@pytest.mark.parametrize(
    "query",
    [
        "SELECT users.id FROM users WHERE users.id = %s AND users.email = %s",
        "SELECT '%%s' || %s, \"col%%\" FROM t WHERE a LIKE 'x%%'",
        "INSERT INTO items (owner_id, name) VALUES (%s, %s), (%s, %s) RETURNING id",
        "SELECT $$ %s $$, %s -- a comment with %s\n",
    ],
)
def test_cached_placeholder_conversion_matches_pg8000(query: str) -> None:
    """The cached conversion gives exactly pg8000's statement, and the values unchanged."""
    args = ("a", "b", "c", "d")
    expected = driver._convert_paramstyle("format", query, args)

    tuned = driver._CACHED_FORMAT
    assert driver._dispatch_convert_paramstyle(tuned, query, args) == expected
    assert driver._dispatch_convert_paramstyle(tuned, query, args) == expected  # from the cache


def test_repeated_statements_reuse_their_converted_text(
    pg: Engine, instances: Callable[..., Instance]
) -> None:
    """Serving the same read twice converts its SQL text once: the second is a cache hit."""
    client = instances().client
    user = client.post("/users", json={"name": "A", "email": "a@example.com"}).json["id"]
    client.get(f"/users/{user}")
    hits = driver._converted.cache_info().hits

    client.get(f"/users/{user}")

    assert driver._converted.cache_info().hits == hits + 1


def test_timestamps_parse_fast_and_fall_back_for_what_isoformat_cannot_read() -> None:
    """PostgreSQL's timestamptz text becomes an aware datetime; 'infinity' keeps pg8000's answer."""
    parsed = driver._timestamptz("2026-11-22 14:34:00.727387+00")
    assert parsed == datetime(2026, 11, 22, 14, 34, 0, 727387, tzinfo=UTC)
    assert driver._timestamptz("infinity") == "infinity"


def test_a_read_waits_for_one_round_trip_and_a_write_for_two(
    pg: Engine, instances: Callable[..., Instance]
) -> None:
    """A write: BEGIN, its settings and the statement in one write, then COMMIT. A read: the
    same two writes, but its COMMIT (of a read-only transaction) is not waited for."""
    client = instances().client
    user = client.post("/users", json={"name": "A", "email": "a@example.com"}).json["id"]

    with counting_round_trips() as read:
        assert client.get(f"/users/{user}").status_code == 200
    with counting_round_trips() as write:
        assert client.post("/users", json={"name": "B", "email": "b@x.io"}).status_code == 201

    assert read == {"writes": 2, "round_trips": 1}
    assert write == {"writes": 2, "round_trips": 2}


@contextlib.contextmanager
def pooled_connection(instance: Instance) -> Iterator[Any]:
    """One of the instance's own pg8000 connections, tuned as the service's are."""
    with instance.database.engine.connect() as connection:
        raw = connection.connection.dbapi_connection
        assert raw is not None
        yield raw


def test_row_descriptions_are_decoded_once_and_follow_a_new_conversion(
    pg: Engine, instances: Callable[..., Instance]
) -> None:
    """The same statement's row description is decoded once per connection; registering
    another conversion for a type takes effect on the next statement all the same."""
    with pooled_connection(instances()) as raw:
        cursor = raw.cursor()
        known = len(raw.tuned.row_descriptions)
        for _ in range(3):
            cursor.execute("SELECT %s::int4 AS answer", (42,))
            assert cursor.fetchall() == ([42],)
        assert len(raw.tuned.row_descriptions) == known + 1

        raw.register_in_adapter(23, lambda text: f"int4 {text}")  # 23: int4
        cursor.execute("SELECT %s::int4 AS answer", (42,))
        assert cursor.fetchall() == (["int4 42"],)
        raw.rollback()


def test_executemany_sends_every_parameter_set_in_one_round_trip(
    pg: Engine, instances: Callable[..., Instance]
) -> None:
    """The ORM updates a transfer's two balances with one executemany: one round trip, and
    the row count of all its statements, as pg8000 counts it."""
    instance = instances()
    client = instance.client
    ids = [client.post("/users", json={"name": n, "email": f"{n}@x.io"}).json["id"] for n in "abc"]
    with pooled_connection(instance) as raw:
        cursor = raw.cursor()
        cursor.execute("SELECT 1 WHERE 1 = %s", (1,))  # the transaction has begun
        with counting_round_trips() as counts:
            cursor.executemany(
                "UPDATE users SET balance = %s WHERE id = %s",
                [(7, ids[0]), (8, ids[1]), (9, ids[2])],
            )
        assert cursor.rowcount == 3
        raw.commit()

    assert counts == {"writes": 1, "round_trips": 1}
    assert [client.get(f"/users/{i}").json["balance"] for i in ids] == [7, 8, 9]


def test_executemany_sends_large_batches_in_bounded_groups(
    pg: Engine, instances: Callable[..., Instance]
) -> None:
    """Answers are read after each group of SETS_PER_WRITE sets, so they never pile up in the
    socket's buffers; the row count is that of every set."""
    instance = instances()
    user = instance.client.post("/users", json={"name": "A", "email": "a@x.io"}).json["id"]
    per_write = driver._Cursor.SETS_PER_WRITE
    sets = [(balance, user) for balance in range(2 * per_write + 1)]
    with pooled_connection(instance) as raw:
        cursor = raw.cursor()
        cursor.execute("SELECT 1 WHERE 1 = %s", (1,))  # the transaction has begun
        with counting_round_trips() as counts:
            cursor.executemany("UPDATE users SET balance = %s WHERE id = %s", sets)
        assert cursor.rowcount == len(sets)
        raw.commit()

    assert counts == {"writes": 3, "round_trips": 3}
    assert instance.client.get(f"/users/{user}").json["balance"] == 2 * per_write


def test_executemany_stops_at_the_first_failing_set_and_keeps_the_connection_in_step(
    pg: Engine, instances: Callable[..., Instance]
) -> None:
    """A failing set raises; the transaction applies none of the sets; the connection works."""
    instance = instances()
    user = instance.client.post("/users", json={"name": "A", "email": "a@x.io"}).json["id"]
    with pooled_connection(instance) as raw:
        cursor = raw.cursor()
        with pytest.raises(pg8000.dbapi.DatabaseError):
            cursor.executemany(
                "UPDATE users SET balance = %s WHERE id = %s", [(5, user), (-1, user), (6, user)]
            )
        raw.rollback()
        cursor.execute("SELECT balance FROM users WHERE id = %s", (user,))
        assert cursor.fetchall() == ([0],)
        raw.rollback()


@pytest.mark.parametrize(
    ("statement", "params"),
    [
        ("SELEC 1 WHERE 1 = %s", (1,)),  # refused at Parse
        ("SELECT 1 WHERE 1 = %s::int", ("not a number",)),  # refused at Bind
        ("SELECT 2147483647::int4 + %s::int4", (1,)),  # refused at Execute
    ],
)
def test_statement_refused_at_any_protocol_step_leaves_the_connection_in_step(
    pg: Engine, instances: Callable[..., Instance], statement: str, params: tuple[object, ...]
) -> None:
    """After an error from any message of the one-write statement, the same connection works."""
    with pooled_connection(instances()) as raw:
        cursor = raw.cursor()
        with pytest.raises(pg8000.dbapi.DatabaseError):
            cursor.execute(statement, params)
        raw.rollback()

        cursor.execute("SELECT %s::int + 1", (41,))
        assert cursor.fetchall() == ([42],)


@pytest.mark.parametrize(
    ("statement", "applied"),
    [("UPDATE users SET name = $1 WHERE id = 1", True), ("UPDATE users SET nam = $1", False)],
)
def test_a_statement_sent_unwaited_is_one_write_read_with_the_next_answer(
    pg: Engine, instances: Callable[..., Instance], statement: str, applied: bool
) -> None:
    """``send_unwaited`` writes once and waits for nothing; the next statement on the
    connection reads its answer first, and goes on in step whether it was applied or refused."""
    instance = instances()
    instance.client.post("/users", json={"name": "A", "email": "a@x.io"})
    with pooled_connection(instance) as raw:
        with counting_round_trips() as counts:
            raw.tuned.send_unwaited(statement, ("renamed",))
        assert counts == {"writes": 1, "round_trips": 0}
        assert raw.tuned.unread_answers == 1

        cursor = raw.cursor()
        cursor.execute("SELECT name FROM users WHERE id = %s", (1,))
        assert cursor.fetchall() == (["renamed" if applied else "A"],)
        assert raw.tuned.unread_answers == 0
        raw.rollback()


def test_a_statement_is_not_sent_unwaited_inside_a_transaction(
    pg: Engine, instances: Callable[..., Instance]
) -> None:
    """Its own transaction is the point: inside another it would share that one's fate."""
    with pooled_connection(instances()) as raw:
        raw.cursor().execute("SELECT 1 WHERE 1 = %s", (1,))
        with pytest.raises(RuntimeError, match="between transactions"):
            raw.tuned.send_unwaited("SELECT 1", ())
        raw.rollback()


@pytest.fixture
def watched_pool(
    pg: Engine, instances: Callable[..., Instance], monkeypatch: pytest.MonkeyPatch
) -> tuple[Instance, list[str]]:
    """An instance of one pooled connection; the list fills with each attempt its requests make."""
    monkeypatch.setenv("K_SERVICE", "idle-check")
    monkeypatch.setenv("DB_POOL_SIZE", "1")
    instance = instances("probe", PROBE)
    assert instance.client.get("/users").status_code == 200
    attempts: list[str] = []
    event.listen(instance.database.engine, "begin", lambda _connection: attempts.append("begin"))
    return instance, attempts


def _terminate_the_instance(pg: Engine) -> None:
    with pg.connect() as connection:
        connection.execute(
            text("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
                 " WHERE application_name = 'idle-check'")
        )  # fmt: skip


def test_a_connection_idle_long_is_checked_and_replaced_before_use(
    pg: Engine, watched_pool: tuple[Instance, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the idle threshold, a dropped connection is found on its way out of the pool: the
    request's one attempt runs on a new connection."""
    instance, attempts = watched_pool
    _terminate_the_instance(pg)
    monkeypatch.setattr(db.engine, "PING_AFTER_IDLE_SECONDS", 0.0)

    assert instance.client.get("/users").status_code == 200
    assert attempts == ["begin"]


def test_a_connection_in_steady_use_is_not_checked(
    pg: Engine, watched_pool: tuple[Instance, list[str]]
) -> None:
    """Below the threshold nothing is checked: a dropped connection costs the request one
    failed attempt, retried at once on a new connection, and the request still succeeds."""
    instance, attempts = watched_pool
    _terminate_the_instance(pg)

    assert instance.client.get("/users").status_code == 200
    assert attempts == ["begin", "begin"]


def test_an_untested_pg8000_runs_as_installed_with_one_warning(
    pg: Engine,
    instances: Callable[..., Instance],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A pg8000 version the tuning was not tested with is left as it is, and says so once."""
    monkeypatch.setattr(driver, "installed_version", lambda: "9.9.9")
    instance = instances()

    assert [instance.client.get("/users").status_code for _ in range(3)] == [200] * 3

    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "pg8000 9.9.9 has not been tested" in warnings[0]
    with instance.database.engine.connect() as connection:
        assert not hasattr(connection.connection.dbapi_connection, "tuned")


def test_driver_tuning_can_be_turned_off(
    pg: Engine, instances: Callable[..., Instance], monkeypatch: pytest.MonkeyPatch
) -> None:
    """DB_DRIVER_TUNING=false: pg8000 as installed, at its own round trips, still correct."""
    monkeypatch.setenv("DB_DRIVER_TUNING", "false")
    client = instances().client
    user = client.post("/users", json={"name": "A", "email": "a@example.com"}).json["id"]
    with counting_round_trips() as read:
        assert client.get(f"/users/{user}").status_code == 200

    # BEGIN, the SET LOCAL settings, SET TRANSACTION READ ONLY, the statement's three steps,
    # COMMIT's three: each waits for its answer.
    assert read == {"writes": 9, "round_trips": 9}
