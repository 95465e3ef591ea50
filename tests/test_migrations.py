"""Migrations: ``python -m db upgrade`` builds the schema, and it matches the models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect
from sqlalchemy.pool import NullPool

from dev.postgres import PASSWORD, PostgresServer
from tests.conftest import CONFIG_VARIABLES, ROOT
from tests.copies import copy_of_the_project


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


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the project whose User model has gained two columns and no migration."""
    copy_of_the_project(tmp_path)
    models = tmp_path / "db" / "models.py"
    models.write_text(
        models.read_text().replace(
            "    balance: Mapped[int] = mapped_column(BigInteger, default=0)\n",
            "    balance: Mapped[int] = mapped_column(BigInteger, default=0)\n"
            "    nickname: Mapped[str | None] = mapped_column(String(50))\n"
            "    last_seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime)\n",
        )
    )
    return tmp_path


def _in(project: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=project, env=env, capture_output=True, text=True,
        timeout=180, check=False,
    )  # fmt: skip


def _columns(url: str) -> set[str]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        return {column["name"] for column in inspect(engine).get_columns("users")}
    finally:
        engine.dispose()


def test_revision_writes_the_next_numbered_migration_that_upgrades_and_downgrades(
    project: Path, empty_database: str
) -> None:
    """With no database configured, `revision` starts PostgreSQL and writes 0005, clean under
    ruff, which adds the columns, passes `check`, and removes them again."""
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_VARIABLES}

    written = _in(project, "-m", "db", "revision", "-m", "add a nickname", env=env)

    assert written.returncode == 0, written.stderr
    [migration] = (project / "db" / "migrations" / "versions").glob("0005_*.py")
    assert migration.name == "0005_add_a_nickname.py"
    source = migration.read_text()
    assert 'revision = "0005"' in source
    assert 'down_revision = "0004"' in source
    assert "from db.types import UTCDateTime" in source
    assert "batch_alter_table" not in source
    for check in (["check"], ["format", "--check"]):
        linted = _in(project, "-m", "ruff", *check, str(migration), env=env)
        assert linted.returncode == 0, linted.stdout

    database = {**env, "DATABASE_URL": empty_database}
    assert _in(project, "-m", "db", "upgrade", env=database).returncode == 0
    assert {"nickname", "last_seen_at"} <= _columns(empty_database)
    checked = _in(project, "-m", "db", "check", env=database)
    assert checked.returncode == 0, checked.stderr + checked.stdout
    downgraded = _in(project, "-m", "db", "downgrade", "-1", env=database)
    assert downgraded.returncode == 0, downgraded.stderr
    assert not {"nickname", "last_seen_at"} & _columns(empty_database)


def test_revision_refuses_an_sqlite_database(project: Path, tmp_path: Path) -> None:
    """SQLite would get SQLite-only migrations: `revision` says so in one line and writes none."""
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_VARIABLES}
    env["DATABASE_URL"] = f"sqlite:///{tmp_path / 'local.db'}"

    result = _in(project, "-m", "db", "revision", "-m", "x", env=env)

    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "PostgreSQL" in result.stderr
    assert not list((project / "db" / "migrations" / "versions").glob("0005_*.py"))


def test_revision_without_ruff_refuses_and_says_what_to_install(project: Path) -> None:
    """Where the development tools are missing (serve.sh's .venv), `revision` writes nothing
    unformatted: it exits 2 naming the file that installs them."""
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_VARIABLES}
    without_ruff = (
        "import runpy, sys; sys.modules['ruff'] = None; sys.argv = ['db', 'revision', '-m', 'x'];"
        " runpy.run_module('db', run_name='__main__')"
    )

    result = _in(project, "-c", without_ruff, env=env)

    assert result.returncode == 2
    assert "requirements-dev.txt" in result.stderr
    assert not list((project / "db" / "migrations" / "versions").glob("0005_*.py"))
