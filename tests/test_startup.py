"""Settings are checked when an instance starts: a bad one stops the real server process.

On Cloud Run a revision whose instances fail to start never receives traffic, and the
previous revision keeps serving; an instance that started anyway would answer every request
with an error instead.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dev.postgres import free_port
from tests.conftest import CONFIG_VARIABLES, ROOT

SECRET = "startup-secret-6d1e"


def _start(tmp_path: Path, **settings: str) -> tuple[subprocess.CompletedProcess[str], int]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_VARIABLES}
    result = subprocess.run(
        [str(Path(sys.executable).with_name("functions-framework")), "--target=api",
         f"--source={ROOT / 'main.py'}", f"--port={port}"],
        cwd=tmp_path, env={**env, **settings}, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    return result, port


@pytest.mark.parametrize(
    ("settings", "variable"),
    [
        ({"DB_POOL_SIZE": "zero"}, "DB_POOL_SIZE"),
        ({"DATABASE_URL": f"mysql://app:{SECRET}@db.internal/app"}, "DATABASE_URL"),
        ({"DATABASE_URL": f"postgresql://app:{SECRET}@db/app?sslmode=on"}, "DATABASE_URL"),
        ({"INSTANCE_CONNECTION_NAME": "acme:europe-west1:main", "DB_USER": "app"}, "DB_PASS"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"DB_STATEMENT_TIMEOUT": "-1", "K_SERVICE": "api"}, "DB_STATEMENT_TIMEOUT"),
    ],
)
def test_a_bad_setting_stops_the_server_with_one_line_naming_it(
    tmp_path: Path, settings: dict[str, str], variable: str
) -> None:
    """functions-framework exits with status 2 before listening, after one line naming the
    variable and never the password."""
    result, port = _start(tmp_path, **settings)

    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 2, output
    assert len(output.splitlines()) == 1, output
    assert variable in output
    assert "configuration error" in output
    assert SECRET not in output
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()


def test_the_embedded_default_needs_no_setting_at_all(tmp_path: Path) -> None:
    """With nothing configured, loading the entry points reads the settings and opens nothing."""
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_VARIABLES}
    code = "import main; print(main.database.settings.is_embedded, main.database.is_built)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].split() == ["True", "False"]
    assert not (tmp_path / "app.db").exists()


# What a cold start on PostgreSQL does not need to import (bench/README.md, "Cold start").
NOT_AT_A_COLD_START = (
    "alembic",  # migrations run from deploy.sh, never in a function
    "google.cloud.sql.connector",  # only on the connector's path
    "sqlalchemy.dialects.sqlite",  # only for the embedded default
    "yaml",  # only for /openapi.json
    "urllib3",  # only at the first publish of an event (db/pubsub.py)
    "google.auth",
)


def test_loading_the_entry_points_on_postgresql_imports_only_what_serving_needs(
    tmp_path: Path,
) -> None:
    """Each of these costs a cold start 5 to 500 ms, and none is used to serve PostgreSQL."""
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_VARIABLES}
    code = (
        "import sys, main; "
        f"print(' '.join(m for m in {NOT_AT_A_COLD_START!r} if m in sys.modules) or 'none')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT), "DATABASE_URL": "postgresql://app:pw@db.internal/app"},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "none"
