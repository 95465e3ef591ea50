"""pg8000 without the round trips and the CPU it spends on every statement (bench/README.md).

pg8000 is pure Python, which is why it is the driver of choice on Cloud Functions, but a few
of its habits cost more than the database does. ``tune_connection`` changes them on each
connection an engine opens, and on no other connection:

- It sends ``BEGIN`` on its own and waits for the answer before the first statement of a
  transaction. Here ``BEGIN``, with the transaction's ``SET LOCAL`` settings, goes out in the
  same write as that first statement: the server runs them in order, and one round trip does
  the work of two. A transaction that ends before any statement never reaches the server.
- It sends a parameterised statement in three steps, waiting for the server after each
  (Parse; Describe; Bind and Execute). Nothing it sends in a later step depends on an earlier
  answer (parameters and results travel as text), so the same messages go out in one write,
  with one Sync: one round trip.
- ``commit()`` and ``rollback()`` go through that same extended protocol. They take no
  parameters: the simple protocol does them in one round trip. The COMMIT of a read-only
  transaction (``BEGIN READ ONLY``, see ``_Tuned``) is not waited for at all: it cannot fail.
- It converts each statement's ``%s`` placeholders to ``$1`` by scanning the text character
  by character on every execute: about 0.25 ms for a small SELECT and tens of milliseconds
  for a 1000-row INSERT. SQLAlchemy sends the same few texts over and over, and the result
  depends on the text alone, so the converted text is cached.
- It parses every ``timestamptz`` with ``strptime``; ``fromisoformat`` reads PostgreSQL's
  output several times faster (pg8000's parser remains the fallback).
- It has no way to send a statement whose answer can wait. ``send_ahead`` queues one (an
  event's claim, ``web/events.py``) to go out after ``BEGIN`` in the same write as the
  transaction's next statement; its row count is checked once the answers are read.
- It leaves Nagle's algorithm on: a message that overflows its write buffer waits for the
  server's delayed ACK, about 40 ms, as in a large multi-row INSERT.

These replace private methods of pg8000, so they are applied only to the pg8000 versions
in ``TESTED_PG8000``, which the test suite has run against; with any other version, or with
``DB_DRIVER_TUNING=false``, connections are pg8000's own (``db/engine.py`` decides).
"""

from __future__ import annotations

import contextlib
import functools
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from importlib.metadata import version
from typing import Any

import pg8000.converters
import pg8000.core
import pg8000.legacy

TESTED_PG8000 = ("1.31.6",)
TIMESTAMPTZ_OID = 1184
_CACHED_FORMAT = "format (cached)"  # the paramstyle of tuned cursors
_convert_paramstyle = pg8000.legacy.convert_paramstyle
_core = pg8000.core.CoreConnection


def installed_version() -> str:
    """The installed pg8000's version."""
    return version("pg8000")


def is_tested() -> bool:
    """Whether the installed pg8000 is one this tuning was tested with."""
    return installed_version() in TESTED_PG8000


@functools.lru_cache(maxsize=1024)
def _converted(query: str) -> str:
    return str(_convert_paramstyle("format", query, ())[0])


def _dispatch_convert_paramstyle(style: str, query: str, args: Any) -> tuple[str, Any]:
    if style == _CACHED_FORMAT:
        return _converted(query), args
    return _convert_paramstyle(style, query, args)  # type: ignore[no-any-return]


def _timestamptz(text: str) -> datetime | str:
    try:
        return datetime.fromisoformat(text)
    except ValueError:  # infinity, years past 9999, and other forms pg8000 knows
        return pg8000.converters.timestamptz_in(text)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class _Ahead:
    """A statement sent ahead of the next one; ``check`` is given its row count."""

    statement: str
    values: tuple[Any, ...]
    check: Callable[[int], None]


