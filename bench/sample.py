"""Google's Cloud SQL sample pattern, on its own: what a function written that way imports.

A global engine created lazily (without a lock) with a pool of 5 + 2, ``engine.connect()`` per
request, Core ``text()`` statements, pg8000 as installed. Kept in a module of its own so that
its cold start (``bench/coldstart.py``) loads only what that pattern needs: Flask,
functions-framework, SQLAlchemy's Core and, on the first request, pg8000; with
``INSTANCE_CONNECTION_NAME`` set, the Cloud SQL Python Connector too, built as the sample builds
it on first use (here with on-demand refresh, as for Cloud Functions, and the Admin API address
the benchmark's stand-in of Google's side gives). Google's own sample imports the connector on
every path, which this one leaves out: the comparison is with the pattern at its lightest.
"""

from __future__ import annotations

import os
from typing import Any

import flask
import functions_framework
from sqlalchemy import Engine, create_engine, text

from bench.answers import answer, user

_engine: Engine | None = None
_COLUMNS = "id, name, email, balance, created_at, updated_at"


def _pool() -> Engine:
    global _engine  # noqa: PLW0603  # the sample's own lazy global, as it writes it
    if _engine is None:
        pool = {"pool_size": 5, "max_overflow": 2, "pool_timeout": 30, "pool_recycle": 1800}
        # Named like the service's connections, so the benchmark can count them.
        named = {"application_name": os.environ.get("K_SERVICE", "bench")}
        if "INSTANCE_CONNECTION_NAME" in os.environ:
            _engine = create_engine("postgresql+pg8000://", creator=_connector(named), **pool)
        else:
            _engine = create_engine(os.environ["DATABASE_URL"], connect_args=named, **pool)
    return _engine


def _connector(named: dict[str, str]) -> Any:
    from google.cloud.sql.connector import Connector  # the sample's own path

    connector = Connector(
        refresh_strategy="lazy", sqladmin_api_endpoint=os.environ["CLOUD_SQL_ADMIN_API_ENDPOINT"]
    )
    return lambda: connector.connect(
        os.environ["INSTANCE_CONNECTION_NAME"], "pg8000", user=os.environ["DB_USER"],
        password=os.environ["DB_PASS"], db=os.environ["DB_NAME"], **named,
    )  # fmt: skip


@functions_framework.http
def google_sample(request: flask.Request) -> flask.Response:
    """Users through a pooled Core connection per request."""
    with _pool().connect() as connection:
        if request.method == "POST":
            fields = request.get_json()
            row = connection.execute(
                text(
                    "INSERT INTO users (name, email, balance, created_at, updated_at)"
                    f" VALUES (:name, :email, 0, now(), now()) RETURNING {_COLUMNS}"
                ),
                {"name": fields["name"], "email": fields["email"].lower()},
            ).one()
            connection.commit()
            return answer(201, user(dict(row._mapping)))
        user_id = int(request.path.rstrip("/").rsplit("/", 1)[-1])
        found = connection.execute(
            text(f"SELECT {_COLUMNS} FROM users WHERE id = :id"), {"id": user_id}
        ).one_or_none()
        if found is None:
            return answer(404, {"error": "not found"})
        return answer(200, user(dict(found._mapping)))
