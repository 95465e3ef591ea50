"""pg8000 without the overhead it adds to every statement (measured in bench/README.md).

pg8000 is pure Python, which is why it is the driver of choice on Cloud Functions, but
a few of its habits cost more than the database does:

- It converts each statement's ``%s`` placeholders to ``$1`` by scanning the text
  character by character on every execute: about 0.25 ms for a small SELECT and
  tens of milliseconds for a 1000-row INSERT. SQLAlchemy sends the same few texts
  over and over, and with the "format" style the result depends on the text alone,
  so the converted text is cached.
- It sends a parameterised statement in three steps, waiting for the server after
  each (Parse; Describe; Bind and Execute): three round trips. Nothing it sends in a
  later step depends on an earlier answer (parameters and results travel as text),
  so the same messages go out in one write, with one Sync: one round trip.
- ``commit()`` and ``rollback()`` go through that same extended protocol. They take
  no parameters: the simple protocol does them in one round trip.
- It parses every ``timestamptz`` with ``strptime``; ``fromisoformat`` reads
  PostgreSQL's output several times faster (pg8000's parser remains the fallback).
- It leaves Nagle's algorithm on: a message that overflows its write buffer waits
  for the server's delayed ACK, about 40 ms, as in a large multi-row INSERT.
"""

from __future__ import annotations

import functools
import socket
from datetime import datetime
from typing import Any

import pg8000.converters
import pg8000.core
import pg8000.dbapi
import pg8000.legacy

TIMESTAMPTZ_OID = 1184
_convert_paramstyle = pg8000.dbapi.convert_paramstyle


@functools.lru_cache(maxsize=1024)
def _converted(query: str) -> str:
    return str(_convert_paramstyle("format", query, ())[0])


def _cached_convert_paramstyle(style: str, query: str, args: Any) -> tuple[str, Any]:
    if style != "format":
        return _convert_paramstyle(style, query, args)  # type: ignore[no-any-return]
    return _converted(query), args


def install_statement_cache() -> None:
    """Cache pg8000's placeholder conversion, process-wide; calling it again changes nothing.

    SQLAlchemy's dialect uses pg8000's legacy cursor, which imported the function by name.
    """
    pg8000.dbapi.convert_paramstyle = _cached_convert_paramstyle
    pg8000.legacy.convert_paramstyle = _cached_convert_paramstyle


def _timestamptz(text: str) -> datetime | str:
    try:
        return datetime.fromisoformat(text)
    except ValueError:  # infinity, years past 9999, and other forms pg8000 knows
        return pg8000.converters.timestamptz_in(text)  # type: ignore[no-any-return]


def _pipelined_execute_unnamed(
    connection: Any, statement: str, vals: Any = (), oids: Any = (), stream: Any = None
) -> Any:
    """pg8000's unnamed-statement execution with every message sent at once."""
    if stream is not None:  # COPY keeps pg8000's own path
        return pg8000.core.CoreConnection.execute_unnamed(connection, statement, vals, oids, stream)
    # Encode first: a value that cannot be sent must fail before anything is written.
    params = pg8000.converters.make_params(connection.py_types, vals)
    context = pg8000.core.Context(statement, stream=stream)
    connection.send_PARSE(pg8000.core.NULL_BYTE, statement, oids)
    connection.send_DESCRIBE_STATEMENT(pg8000.core.NULL_BYTE)
    connection.send_BIND(pg8000.core.NULL_BYTE, params)
    connection.send_EXECUTE()
    pg8000.core._write(connection._sock, pg8000.core.SYNC_MSG)
    pg8000.core._flush(connection._sock)
    connection.handle_messages(context)
    return context


def tune_connection(dbapi_connection: Any, _record: Any = None) -> None:
    """On each new connection: TCP_NODELAY, one round trip per statement, COMMIT and
    ROLLBACK, and fast timestamps."""
    sock = getattr(dbapi_connection, "_usock", None)
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def commit() -> None:
        dbapi_connection.execute_simple("commit")

    def rollback() -> None:
        if dbapi_connection._in_transaction:
            dbapi_connection.execute_simple("rollback")

    dbapi_connection.execute_unnamed = functools.partial(
        _pipelined_execute_unnamed, dbapi_connection
    )
    dbapi_connection.commit = commit
    dbapi_connection.rollback = rollback
    dbapi_connection.register_in_adapter(TIMESTAMPTZ_OID, _timestamptz)
