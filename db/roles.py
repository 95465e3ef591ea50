"""The runtime role: what the functions may do to the database, named once.

Two roles share the database. The **owner** runs the migrations and owns every table. The
functions log in as a user that is a member of the **runtime** role, a ``NOLOGIN`` group
(``app_runtime`` by default, ``DB_RUNTIME_ROLE`` to change it) that may read and write the
application's rows and use their sequences, and nothing else: no DDL, no ``TRUNCATE``, no
ownership, no ``GRANT``. A bug or an injected statement in a function cannot drop a table.

``grant_runtime`` runs at the end of every ``python -m db upgrade``, in the migration's
transaction: every table, including those a new migration adds, has exactly these privileges.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from sqlalchemy import Connection, text

from db.config import ConfigError

RUNTIME_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE")
DEFAULT_RUNTIME_ROLE = "app_runtime"
_ROLE = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def runtime_role(environ: Mapping[str, str] | None = None) -> str:
    """The runtime role's name: ``DB_RUNTIME_ROLE``, or ``app_runtime``."""
    name = ((os.environ if environ is None else environ).get("DB_RUNTIME_ROLE") or "").strip()
    name = name or DEFAULT_RUNTIME_ROLE
    if not _ROLE.fullmatch(name):
        raise ConfigError(
            f"DB_RUNTIME_ROLE must be a lower-case SQL name (a-z, 0-9, _), got {name!r}"
        )
    return name


def grant_runtime(connection: Connection, role: str) -> None:
    """Give ``role`` exactly the runtime privileges on every table and sequence of the schema.

    The role is created (``NOLOGIN``) when it does not exist yet, which needs ``CREATEROLE``;
    an owner without it gets a message saying what to run once.
    """
    if not _ROLE.fullmatch(role):
        raise ConfigError(f"not a role name: {role!r}")
    exists = connection.scalar(text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role})
    if not exists:
        if not connection.scalar(
            text("SELECT rolcreaterole OR rolsuper FROM pg_roles WHERE rolname = current_user")
        ):
            raise ConfigError(
                f"the runtime role {role} does not exist and this user cannot create it: run"
                f" once, as an administrator, CREATE ROLE {role} NOLOGIN (docs/deploying.md)"
            )
        connection.exec_driver_sql(f"CREATE ROLE {role} NOLOGIN")
    privileges = ", ".join(RUNTIME_PRIVILEGES)
    for statement in (
        f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {role}",
        f"GRANT {privileges} ON ALL TABLES IN SCHEMA public TO {role}",
        f"REVOKE ALL ON alembic_version FROM {role}",
        f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {role}",
        f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role}",
        f"REVOKE CREATE ON SCHEMA public FROM {role}",
        f"GRANT USAGE ON SCHEMA public TO {role}",
    ):
        connection.exec_driver_sql(statement)


def add_runtime_user(connection: Connection, user: str, password: str | None, role: str) -> None:
    """Create the login ``user`` (with ``password``, or none for IAM) as a member of ``role``.

    For local servers and the tests; on Cloud SQL the user comes from ``gcloud sql users
    create`` and the membership from one ``GRANT`` (docs/deploying.md).
    """
    if not _ROLE.fullmatch(user):
        raise ConfigError(f"not a user name: {user!r}")
    if not connection.scalar(text("SELECT 1 FROM pg_roles WHERE rolname = :u"), {"u": user}):
        connection.exec_driver_sql(f"CREATE ROLE {user} LOGIN")
    if password is not None:
        quoted = password.replace("'", "''")
        connection.exec_driver_sql(f"ALTER ROLE {user} PASSWORD '{quoted}'")
    connection.exec_driver_sql(f"GRANT {role} TO {user}")
