"""Settings read from the environment once, lazily, and validated.

Every problem is reported as one ``ConfigError`` line that names the variable.
Values that may hold a password (``DATABASE_URL``, ``DB_PASS``, ``DB_PASS_FILE``'s content)
are never echoed.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

IpType = Literal["PUBLIC", "PRIVATE", "PSC"]
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("json", "text")
SQLITE_FILE = "app.db"

# A project id, or a domain-scoped one (example.com:project).
_PROJECT = re.compile(r"^(?:[a-z0-9.-]+:)?[a-z][a-z0-9-]{4,28}[a-z0-9]$")
_HOST_PORT = re.compile(r"^(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):[0-9]{1,5}$")
_INSTANCE_CONNECTION_NAME = re.compile(r"^(?:[a-z0-9.-]+:)?[a-z0-9-]+:[a-z0-9-]+:[a-z0-9-]+$")


class ConfigError(ValueError):
    """Raised when an environment variable is missing, malformed or contradicts another."""


@dataclass(frozen=True)
class CloudSqlSettings:
    """How to reach Cloud SQL through the Python Connector."""

    instance_connection_name: str
    user: str
    database: str
    password: str | None
    iam_auth: bool
    ip_type: IpType
    admin_api_endpoint: str | None = None  # None: Google's own

    def __repr__(self) -> str:
        return (
            f"CloudSqlSettings(instance_connection_name={self.instance_connection_name!r}, "
            f"user={self.user!r}, database={self.database!r}, iam_auth={self.iam_auth}, "
            f"ip_type={self.ip_type!r}, admin_api_endpoint={self.admin_api_endpoint!r})"
        )


@dataclass(frozen=True)
class PubSubSettings:
    """Where the outbox publishes (``db/outbox.py``): a project's topics, through the emulator
    at ``emulator_host`` when one is given (as Google's client libraries do), else Google's."""

    project: str
    emulator_host: str | None = None
    publish_timeout: float = 1.0  # PUBLISH_TIMEOUT: seconds a request may wait on Pub/Sub


@dataclass(frozen=True)
class Settings:
    """Everything the instance needs to reach its database, validated."""

    url: URL
    cloud_sql: CloudSqlSettings | None
    ssl_mode: str  # libpq's sslmode, from DATABASE_URL's query; "prefer" by default
    pool_size: int
    max_overflow: int
    pool_timeout: float
    pool_recycle: int
    statement_timeout: float
    idle_in_transaction_timeout: float
    log_level: str
    log_format: str
    driver_tuning: bool = True  # db/driver.py; off: pg8000 as installed
    password_file: str | None = None  # DB_PASS_FILE: read at every new connection
    body_timeout: float = 10.0  # BODY_TIMEOUT: seconds a request's body may take to arrive
    pubsub: PubSubSettings | None = None  # None: events wait in the outbox
    trace_project: str | None = None  # the project the trace names in log lines are in

    def password(self) -> str | None:
        """The password for a new connection: ``DB_PASS_FILE``'s content as it is now, or
        None (the URL's, or ``DB_PASS``)."""
        return read_password_file(self.password_file) if self.password_file else None

    @property
    def is_embedded(self) -> bool:
        """True when the service runs on its own SQLite file."""
        return self.url.get_backend_name() == "sqlite"


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the configuration; raise ``ConfigError`` naming the first bad variable."""
    raw_environ = os.environ if environ is None else environ
    env = _Env(raw_environ)
    database_url = env.get("DATABASE_URL")
    instance = env.get("INSTANCE_CONNECTION_NAME")
    if database_url and instance:
        raise ConfigError("set DATABASE_URL or INSTANCE_CONNECTION_NAME, not both")

    password_file = _password_file(env)
    cloud_sql = _cloud_sql_settings(env, instance, password_file) if instance else None
    ssl_mode = "prefer"
    if cloud_sql is not None:
        url = URL.create("postgresql+pg8000", database=cloud_sql.database)
    elif database_url:
        url, ssl_mode = _database_url(database_url)
    else:
        url = URL.create("sqlite", database=SQLITE_FILE)

    return Settings(
        url=url,
        cloud_sql=cloud_sql,
        ssl_mode=ssl_mode,
        pool_size=env.integer("DB_POOL_SIZE", default=request_threads(raw_environ), minimum=1),
        max_overflow=env.integer("DB_MAX_OVERFLOW", default=0, minimum=0),
        pool_timeout=env.seconds("DB_POOL_TIMEOUT", default=5.0),
        pool_recycle=env.integer("DB_POOL_RECYCLE", default=1800, minimum=1),
        statement_timeout=env.seconds("DB_STATEMENT_TIMEOUT", default=30.0),
        idle_in_transaction_timeout=env.seconds("DB_IDLE_IN_TRANSACTION_TIMEOUT", default=60.0),
        log_level=log_level(raw_environ),
        log_format=log_format(raw_environ),
        driver_tuning=env.boolean("DB_DRIVER_TUNING", default=True),
        password_file=password_file,
        body_timeout=env.seconds("BODY_TIMEOUT", default=10.0),
        pubsub=_pubsub_settings(env),
        trace_project=env.get("GOOGLE_CLOUD_PROJECT") or env.get("GCP_PROJECT"),
    )


def startup_settings() -> Settings:
    """The settings, read when the instance starts; a bad value stops the process.

    One log line names the variable, and the process exits with status 2 before it
    serves anything: on Cloud Run a revision that fails to start never receives
    traffic, and the previous one keeps serving.
    """
    log = logging.getLogger(__name__)
    try:
        settings = load_settings()
    except ConfigError as error:
        log.critical("configuration error: %s", error)
        raise SystemExit(2) from None
    if settings.pubsub is None:
        log.info(
            "no Pub/Sub configured (neither GOOGLE_CLOUD_PROJECT nor PUBSUB_EMULATOR_HOST):"
            " events wait in the outbox_events table, and nothing is published"
        )
    return settings


def request_threads(environ: Mapping[str, str] | None = None) -> int:
    """The request threads per instance, computed as functions-framework computes them."""
    env = _Env(os.environ if environ is None else environ)
    return env.integer("THREADS", default=(os.cpu_count() or 1) * 4, minimum=1)


def log_level(environ: Mapping[str, str] | None = None) -> str:
    """The validated ``LOG_LEVEL`` (default ``INFO``)."""
    env = _Env(os.environ if environ is None else environ)
    level = (env.get("LOG_LEVEL") or "INFO").upper()
    if level not in LOG_LEVELS:
        raise ConfigError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    return level


def log_format(environ: Mapping[str, str] | None = None) -> str:
    """The validated ``LOG_FORMAT``: ``json`` where Cloud Run sets ``K_SERVICE``, else ``text``."""
    env = _Env(os.environ if environ is None else environ)
    default = "json" if env.get("K_SERVICE") else "text"
    chosen = (env.get("LOG_FORMAT") or default).lower()
    if chosen not in LOG_FORMATS:
        raise ConfigError(f"LOG_FORMAT must be json or text, got {chosen!r}")
    return chosen


def _pubsub_settings(env: _Env) -> PubSubSettings | None:
    project, emulator = env.get("GOOGLE_CLOUD_PROJECT"), env.get("PUBSUB_EMULATOR_HOST")
    timeout = env.seconds("PUBLISH_TIMEOUT", default=1.0)
    if project is None:
        if emulator is not None:
            raise ConfigError(
                "PUBSUB_EMULATOR_HOST needs GOOGLE_CLOUD_PROJECT, the project of its topics"
            )
        return None
    if not _PROJECT.fullmatch(project):
        raise ConfigError(f"GOOGLE_CLOUD_PROJECT is not a project id: {project!r}")
    if emulator is not None and not _HOST_PORT.fullmatch(emulator):
        raise ConfigError(f"PUBSUB_EMULATOR_HOST must be HOST:PORT, got {emulator!r}")
    return PubSubSettings(project, emulator, timeout)


def _database_url(raw: str) -> tuple[URL, str]:
    try:
        url = make_url(raw)
    except ArgumentError:
        raise ConfigError("DATABASE_URL is not a valid SQLAlchemy URL") from None
    # Heroku-style and driverless PostgreSQL URLs mean the driver this service ships.
    if url.drivername in ("postgres", "postgresql"):
        url = url.set(drivername="postgresql+pg8000")
    if url.get_backend_name() not in ("postgresql", "sqlite"):
        raise ConfigError("DATABASE_URL must name a PostgreSQL or SQLite database")
    if url.get_backend_name() == "postgresql" and url.get_driver_name() != "pg8000":
        raise ConfigError("DATABASE_URL must use the pg8000 driver (postgresql+pg8000://...)")
    # pg8000 takes no sslmode; the engine turns it into an SSL context (db/engine.py).
    ssl_mode = url.query.get("sslmode", "prefer")
    if not isinstance(ssl_mode, str) or ssl_mode not in SSL_MODES:
        raise ConfigError(f"DATABASE_URL's sslmode must be one of {', '.join(SSL_MODES)}")
    return url.difference_update_query(["sslmode"]), ssl_mode


def read_password_file(path: str) -> str:
    """The password in ``path``, without a trailing line break; ``ConfigError`` when it cannot
    be read. Cloud Run reads a mounted secret from Secret Manager at each access, so a rotated
    password is seen at the next connection."""
    try:
        password = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(
            f"DB_PASS_FILE {path!r} cannot be read ({type(error).__name__})"
        ) from None
    if not password:
        raise ConfigError(f"DB_PASS_FILE {path!r} is empty")
    return password


def _password_file(env: _Env) -> str | None:
    path = env.get("DB_PASS_FILE")
    if path is None:
        return None
    if env.get("DB_PASS"):
        raise ConfigError("set DB_PASS or DB_PASS_FILE, not both")
    read_password_file(path)  # readable now, or the instance does not start
    return path


def _cloud_sql_settings(env: _Env, instance: str, password_file: str | None) -> CloudSqlSettings:
    if not _INSTANCE_CONNECTION_NAME.match(instance):
        raise ConfigError(
            f"INSTANCE_CONNECTION_NAME must look like project:region:instance, got {instance!r}"
        )
    iam_auth = env.boolean("DB_IAM_AUTH", default=False)
    password = env.get("DB_PASS")
    if iam_auth and (password or password_file):
        raise ConfigError("DB_PASS and DB_PASS_FILE must not be set when DB_IAM_AUTH=true")
    if not iam_auth and not (password or password_file):
        raise ConfigError("DB_PASS or DB_PASS_FILE is required unless DB_IAM_AUTH=true")
    ip_type = (env.get("DB_IP_TYPE") or "PUBLIC").upper()
    if ip_type not in ("PUBLIC", "PRIVATE", "PSC"):
        raise ConfigError(f"DB_IP_TYPE must be PUBLIC, PRIVATE or PSC, got {ip_type!r}")
    endpoint = env.get("CLOUD_SQL_ADMIN_API_ENDPOINT")
    if endpoint is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", endpoint):
        raise ConfigError(f"CLOUD_SQL_ADMIN_API_ENDPOINT must be an http(s) URL, got {endpoint!r}")
    return CloudSqlSettings(
        instance_connection_name=instance,
        user=env.required("DB_USER"),
        database=env.required("DB_NAME"),
        password=password,
        iam_auth=iam_auth,
        ip_type=ip_type,  # type: ignore[arg-type]  # narrowed by the membership test above
        admin_api_endpoint=endpoint.rstrip("/") if endpoint else None,
    )


class _Env:
    """Typed, named access to environment variables; blank counts as unset."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def get(self, name: str) -> str | None:
        value = self._environ.get(name, "").strip()
        return value or None

    def required(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise ConfigError(f"{name} is required with INSTANCE_CONNECTION_NAME")
        return value

    def integer(self, name: str, *, default: int, minimum: int) -> int:
        raw = self.get(name)
        if raw is None:
            return default
        if not raw.isascii() or not raw.isdigit() or int(raw) < minimum:
            raise ConfigError(f"{name} must be a whole number of at least {minimum}, got {raw!r}")
        return int(raw)

    def seconds(self, name: str, *, default: float) -> float:
        raw = self.get(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if not 0 < value < 86_400:
            raise ConfigError(f"{name} must be a number of seconds above 0, got {raw!r}")
        return value

    def boolean(self, name: str, *, default: bool) -> bool:
        raw = self.get(name)
        if raw is None:
            return default
        if raw.lower() not in ("true", "false"):
            raise ConfigError(f"{name} must be true or false, got {raw!r}")
        return raw.lower() == "true"
