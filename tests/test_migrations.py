"""Migrations: ``python -m db upgrade`` builds the schema, and it matches the models."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from sqlalchemy import create_engine, inspect
from sqlalchemy.pool import NullPool

from tests.conftest import ROOT
from tests.postgres import PASSWORD, PostgresServer


def _run_db(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "db", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def empty_database(postgres: PostgresServer) -> str:
    """A new, empty database on the test server; its URL."""
    admin = create_engine(postgres.url(), poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql("DROP DATABASE IF EXISTS migrate_check")
        connection.exec_driver_sql("CREATE DATABASE migrate_check")
    admin.dispose()
    return postgres.url("migrate_check").render_as_string(hide_password=False)


def test_upgrade_builds_the_schema_and_check_finds_no_drift(empty_database: str) -> None:
    """`python -m db upgrade` migrates an empty database; `check` then finds the models match."""
    env = {**os.environ, "DATABASE_URL": empty_database}

    upgraded = _run_db("upgrade", env=env)
    assert upgraded.returncode == 0, upgraded.stderr
    checked = _run_db("check", env=env)
    assert checked.returncode == 0, checked.stderr + checked.stdout

    engine = create_engine(empty_database, poolclass=NullPool)
    assert "users" in inspect(engine).get_table_names()
    engine.dispose()


def test_upgrade_with_bad_configuration_prints_one_line_and_exits_2() -> None:
    """A bad variable stops the command with one line naming it, and no password."""
    env = {**os.environ, "DATABASE_URL": f"postgresql://u:{PASSWORD}@h/app", "DB_POOL_SIZE": "zero"}

    result = _run_db("upgrade", env=env)

    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "DB_POOL_SIZE" in result.stderr
    assert PASSWORD not in result.stderr + result.stdout
