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
  transaction's next statement; ``send_with_next`` one (an outbox row, ``db/outbox.py``) to go
  with the next statement or the ``COMMIT``. Its row count is checked once the answers are
  read. ``send_unwaited`` sends one between transactions, in a transaction of its own, and
  reads its answer with the connection's next (events marked published after their publish).
- It reads each answer message in two calls of a buffered file (header, then body): about 26
  calls for a small transaction. Here the messages already in the buffer are parsed in
  place, and the buffer advanced once for all of them; a message larger than the buffer still
  goes pg8000's way.
- Its ``executemany`` runs one statement per parameter set, each waited for: the ORM's update
  of a transfer's two balances took two round trips. Here the sets go in one write, with one
  Sync (in groups of 50).
- It decodes each answer's row description (column names and types) anew, though the same
  statement always gets the same one; here each connection keeps the last few it decoded.
- It leaves Nagle's algorithm on: a message that overflows its write buffer waits for the
  server's delayed ACK, about 40 ms, as in a large multi-row INSERT.

These replace private methods of pg8000, so they are applied only to the pg8000 versions
in ``TESTED_PG8000``, which the test suite has run against; with any other version, or with
``DB_DRIVER_TUNING=false``, connections are pg8000's own (``db/engine.py`` decides).

One mend is not tuning and applies with ``DB_DRIVER_TUNING=false`` too (``mend_close``):
pg8000's ``close`` closes the socket but only drops the file it reads and writes through, and
when the connection is already gone (writing its goodbye fails) that file, still holding the
goodbye, is collected late and the socket's descriptor with it: on Python 3.13, as an unclosed
socket at some later garbage collection.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import struct
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
_READY_FOR_QUERY = pg8000.core.READY_FOR_QUERY
_LENGTH = struct.Struct("!i")
_COUNT = struct.Struct("!H")
_NUL = b"\x00"
_NULL_VALUE = _LENGTH.pack(-1)
_ROW_DESCRIPTIONS_KEPT = 256


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


def _buffered(sock: Any) -> bytes:
    """What the connection's read buffer holds, after one read of the socket if it held
    nothing (``pg8000.core._read``'s errors for a lost connection)."""
    try:
        buffered: bytes = sock.peek(1)
    except OSError as error:
        raise pg8000.core.InterfaceError("network error") from error
    if not buffered:
        raise pg8000.core.InterfaceError("network error")
    return buffered


def _message(code: bytes, data: bytes) -> bytes:
    return code + _LENGTH.pack(len(data) + 4) + data


def _parse(sql: str, oids: tuple[int, ...], encoding: str) -> bytes:
    """The Parse message of an unnamed statement."""
    data = bytearray(_NUL + sql.encode(encoding) + _NUL)
    data += _COUNT.pack(len(oids))
    for oid in oids:
        data += _LENGTH.pack(0 if oid == -1 else oid)
    return _message(b"P", bytes(data))


# SQLAlchemy sends the same few statements over and over: their Parse messages are kept, but
# not those of long texts (a multi-row INSERT), whose encoding is a small part of their cost.
_kept_parse = functools.lru_cache(maxsize=256)(_parse)
_PARSE_KEPT_UP_TO = 2048  # characters
_DESCRIBE_STATEMENT = _message(b"D", b"S" + _NUL)


class _Batch:
    """Protocol messages for one write, without the Flush that pg8000 puts after each: the
    server then answers the whole batch in one go, at its Sync, rather than message by
    message (one segment to read instead of four or five)."""

    def __init__(self, connection: Any) -> None:
        self.encoding = connection._client_encoding
        self.parts: list[bytes] = []

    def _add(self, code: bytes, data: bytes) -> None:
        self.parts.append(_message(code, data))

    def query(self, sql: str) -> None:
        """A simple-protocol Query: it ends with its own ReadyForQuery."""
        self._add(b"Q", sql.encode(self.encoding) + _NUL)

    def statement(
        self, sql: str, params: Any = (), oids: Any = (), *, describe: bool = False
    ) -> None:
        """Parse, (Describe,) Bind and Execute an unnamed statement; its answers go to the
        context of the Sync that follows."""
        if len(sql) <= _PARSE_KEPT_UP_TO:
            self.parts.append(_kept_parse(sql, tuple(oids), self.encoding))
        else:
            self.parts.append(_parse(sql, tuple(oids), self.encoding))
        if describe:
            self.parts.append(_DESCRIBE_STATEMENT)
        self.execute_again(params)

    def execute_again(self, params: Any) -> None:
        """Bind and Execute the statement last parsed, with other parameters."""
        bind = bytearray(_NUL + _NUL + _COUNT.pack(0) + _COUNT.pack(len(params)))
        for value in params:
            if value is None:
                bind += _NULL_VALUE
            else:
                encoded = value.encode(self.encoding)
                bind += _LENGTH.pack(len(encoded))
                bind += encoded
        bind += _COUNT.pack(0)
        self._add(b"B", bytes(bind))
        self.parts.append(pg8000.core.EXECUTE_MSG)

    def sync(self) -> None:
        self.parts.append(pg8000.core.SYNC_MSG)

    @classmethod
    def encoded(cls, connection: Any, statements: tuple[str, ...]) -> bytes:
        """The messages of ``statements`` (no parameters, no Sync), as one piece."""
        batch = cls(connection)
        for statement in statements:
            batch.statement(statement)
        return b"".join(batch.parts)

    def send(self, sock: Any) -> None:
        pg8000.core._write(sock, b"".join(self.parts))
        pg8000.core._flush(sock)


