"""Least privilege: the functions log in with the runtime role's privileges and nothing more.

The suite's instances already serve the whole contract as ``functions``, a login user whose
only privileges come from its membership of ``app_runtime`` (``db/roles.py``); these tests
hold the role to exactly that.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from db.config import ConfigError
from db.errors import sqlstate
from db.roles import DEFAULT_RUNTIME_ROLE, RUNTIME_PRIVILEGES, grant_runtime, runtime_role
from dev.postgres import RUNTIME_PASSWORD, RUNTIME_USER
from tests.conftest import Instance


@pytest.fixture
def runtime(database_url: URL) -> Iterator[Engine]:
    """An engine logged in as the functions' user."""
    engine = create_engine(
        database_url.set(username=RUNTIME_USER, password=RUNTIME_PASSWORD), poolclass=NullPool
    )
    yield engine
    engine.dispose()


FORBIDDEN = {
    "DROP TABLE": "DROP TABLE transfers",
    "TRUNCATE": "TRUNCATE users CASCADE",
    "ALTER TABLE": "ALTER TABLE users ADD COLUMN nickname text",
    "CREATE TABLE": "CREATE TABLE public.stolen (id int)",
    "GRANT": f"GRANT pg_read_all_data TO {RUNTIME_USER}",
    "CREATE ROLE": "CREATE ROLE intruder",
    "DELETE FROM alembic_version": "DELETE FROM alembic_version",
}


@pytest.mark.parametrize("statement", FORBIDDEN.values(), ids=list(FORBIDDEN))
def test_the_runtime_role_cannot_change_the_schema_or_grant(
    runtime: Engine, pg: Engine, statement: str
) -> None:
    """Each of these fails with SQLSTATE 42501 (insufficient_privilege)."""
    with runtime.connect() as connection, pytest.raises(DBAPIError) as refused:
        connection.exec_driver_sql(statement)

    assert sqlstate(refused.value) == "42501", refused.value


def test_a_table_grant_by_the_runtime_role_gives_nothing(runtime: Engine, pg: Engine) -> None:
    """PostgreSQL answers a GRANT on a table the role does not own with a warning, not an
    error: nothing is granted."""

    def grantees() -> set[str]:
        with pg.connect() as connection:
            return set(
                connection.scalars(
                    text(
                        "SELECT grantee FROM information_schema.role_table_grants"
                        " WHERE table_name = 'users'"
                    )
                )
            )

    before = grantees()
    with runtime.begin() as connection:
        connection.exec_driver_sql("GRANT SELECT ON users TO PUBLIC")

    assert grantees() == before
    assert "PUBLIC" not in before


def test_the_runtime_role_reads_and_writes_rows(runtime: Engine, pg: Engine) -> None:
    """SELECT, INSERT (with its sequence), UPDATE, DELETE: what serving needs."""
    with runtime.begin() as connection:
        user = connection.scalar(
            text(
                "INSERT INTO users (name, email, balance, created_at, updated_at)"
                " VALUES ('A', 'a@x.io', 1, now(), now()) RETURNING id"
            )
        )
        connection.execute(text("UPDATE users SET balance = 2 WHERE id = :id"), {"id": user})
        assert connection.scalar(text("SELECT balance FROM users WHERE id = :id"), {"id": user})
        connection.execute(text("DELETE FROM users WHERE id = :id"), {"id": user})


def test_every_table_grants_the_runtime_role_exactly_its_privileges(pg: Engine) -> None:
    """Each application table, and no other privilege; alembic_version not at all. A table a
    migration adds gets them from the migration run, so none can be forgotten."""
    with pg.connect() as connection:
        tables = set(
            connection.scalars(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))
        )
        grants = connection.execute(
            text(
                "SELECT table_name, privilege_type FROM information_schema.role_table_grants"
                " WHERE grantee = :role"
            ),
            {"role": DEFAULT_RUNTIME_ROLE},
        ).all()
        member = connection.scalar(
            text("SELECT pg_has_role(:user, :role, 'MEMBER')"),
            {"user": RUNTIME_USER, "role": DEFAULT_RUNTIME_ROLE},
        )
        login = connection.scalar(
            text("SELECT rolcanlogin FROM pg_roles WHERE rolname = :role"),
            {"role": DEFAULT_RUNTIME_ROLE},
        )

    by_table: dict[str, frozenset[str]] = {}
    for table, privilege in grants:
        by_table[table] = by_table.get(table, frozenset()) | {privilege}
    expected = frozenset(RUNTIME_PRIVILEGES)
    assert by_table == dict.fromkeys(tables - {"alembic_version"}, expected)
    assert {"handled_events", "users", "transfers"} <= set(by_table)
    assert member
    assert not login


def test_a_missing_privilege_is_a_500_naming_it(
    pg: Engine,
    instances: Callable[..., Instance],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A deployment mistake, not an outage: a 500 (no Retry-After), one ERROR line that names
    the table the runtime role may not write."""
    client = instances().client
    with pg.begin() as connection:
        connection.exec_driver_sql(f"REVOKE INSERT ON users FROM {DEFAULT_RUNTIME_ROLE}")
    try:
        refused = client.post("/users", json={"name": "A", "email": "a@x.io"})
    finally:
        with pg.begin() as connection:
            grant_runtime(connection, DEFAULT_RUNTIME_ROLE)

    assert refused.status_code == 500
    assert "Retry-After" not in refused.headers
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "permission denied for table users" in errors[0]
    assert "runtime role" in errors[0]
    assert client.post("/users", json={"name": "A", "email": "a@x.io"}).status_code == 201


@pytest.mark.parametrize(
    "name", ["App-Runtime", "app runtime", "app_runtime; DROP TABLE users", "x" * 64]
)
def test_a_runtime_role_name_that_is_not_a_plain_sql_name_is_refused(name: str) -> None:
    """DB_RUNTIME_ROLE goes into GRANT statements: only a lower-case SQL name is taken."""
    with pytest.raises(ConfigError, match="DB_RUNTIME_ROLE"):
        runtime_role({"DB_RUNTIME_ROLE": name})


def test_the_runtime_role_is_app_runtime_unless_named() -> None:
    """The default, and a name given in DB_RUNTIME_ROLE."""
    assert runtime_role({}) == "app_runtime"
    assert runtime_role({"DB_RUNTIME_ROLE": "billing_runtime"}) == "billing_runtime"
