"""Configuration: read once, validated, one clear line naming the variable, never a password."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from db.config import ConfigError, load_settings

SECRET = "hunter2-secret"
CONNECTOR = {
    "INSTANCE_CONNECTION_NAME": "my-project:europe-west1:main",
    "DB_USER": "app",
    "DB_NAME": "app",
    "DB_PASS": SECRET,
}


def test_no_configuration_means_the_embedded_sqlite_file() -> None:
    """Without DATABASE_URL or INSTANCE_CONNECTION_NAME the service uses app.db."""
    settings = load_settings({})
    assert settings.is_embedded
    assert settings.url.database == "app.db"
    assert settings.cloud_sql is None


def test_pool_size_defaults_to_the_request_threads() -> None:
    """The pool holds one connection per request thread, as functions-framework counts them."""
    assert load_settings({"THREADS": "8"}).pool_size == 8
    assert load_settings({}).pool_size == (os.cpu_count() or 1) * 4
    assert load_settings({"THREADS": "8", "DB_POOL_SIZE": "3"}).pool_size == 3


def test_pool_settings_are_read() -> None:
    """DB_POOL_* and the server-side timeouts are parsed."""
    settings = load_settings(
        {
            "DB_MAX_OVERFLOW": "2",
            "DB_POOL_TIMEOUT": "2.5",
            "DB_POOL_RECYCLE": "600",
            "DB_STATEMENT_TIMEOUT": "5",
        }
    )
    assert (settings.max_overflow, settings.pool_timeout, settings.pool_recycle) == (2, 2.5, 600)
    assert settings.statement_timeout == 5


@pytest.mark.parametrize("scheme", ["postgres", "postgresql", "postgresql+pg8000"])
def test_postgresql_urls_use_pg8000(scheme: str) -> None:
    """Driverless PostgreSQL URLs are read as pg8000 URLs."""
    url = load_settings({"DATABASE_URL": f"{scheme}://u:{SECRET}@db:5432/app"}).url
    assert url.drivername == "postgresql+pg8000"
    assert url.database == "app"


@pytest.mark.parametrize(
    ("environ", "project"),
    [
        ({"GOOGLE_CLOUD_PROJECT": "acme-prod", "GCP_PROJECT": "older"}, "acme-prod"),
        ({"GCP_PROJECT": "older"}, "older"),
        ({"GOOGLE_CLOUD_PROJECT": " "}, None),
        ({}, None),
    ],
)
def test_log_lines_name_traces_in_the_runtimes_project(
    environ: dict[str, str], project: str | None
) -> None:
    """The project of the traces log lines name is read once: GOOGLE_CLOUD_PROJECT, else the
    older runtimes' GCP_PROJECT, else none (and then no line names a trace)."""
    assert load_settings(environ).trace_project == project


def test_connector_settings_are_read() -> None:
    """INSTANCE_CONNECTION_NAME selects the connector with its credentials and IP type."""
    settings = load_settings({**CONNECTOR, "DB_IP_TYPE": "private"})
    assert settings.cloud_sql is not None
    assert settings.cloud_sql.ip_type == "PRIVATE"
    assert settings.cloud_sql.password == SECRET
    assert SECRET not in repr(settings)


def test_admin_api_endpoint_is_google_unless_set() -> None:
    """CLOUD_SQL_ADMIN_API_ENDPOINT, when set, is handed to the connector without its slash."""
    assert load_settings(CONNECTOR).cloud_sql.admin_api_endpoint is None  # type: ignore[union-attr]
    settings = load_settings({**CONNECTOR, "CLOUD_SQL_ADMIN_API_ENDPOINT": "https://sql.example/"})
    assert settings.cloud_sql.admin_api_endpoint == "https://sql.example"  # type: ignore[union-attr]