class _Tuned:
    """The tuned behaviour of one pg8000 connection: its deferred BEGIN and its sends.

    ``begin`` are the statements that open each transaction (``BEGIN``, then ``SET LOCAL``
    ones); set ``read_only`` before a transaction's first statement to open it ``READ ONLY``.
    The COMMIT of a read-only transaction is sent without waiting for its answer, which is read
    before the connection's next answer: the server refuses every write in such a transaction,
    so its COMMIT has nothing to fail on, and the caller can have its rows one round trip
    sooner.
    """

    def __init__(self, connection: Any, begin: tuple[str, ...]) -> None:
        if not begin or begin[0] != "BEGIN":
            raise ValueError("the statements that open a transaction start with BEGIN")
        self.connection = connection
        self.begin = begin
        # The same few messages open every transaction: encoded once, for either kind.
        self.opening = {
            read_only: _Batch.encoded(connection, statements)
            for read_only, statements in ((False, begin), (True, ("BEGIN READ ONLY", *begin[1:])))
        }
        self.begin_pending = False
        self.read_only = False  # for the next transaction
        self.began_read_only = False  # the current transaction's BEGIN said READ ONLY
        self.unread_answers = 0
        self.ahead: list[_Ahead] = []
        self.more_parameter_sets: list[Any] = []  # see _Cursor.executemany
        self.row_descriptions: dict[bytes, tuple[Any, Any]] = {}

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

    def send_with_next(
        self, statement: str, values: tuple[Any, ...], check: Callable[[int], None]
    ) -> None:
        """Send ``statement`` as ``send_ahead`` does, at any point of a transaction: in the
        same write as the transaction's next statement, or as its ``COMMIT``, whichever comes
        first. An error in it fails that statement, or the commit (the server then rolls the
        transaction back)."""
        if not self.connection._in_transaction:
            self.execute_simple("begin transaction")  # as pg8000 does before a statement
        self.ahead.append(_Ahead(statement, values, check))

    def send_unwaited(self, statement: str, values: tuple[Any, ...]) -> None:
        """Send ``statement`` (``$1`` placeholders, text parameters) to run in a transaction of
        its own, without waiting for its answer, which is read before the connection's next
        one, as a read-only transaction's COMMIT is: for a statement whose outcome nothing
        waits on (events marked published, which the relay publishes again should the mark be
        lost). Only between transactions."""
        if self.connection._in_transaction or self.ahead:
            raise RuntimeError("send_unwaited goes between transactions")
        batch = _Batch(self.connection)
        batch.statement(statement, pg8000.converters.make_params(self.connection.py_types, values))
        batch.sync()
        batch.send(self.connection._sock)
        self.unread_answers += 1

    def execute_simple(self, statement: str) -> Any:
        connection = self.connection
        if statement == "begin transaction":  # pg8000's implicit BEGIN: sent with what follows
            self.begin_pending = True
            connection._transaction_status = pg8000.core.IN_TRANSACTION
            return pg8000.core.Context(statement)
        context = pg8000.core.Context(statement)
        batch = _Batch(connection)
        earlier = self._open(batch)
        batch.query(statement)
        batch.send(connection._sock)
        self._receive(earlier, context)
        return context

    def execute_unnamed(
        self, statement: str, vals: Any = (), oids: Any = (), stream: Any = None
    ) -> Any:
        connection = self.connection
        if stream is not None:  # COPY keeps pg8000's own path
            self.flush()
            return _core.execute_unnamed(connection, statement, vals, oids, stream)
        more, self.more_parameter_sets = self.more_parameter_sets, []
        # Encode first: a value that cannot be sent must fail before anything is queued.
        py_types = connection.py_types
        params = pg8000.converters.make_params(py_types, vals)
        own = _Batch(connection)
        own.statement(statement, params, oids, describe=True)
        for other in more:
            own.execute_again(pg8000.converters.make_params(py_types, other))
        own.sync()
        context = pg8000.core.Context(statement)
        batch = _Batch(connection)
        earlier = self._open(batch, synced=True)
        batch.parts += own.parts
        batch.send(connection._sock)
        self._receive(earlier, context)
        return context

    def commit(self) -> None:
        if self.ahead:
            self._commit_with_ahead()
            return
        if self._forget_begin():
            return
        if self.began_read_only:
            self.began_read_only = False
            batch = _Batch(self.connection)
            batch.query("commit")
            batch.send(self.connection._sock)
            self.unread_answers += 1
            self.connection._transaction_status = pg8000.core.IDLE
            return
        self._read_unwaited()
        _core.execute_simple(self.connection, "commit")

    def _commit_with_ahead(self) -> None:
        """COMMIT in the same write as the statements still to send; their errors first."""
        self._read_unwaited()
        self.began_read_only = False
        batch = _Batch(self.connection)
        earlier = self._open(batch)
        batch.query("commit")
        batch.send(self.connection._sock)
        self._receive(earlier, pg8000.core.Context("commit"))

    def rollback(self) -> None:
        self.began_read_only = False
        if self._forget_begin() or not self.connection._in_transaction:
            return  # as after a COMMIT not waited for: its answer is read with the next one
        self._read_unwaited()
        _core.execute_simple(self.connection, "rollback")

    def _open(self, batch: _Batch, *, synced: bool = False) -> list[tuple[_Ahead | None, Any]]:
        """Queue the pending BEGIN and its settings, then the statements sent ahead (each with
        its own Sync); the contexts their answers go to, in order.

        The BEGIN's answers go to the context of the next Sync: a statement sent ahead's, or,
        with ``synced``, the statement queued after these. Otherwise a Sync of its own ends it.
        """
        earlier: list[tuple[_Ahead | None, Any]] = []
        if self.begin_pending:
            self.begin_pending = False
            self.began_read_only, self.read_only = self.read_only, False
            batch.parts.append(self.opening[self.began_read_only])
            if not self.ahead and not synced:
                batch.sync()
                earlier.append((None, pg8000.core.Context(self.begin[0])))
        sent, self.ahead = self.ahead, []
        for item in sent:
            params = pg8000.converters.make_params(self.connection.py_types, item.values)
            batch.statement(item.statement, params)
            batch.sync()
            earlier.append((item, pg8000.core.Context(item.statement)))
        return earlier

    def flush(self) -> None:
        """Send the pending BEGIN and the statements sent ahead now, and read their answers."""
        if self.ahead and not self.connection._in_transaction:
            self.execute_simple("begin transaction")  # they belong in a transaction
        self._read_unwaited()
        batch = _Batch(self.connection)
        earlier = self._open(batch)
        if not earlier:
            return
        batch.send(self.connection._sock)
        self._receive(earlier, None)

    def handle_row_description(self, data: bytes, context: Any) -> None:
        """pg8000's handler of a RowDescription, remembering what it decoded. The columns and
        conversions are shared by the contexts of a statement, which only read them."""
        known = self.row_descriptions.get(data)
        if known is None:
            _core.handle_ROW_DESCRIPTION(self.connection, data, context)
            if len(self.row_descriptions) >= _ROW_DESCRIPTIONS_KEPT:
                self.row_descriptions.clear()
            self.row_descriptions[data] = (context.columns, context.input_funcs)
            return
        context.columns, context.input_funcs = known
        if context.rows is None:
            context.rows = []

    def handle_messages(self, context: Any) -> None:
        """pg8000's ``handle_messages``: dispatch each answer message to the connection's
        handlers until ReadyForQuery, then raise the error the answer carried, if any."""
        connection = self.connection
        sock = connection._sock
        handlers = connection.message_types
        unpack_length = _LENGTH.unpack_from
        code = None
        while code != _READY_FOR_QUERY:
            buffered = _buffered(sock)
            end, done = len(buffered), 0
            try:
                while done + 5 <= end and code != _READY_FOR_QUERY:
                    start = done
                    stop = start + 1 + unpack_length(buffered, start + 1)[0]
                    if stop > end:
                        break
                    code, done = buffered[start : start + 1], stop
                    handlers[code](buffered[start + 5 : stop], context)
            finally:
                if done:
                    sock.read(done)  # from the buffer: no system call
            if not done:  # a message larger than what is buffered
                code, length = pg8000.core.ci_unpack(pg8000.core._read(sock, 5))
                handlers[code](pg8000.core._read(sock, length - 4), context)
        if context.error is not None:
            raise context.error

    def _read_unwaited(self) -> None:
        """Read the answers of what was sent without waiting (a read-only transaction's COMMIT,
        ``send_unwaited``), which come before any other."""
        while self.unread_answers:
            self.unread_answers -= 1
            # Nothing sent so depends on its outcome: an error here changes nothing; a dead
            # connection shows in the read itself.
            with contextlib.suppress(pg8000.core.DatabaseError):
                self.connection.handle_messages(pg8000.core.Context("unwaited"))

    def _receive(self, earlier: list[tuple[_Ahead | None, Any]], context: Any) -> None:
        """Read the answers of what was sent without waiting, then those of ``earlier`` (the
        BEGIN's, statements sent ahead) and the statement's; raise the first error, else let
        each statement sent ahead check its row count."""
        connection = self.connection
        self._read_unwaited()
        first_error = None
        for _, sent in earlier:
            try:
                connection.handle_messages(sent)
            except pg8000.core.DatabaseError as error:
                first_error = first_error or error
        try:
            if context is not None:
                connection.handle_messages(context)
        except (pg8000.core.DatabaseError, pg8000.core.InterfaceError):
            # The server's answer to the statement after a failed one (pg8000 calls a COMMIT
            # that rolled back "in failed transaction block") yields to the first failure; a
            # lost connection, raised by the read itself, does not.
            if first_error is None or context.error is None:
                raise
        if first_error is not None:
            raise first_error
        for item, sent in earlier:
            if item is not None:
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