class _Tuned:
    """The tuned behaviour of one pg8000 connection: its deferred BEGIN and its sends.

    ``begin`` opens each transaction (``BEGIN; SET LOCAL ...``); set ``read_only`` before a
    transaction's first statement to open it ``READ ONLY``. The COMMIT of a read-only
    transaction is sent without waiting for its answer, which is read before the connection's
    next answer: the server refuses every write in such a transaction, so its COMMIT has
    nothing to fail on, and the caller can have its rows one round trip sooner.
    """

    def __init__(self, connection: Any, begin: str) -> None:
        self.connection = connection
        self.begin = begin
        self.begin_read_only = begin.replace("BEGIN", "BEGIN READ ONLY", 1)
        self.begin_pending = False
        self.read_only = False  # for the next transaction
        self.began_read_only = False  # the current transaction's BEGIN said READ ONLY
        self.unread_commits = 0
        self.ahead: list[_Ahead] = []

    def send_ahead(
        self, statement: str, values: tuple[Any, ...], check: Callable[[int], None]
    ) -> None:
        """Send ``statement`` (``$1`` placeholders, text parameters, no rows) right after the
        transaction's ``BEGIN``, in the same write as its next statement, with a Sync of its
        own: an error in it fails that next statement too. Once both answers are read,
        ``check`` gets its row count and may raise, ending the statement it travelled with.

        Only before the transaction's first statement has reached the server.
        """
        if self.connection._in_transaction and not self.begin_pending:
            raise RuntimeError("send_ahead needs a transaction the server has not seen yet")
        self.ahead.append(_Ahead(statement, values, check))

    def execute_simple(self, statement: str) -> Any:
        connection = self.connection
        if statement == "begin transaction":  # pg8000's implicit BEGIN: sent with what follows
            self.begin_pending = True
            connection._transaction_status = pg8000.core.IN_TRANSACTION
            return pg8000.core.Context(statement)
        context = pg8000.core.Context(statement)
        began = self._send_begin()
        ahead = self._send_ahead()
        connection.send_QUERY(statement)
        pg8000.core._flush(connection._sock)
        self._receive(began, context, ahead)
        return context

    def execute_unnamed(
        self, statement: str, vals: Any = (), oids: Any = (), stream: Any = None
    ) -> Any:
        connection = self.connection
        if stream is not None:  # COPY keeps pg8000's own path
            self.flush()
            return _core.execute_unnamed(connection, statement, vals, oids, stream)
        # Encode first: a value that cannot be sent must fail before anything is written.
        params = pg8000.converters.make_params(connection.py_types, vals)
        context = pg8000.core.Context(statement)
        began = self._send_begin()
        ahead = self._send_ahead()
        connection.send_PARSE(pg8000.core.NULL_BYTE, statement, oids)
        connection.send_DESCRIBE_STATEMENT(pg8000.core.NULL_BYTE)
        connection.send_BIND(pg8000.core.NULL_BYTE, params)
        connection.send_EXECUTE()
        pg8000.core._write(connection._sock, pg8000.core.SYNC_MSG)
        pg8000.core._flush(connection._sock)
        self._receive(began, context, ahead)
        return context

    def commit(self) -> None:
        if self._forget_begin():
            return
        if self.began_read_only:
            self.began_read_only = False
            self.connection.send_QUERY("commit")
            pg8000.core._flush(self.connection._sock)
            self.unread_commits += 1
            self.connection._transaction_status = pg8000.core.IDLE
            return
        self._read_commits()
        _core.execute_simple(self.connection, "commit")

    def rollback(self) -> None:
        self.began_read_only = False
        if self._forget_begin() or not self.connection._in_transaction:
            return  # as after a COMMIT not waited for: its answer is read with the next one
        self._read_commits()
        _core.execute_simple(self.connection, "rollback")

    def _send_begin(self) -> bool:
        """Queue the pending BEGIN ahead of the next statement; whether there was one."""
        if not self.begin_pending:
            return False
        self.begin_pending = False
        self.began_read_only, self.read_only = self.read_only, False
        self.connection.send_QUERY(self.begin_read_only if self.began_read_only else self.begin)
        return True

    def _send_ahead(self) -> list[tuple[_Ahead, Any]]:
        """Queue the statements sent ahead, each with its own Sync; them and their contexts."""
        sent, self.ahead = self.ahead, []
        connection = self.connection
        contexts = []
        for item in sent:
            params = pg8000.converters.make_params(connection.py_types, item.values)
            connection.send_PARSE(pg8000.core.NULL_BYTE, item.statement, ())
            connection.send_BIND(pg8000.core.NULL_BYTE, params)
            connection.send_EXECUTE()
            pg8000.core._write(connection._sock, pg8000.core.SYNC_MSG)
            contexts.append((item, pg8000.core.Context(item.statement)))
        return contexts

    def flush(self) -> None:
        """Send the pending BEGIN and the statements sent ahead now, and read their answers."""
        if self.ahead and not self.connection._in_transaction:
            self.execute_simple("begin transaction")  # they belong in a transaction
        self._read_commits()
        began = self._send_begin()
        ahead = self._send_ahead()
        if not began and not ahead:
            return
        pg8000.core._flush(self.connection._sock)
        self._receive(began, None, ahead)

    def _read_commits(self) -> None:
        """Read the answers of COMMITs sent without waiting, which come before any other."""
        while self.unread_commits:
            self.unread_commits -= 1
            # A read-only transaction kept nothing that its COMMIT could lose: an error
            # here changes nothing; a dead connection shows in the read itself.
            with contextlib.suppress(pg8000.core.DatabaseError):
                self.connection.handle_messages(pg8000.core.Context("commit"))

    def _receive(
        self, began: bool, context: Any, ahead: list[tuple[_Ahead, Any]] | None = None
    ) -> None:
        """Read earlier COMMITs' answers, the BEGIN's if it was sent, those of the statements
        sent ahead, then the statement's; raise the first error, else let each statement
        sent ahead check its row count."""
        connection = self.connection
        self._read_commits()
        first_error = None
        earlier = [pg8000.core.Context(self.begin)] if began else []
        earlier += [sent for _, sent in ahead or ()]
        for sent in earlier:
            try:
                connection.handle_messages(sent)
            except pg8000.core.DatabaseError as error:
                first_error = first_error or error
        try:
            if context is not None:
                connection.handle_messages(context)
        except pg8000.core.DatabaseError:
            if first_error is None:
                raise
        if first_error is not None:
            raise first_error
        for item, sent in ahead or ():
            item.check(sent.row_count)

    def _forget_begin(self) -> bool:
        """End a transaction the server never saw; whether there was one."""
        self.read_only = False
        self.ahead = []
        if not self.begin_pending:
            return False
        self.begin_pending = False
        self.connection._transaction_status = pg8000.core.IDLE
        return True


def tune_connection(dbapi_connection: Any, begin: str) -> None:
    """Tune one new pg8000 connection (the module docstring lists how); ``begin`` is the
    statement that opens each of its transactions, e.g. ``BEGIN; SET LOCAL ...``."""
    pg8000.legacy.convert_paramstyle = _dispatch_convert_paramstyle
    sock = getattr(dbapi_connection, "_usock", None)
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    tuned = _Tuned(dbapi_connection, begin)
    dbapi_connection.tuned = tuned
    dbapi_connection.execute_simple = tuned.execute_simple
    dbapi_connection.execute_unnamed = tuned.execute_unnamed
    dbapi_connection.commit = tuned.commit
    dbapi_connection.rollback = tuned.rollback
    dbapi_connection.cursor = lambda: pg8000.legacy.Cursor(
        dbapi_connection, paramstyle=_CACHED_FORMAT
    )
    dbapi_connection.register_in_adapter(TIMESTAMPTZ_OID, _timestamptz)
