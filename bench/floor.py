"""The floor of any function that reads a row with pg8000 behind functions-framework.

Each of its threads keeps one stock pg8000 connection in autocommit with one prepared
statement: a request is one Bind and Execute, one round trip, and nothing else: no pool, no
SQLAlchemy, no transaction, no validation, no log line. Not a way to write a service (no
timeouts, no error handling, a connection per thread for ever): the measure of what pg8000
and the HTTP stack cost on their own, below which no function built on them can go.
"""

from __future__ import annotations

import os
import threading
from typing import Any
from urllib.parse import unquote, urlsplit

import flask
import functions_framework
import pg8000.native

from bench.answers import answer, user

_local = threading.local()
_COLUMNS = ("id", "name", "email", "balance", "created_at", "updated_at")


def _statement() -> Any:
    statement = getattr(_local, "statement", None)
    if statement is None:
        url = urlsplit(os.environ["DATABASE_URL"])
        connection = pg8000.native.Connection(
            unquote(url.username or ""), password=unquote(url.password or ""),
            host=url.hostname or "127.0.0.1", port=url.port or 5432,
            database=url.path.lstrip("/"),
            application_name=os.environ.get("K_SERVICE", "bench"),
        )  # fmt: skip
        statement = connection.prepare(
            "SELECT id, name, email, balance, created_at, updated_at FROM users WHERE id = :id"
        )
        _local.statement = statement
    return statement


@functions_framework.http
def pg8000_floor(request: flask.Request) -> flask.Response:
    """``GET /users/{id}`` in one prepared statement on the thread's own connection."""
    rows = _statement().run(id=int(request.path.rstrip("/").rsplit("/", 1)[-1]))
    if not rows:
        return answer(404, {"error": "not found"})
    return answer(200, user(dict(zip(_COLUMNS, rows[0], strict=True))))