class _Cursor(pg8000.legacy.Cursor):  # type: ignore[misc]
    """A cursor whose ``executemany`` sends the parameter sets together, up to
    ``SETS_PER_WRITE`` in one write with one Sync: one round trip for each such group (pg8000
    waits for each set). The server stops at the first error and skips the rest; the row count
    is the sum, as pg8000's.

    The groups are bounded because nothing is read until a group is written: the answers of an
    unbounded one could fill the socket's buffers both ways and leave client and server each
    waiting for the other.
    """

    SETS_PER_WRITE = 50

    def executemany(self, operation: str, param_sets: Any) -> Any:
        sets = list(param_sets)
        if len(sets) < 2 or any(len(values) == 0 for values in sets):
            return super().executemany(operation, sets)  # no parameters: the simple protocol
        tuned = self._c.tuned
        row_count = 0
        for start in range(0, len(sets), self.SETS_PER_WRITE):
            group = sets[start : start + self.SETS_PER_WRITE]
            # The statement text is the same for every set; pg8000's execute sends the first
            # set, and the tuned execute_unnamed adds the others behind it.
            tuned.more_parameter_sets = [
                _dispatch_convert_paramstyle(self.paramstyle, operation, values)[1]
                for values in group[1:]
            ]
            try:
                self.execute(operation, group[0])
            finally:
                tuned.more_parameter_sets = []
            row_count = (
                -1
                if -1 in (row_count, self._context.row_count)
                else (row_count + self._context.row_count)
            )
        self._context.row_count = row_count
        return self