def test_iam_authentication_needs_no_password() -> None:
    """DB_IAM_AUTH=true connects without DB_PASS."""
    environ = {**CONNECTOR, "DB_IAM_AUTH": "true"}
    del environ["DB_PASS"]
    settings = load_settings(environ)
    assert settings.cloud_sql is not None
    assert settings.cloud_sql.iam_auth
    assert settings.cloud_sql.password is None


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"DATABASE_URL": "not a url"}, "DATABASE_URL"),
        ({"DATABASE_URL": f"mysql://u:{SECRET}@h/app"}, "DATABASE_URL"),
        ({"DATABASE_URL": f"postgresql+psycopg2://u:{SECRET}@h/app"}, "DATABASE_URL"),
        ({"DATABASE_URL": f"postgresql://u:{SECRET}@h/app", **CONNECTOR}, "DATABASE_URL"),
        ({**CONNECTOR, "INSTANCE_CONNECTION_NAME": "only-two:parts"}, "INSTANCE_CONNECTION_NAME"),
        ({**CONNECTOR, "DB_USER": ""}, "DB_USER"),
        ({**CONNECTOR, "DB_NAME": " "}, "DB_NAME"),
        ({**CONNECTOR, "DB_PASS": ""}, "DB_PASS"),
        ({**CONNECTOR, "DB_IAM_AUTH": "true"}, "DB_PASS"),
        ({**CONNECTOR, "DB_IAM_AUTH": "yes"}, "DB_IAM_AUTH"),
        ({**CONNECTOR, "DB_IP_TYPE": "INTERNAL"}, "DB_IP_TYPE"),
        ({**CONNECTOR, "CLOUD_SQL_ADMIN_API_ENDPOINT": "sqladmin"}, "CLOUD_SQL_ADMIN_API_ENDPOINT"),
        ({"DB_POOL_SIZE": "0"}, "DB_POOL_SIZE"),
        ({"DB_POOL_SIZE": "ten"}, "DB_POOL_SIZE"),
        ({"DB_MAX_OVERFLOW": "-1"}, "DB_MAX_OVERFLOW"),
        ({"DB_POOL_TIMEOUT": "0"}, "DB_POOL_TIMEOUT"),
        ({"DB_POOL_TIMEOUT": "soon"}, "DB_POOL_TIMEOUT"),
        ({"DB_POOL_RECYCLE": "0"}, "DB_POOL_RECYCLE"),
        ({"DB_STATEMENT_TIMEOUT": "nan"}, "DB_STATEMENT_TIMEOUT"),
        ({"THREADS": "0"}, "THREADS"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"BODY_TIMEOUT": "0"}, "BODY_TIMEOUT"),
        ({"BODY_TIMEOUT": "forever"}, "BODY_TIMEOUT"),
        ({"DB_PASS_FILE": "/nonexistent/db-pass"}, "DB_PASS_FILE"),
        ({**CONNECTOR, "DB_PASS_FILE": "/nonexistent/db-pass"}, "DB_PASS_FILE"),
    ],
)  # fmt: skip
def test_bad_value_is_one_line_naming_the_variable_without_secrets(
    environ: dict[str, str], variable: str
) -> None:
    """Each bad setting raises ConfigError: one line, naming the variable, never the password."""
    with pytest.raises(ConfigError) as raised:
        load_settings(environ)
    message = str(raised.value)
    assert variable in message
    assert "\n" not in message
    assert SECRET not in message


def test_a_password_file_is_read_at_each_use_and_not_kept(tmp_path: Path) -> None:
    """DB_PASS_FILE replaces DB_PASS; the file's content as it is at each connection counts,
    without its trailing line break; the settings hold only its path."""
    secret = tmp_path / "db-pass"
    secret.write_text(f"{SECRET}\n")
    environ = {**CONNECTOR, "DB_PASS": "", "DB_PASS_FILE": str(secret)}

    settings = load_settings(environ)
    first = settings.password()
    secret.write_text("rotated")

    assert first == SECRET
    assert settings.password() == "rotated"
    assert settings.cloud_sql is not None
    assert settings.cloud_sql.password is None
    assert SECRET not in repr(settings)


def test_a_password_file_and_a_password_are_one_too_many(tmp_path: Path) -> None:
    """Both set: a ConfigError naming them, never the password."""
    secret = tmp_path / "db-pass"
    secret.write_text(SECRET)

    with pytest.raises(ConfigError, match="DB_PASS or DB_PASS_FILE, not both") as raised:
        load_settings({**CONNECTOR, "DB_PASS_FILE": str(secret)})
    assert SECRET not in str(raised.value)


def test_an_empty_password_file_stops_the_instance(tmp_path: Path) -> None:
    """An empty file is a mistake in the mount, named at start."""
    (tmp_path / "db-pass").write_text("\n")

    with pytest.raises(ConfigError, match=r"DB_PASS_FILE .* is empty"):
        load_settings({"DB_PASS_FILE": str(tmp_path / "db-pass")})
