"""Connections to Cloud SQL through the Cloud SQL Python Connector.

The connector starts a background thread and fetches credentials when it is
constructed, so it is built here, once per instance, only when
``INSTANCE_CONNECTION_NAME`` is set.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.cloud.sql.connector import Connector, IPTypes

from db.config import CloudSqlSettings


def connector_creator(
    settings: CloudSqlSettings, connect_args: dict[str, Any], password: Callable[[], str | None]
) -> tuple[Callable[[], Any], Connector]:
    """A pg8000 connection factory for ``create_engine(creator=...)``, and its connector.

    ``password()`` is asked at each new connection (``DB_PASS_FILE``), before ``DB_PASS``.
    """
    ip_type = IPTypes[settings.ip_type]
    # "lazy": refresh certificates on demand, since the CPU is throttled between requests.
    connector = Connector(
        ip_type=ip_type,
        enable_iam_auth=settings.iam_auth,
        refresh_strategy="lazy",
        sqladmin_api_endpoint=settings.admin_api_endpoint,
    )

    def connect() -> Any:
        credentials: dict[str, Any] = {"user": settings.user, "db": settings.database}
        if not settings.iam_auth:
            credentials["password"] = password() or settings.password
        return connector.connect(
            settings.instance_connection_name,
            "pg8000",
            ip_type=ip_type,
            enable_iam_auth=settings.iam_auth,
            **credentials,
            **connect_args,
        )

    return connect, connector


def close_connector(connector: Connector) -> None:
    """Close the connector, and the event loop its thread ran.

    ``Connector.close()`` stops that loop but leaves it open, holding two file
    descriptors until the process ends.
    """
    connector.close()
    loop = getattr(connector, "_loop", None)
    if loop is not None and not loop.is_running() and not loop.is_closed():
        loop.close()