def _close(connection: Any) -> None:
    """pg8000's ``close``, which also closes the connection's file, whatever happens."""
    sock, file = connection._usock, connection._sock
    if sock is None:
        raise pg8000.core.InterfaceError("connection is closed")
    try:
        file.write(pg8000.core.TERMINATE_MSG)
        file.flush()
    except OSError as error:
        raise pg8000.core.InterfaceError("network error") from error
    finally:
        connection._sock = connection._usock = None
        with contextlib.suppress(OSError, ValueError):  # the goodbye it could not send
            file.close()
        sock.close()


def mend_close() -> None:
    """Make every pg8000 connection close its file with its socket (module docstring)."""
    _core.close = _close


def tune_connection(dbapi_connection: Any, begin: tuple[str, ...]) -> None:
    """Tune one new pg8000 connection (the module docstring lists how); ``begin`` are the
    statements that open each of its transactions: ``BEGIN``, then ``SET LOCAL ...``."""
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
    dbapi_connection.handle_messages = tuned.handle_messages
    dbapi_connection.message_types[pg8000.core.ROW_DESCRIPTION] = tuned.handle_row_description
    register = dbapi_connection.register_in_adapter

    def register_in_adapter(oid: int, function: Any) -> None:
        tuned.row_descriptions.clear()  # their conversions may have changed
        register(oid, function)

    dbapi_connection.register_in_adapter = register_in_adapter
    dbapi_connection.cursor = lambda: _Cursor(dbapi_connection, paramstyle=_CACHED_FORMAT)
    dbapi_connection.register_in_adapter(TIMESTAMPTZ_OID, _timestamptz)
