"""Database errors sorted by meaning, on both backends, and what a caller gets for each."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, event, insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from db.errors import Failure, classify, violation_of
from db.models import Base, Item, User, utcnow
from tests.conftest import PROBE, Instance


def _sqlite_error(tmp_path: Path, sql: str) -> DBAPIError:
    engine = create_engine(f"sqlite:///{tmp_path / 'errors.db'}")
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY)")
            connection.exec_driver_sql(sql)
    except DBAPIError as error:
        return error
    finally:
        engine.dispose()
    raise AssertionError("the statement did not fail")


@pytest.mark.parametrize(
    ("sql", "failure"),
    [
        ("SELECT * FROM no_such_table", Failure.SCHEMA_MISMATCH),
        ("SELECT no_such_column FROM t", Failure.SCHEMA_MISMATCH),
        ("SELEC 1", Failure.OTHER),
        ("INSERT INTO t (id) VALUES (1), (1)", Failure.UNIQUE_VIOLATION),
    ],
)
def test_sqlite_errors_are_sorted_like_postgresql_ones(
    tmp_path: Path, sql: str, failure: Failure
) -> None:
    """A missing table or column is a schema mismatch, a typo is a bug; neither is an outage."""
    assert classify(_sqlite_error(tmp_path, sql)) is failure


def test_a_locked_sqlite_file_is_an_outage(tmp_path: Path) -> None:
    """SQLITE_BUSY (another writer holds the file) is worth a 503 and a retry."""
    path = tmp_path / "busy.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (id INTEGER)")
    holder.execute("BEGIN IMMEDIATE")
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0})
    try:
        with pytest.raises(DBAPIError) as raised, engine.begin() as connection:
            connection.exec_driver_sql("INSERT INTO t VALUES (1)")
        assert classify(raised.value) is Failure.UNAVAILABLE
    finally:
        engine.dispose()
        holder.close()


def test_a_table_missing_on_sqlite_is_a_500_with_a_clear_log_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    instances: Callable[..., Instance],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """On the embedded default, a table the code needs and the file lacks is no outage: 500."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOG_FORMAT", "json")
    client = instances().client
    assert client.get("/items").status_code == 200
    with contextlib.closing(sqlite3.connect(tmp_path / "app.db")) as connection:
        connection.execute("DROP TABLE items")  # a DDL statement: committed as it runs
    capsys.readouterr()

    response = client.get("/items")

    assert response.status_code == 500
    assert response.json == {"error": {"code": "internal", "message": "internal error"}}
    assert "Retry-After" not in response.headers
    [line] = [json.loads(out) for out in capsys.readouterr().out.splitlines() if '"ERROR"' in out]
    assert "python -m db revision" in line["message"]


def test_a_table_missing_on_postgresql_is_a_500_with_a_clear_log_line(
    pg: Engine,
    instances: Callable[..., Instance],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SQLSTATE 42P01 on PostgreSQL: a 500 and a log line saying the schema is behind."""
    monkeypatch.setenv("LOG_FORMAT", "json")
    client = instances("probe", PROBE).client
    client.get("/users")
    capsys.readouterr()

    response = client.get("/missing-table")

    assert response.status_code == 500
    [line] = [json.loads(out) for out in capsys.readouterr().out.splitlines() if '"ERROR"' in out]
    assert "the schema is behind the models" in line["message"]


class _Taken(Exception):
    pass


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_violation_of_turns_only_the_named_constraint_into_the_domain_error(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The named unique constraint becomes the given error; another constraint's violation
    and any other failure pass unchanged, on both backends."""
    if backend == "postgresql":
        engine = create_engine(request.getfixturevalue("database_url"))
        with engine.begin() as connection:
            connection.exec_driver_sql("TRUNCATE users RESTART IDENTITY CASCADE")
    else:
        engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
        event.listen(engine, "connect", lambda dbapi, _: dbapi.execute("PRAGMA foreign_keys=ON"))
        Base.metadata.create_all(engine)
    user = {"name": "A", "email": "a@x.io", "balance": 0, "created_at": utcnow(),
            "updated_at": utcnow()}  # fmt: skip
    with Session(engine) as session:
        session.add(User(**user))
        session.commit()
        session.add(User(**user))
        with pytest.raises(_Taken), violation_of("uq_users_email", raises=_Taken()):
            session.flush()
        session.rollback()
        session.add(User(**user))
        with pytest.raises(DBAPIError), violation_of("fk_items_owner_id_users", raises=_Taken()):
            session.flush()
        session.rollback()
        with pytest.raises(DBAPIError), violation_of("uq_users_email", raises=_Taken()):
            session.execute(insert(Item), [{"owner_id": 99, "name": "x", "quantity": 1,
                                            "created_at": utcnow()}])  # fmt: skip
        session.rollback()
    engine.dispose()
