"""Database failures sorted by what they mean, by SQLSTATE rather than by exception class.

pg8000 raises ``ProgrammingError`` for a unique violation, an integer overflow and a
deadlock alike; only the SQLSTATE tells them apart. SQLite's error names are
translated to the matching SQLSTATE so both backends sort the same way.

Domain code turns a violated constraint into its own error with ``violation_of``, never by
catching a driver's exception class.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import ForeignKeyConstraint, MetaData, UniqueConstraint
from sqlalchemy import exc as sa_exc


class CommitOutcomeUnknown(Exception):
    """Raised when the connection was lost while COMMIT was under way.

    The transaction may or may not have been committed, so it is never retried blindly.
    """


class Failure(enum.Enum):
    """What a database error means for the request that met it."""

    UNIQUE_VIOLATION = "unique_violation"
    FOREIGN_KEY_VIOLATION = "foreign_key_violation"
    INVALID_DATA = "invalid_data"
    TRANSIENT = "transient"  # safe to retry the whole transaction
    UNAVAILABLE = "unavailable"  # the database cannot serve this request now
    SCHEMA_MISMATCH = "schema_mismatch"  # a table or column the code uses does not exist
    REFUSED = "refused"  # the database refuses this service: a setting is wrong, retrying won't do
    OTHER = "other"


_SQLITE_SQLSTATES = {
    "SQLITE_CONSTRAINT_UNIQUE": "23505",
    "SQLITE_CONSTRAINT_PRIMARYKEY": "23505",
    "SQLITE_CONSTRAINT_FOREIGNKEY": "23503",
    "SQLITE_CONSTRAINT_NOTNULL": "23502",
    "SQLITE_CONSTRAINT_CHECK": "23514",
    "SQLITE_TOOBIG": "22001",
    "SQLITE_BUSY": "55P03",
    "SQLITE_LOCKED": "55P03",
    "SQLITE_FULL": "53100",  # disk_full
    "SQLITE_IOERR": "58030",  # io_error
    "SQLITE_CANTOPEN": "58030",
    "SQLITE_READONLY": "25006",  # read_only_sql_transaction
}
# SQLite reports most mistakes in SQL as SQLITE_ERROR; its message tells them apart.
_SQLITE_ERROR_MESSAGES = {
    "no such table": "42P01",  # undefined_table
    "no such column": "42703",  # undefined_column
    "syntax error": "42601",  # syntax_error
}

_SCHEMA_SQLSTATES = {"42P01", "42703"}  # undefined_table, undefined_column

_REFUSED_SQLSTATES = {
    "28000",  # invalid_authorization_specification
    "28P01",  # invalid_password
    "3D000",  # invalid_catalog_name: no such database
    "42501",  # insufficient_privilege
}
# PgBouncer reports every refusal as 08P01 (protocol_violation), transient ones included
# (query_wait_timeout, max_client_conn): only these messages mean a setting is wrong.
_REFUSED_08P01 = re.compile(
    r"unsupported startup parameter|no such (database|user)|authentication failed"
    r"|login failed|(database|role) \S+ does not exist"
)

_UNAVAILABLE_SQLSTATES = {
    "53100",  # disk_full
    "58030",  # io_error
    "57014",  # query_canceled: statement_timeout
    "57P01",  # admin_shutdown
    "57P02",  # crash_shutdown
    "57P03",  # cannot_connect_now
    "55P03",  # lock_not_available
    "25P03",  # idle_in_transaction_session_timeout
}


def sqlstate(error: BaseException) -> str | None:
    """The SQLSTATE of a driver error, wrapped by SQLAlchemy or not."""
    orig = error.orig if isinstance(error, sa_exc.DBAPIError) else error
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], dict):  # pg8000: the server's error fields
        code = args[0].get("C")
        return code if isinstance(code, str) else None
    name = getattr(orig, "sqlite_errorname", None)
    if isinstance(name, str):
        # SQLite reports an ON DELETE RESTRICT violation as a trigger failure.
        if name == "SQLITE_CONSTRAINT_TRIGGER" and "FOREIGN KEY" in str(orig):
            return "23503"
        if name == "SQLITE_ERROR":
            message = str(orig)
            found = (code for text, code in _SQLITE_ERROR_MESSAGES.items() if text in message)
            return next(found, "XX000")  # internal_error
        # Extended codes (SQLITE_IOERR_WRITE, SQLITE_BUSY_SNAPSHOT) share their base's meaning;
        # the rest (a corrupt file, a database that is not one) will not pass by retrying.
        base = "_".join(name.split("_")[:2])
        return _SQLITE_SQLSTATES.get(name) or _SQLITE_SQLSTATES.get(base) or "XX000"
    return None


def classify(error: BaseException) -> Failure:
    """Sort an exception raised while talking to the database."""
    if isinstance(error, CommitOutcomeUnknown | sa_exc.TimeoutError | sa_exc.DisconnectionError):
        return Failure.UNAVAILABLE
    if lost_connection(error):
        return Failure.UNAVAILABLE
    if not isinstance(error, sa_exc.DBAPIError):
        return _google_api_failure(error)
    code = sqlstate(error)
    if code in ("40001", "40P01"):
        return Failure.TRANSIENT
    if code == "23505":
        return Failure.UNIQUE_VIOLATION
    if code == "23503":
        return Failure.FOREIGN_KEY_VIOLATION
    if code in _SCHEMA_SQLSTATES:
        return Failure.SCHEMA_MISMATCH
    if code in _REFUSED_SQLSTATES or (code == "08P01" and _REFUSED_08P01.search(str(error))):
        return Failure.REFUSED
    if code is not None and (code.startswith("22") or code in ("23502", "23514")):
        return Failure.INVALID_DATA
    if error.connection_invalidated or code in _UNAVAILABLE_SQLSTATES:
        return Failure.UNAVAILABLE
    if code is not None and code[:2] in ("08", "53"):  # connection exception, resources
        return Failure.UNAVAILABLE
    if code is None and isinstance(error, sa_exc.InterfaceError | sa_exc.OperationalError):
        return Failure.UNAVAILABLE  # pg8000 could not reach the server at all
    return Failure.OTHER


def _google_api_failure(error: BaseException) -> Failure:
    """Sort what the Cloud SQL connector raises when Google's APIs (the Admin API, the metadata
    server's tokens) refuse it or cannot be reached; it uses aiohttp, not imported here."""
    if not type(error).__module__.startswith("aiohttp"):
        return Failure.OTHER
    status = getattr(error, "status", None)
    if status in (401, 403, 404):  # the account lacks a role, or the instance's name is wrong
        return Failure.REFUSED
    return Failure.UNAVAILABLE  # a 5xx or 429, a time-out, a connection refused


# The server ends the session with one of these, or the network drops it: the connection is gone.
_GONE_SQLSTATES = {
    "57P01",  # admin_shutdown: a restart, or pg_terminate_backend
    "57P02",  # crash_shutdown
    "57P05",  # idle_session_timeout
}


def is_disconnect(error: BaseException) -> bool:
    """True when ``error`` (a driver's exception) means the connection can no longer be used.

    SQLAlchemy's pg8000 dialect knows pg8000's "network error"; the server ending the session
    (57P01 on a restart or pg_terminate_backend) and a reset socket (a bare ``OSError``) it
    does not.
    """
    orig = error.orig if isinstance(error, sa_exc.DBAPIError) else error
    if isinstance(orig, OSError):
        return True
    text = str(orig)
    if "network error" in text or "connection is closed" in text:
        return True
    code = sqlstate(error)
    if code == "08P01" and _REFUSED_08P01.search(text):
        return False  # refused at login: no connection was ever made
    return code in _GONE_SQLSTATES or (code is not None and code.startswith("08"))


def lost_connection(error: BaseException) -> bool:
    """True when the connection dropped: the server never saw the rest of the transaction.

    pg8000 wraps most socket errors in its InterfaceError, but a reset met on the first
    read of a message escapes as a bare ``OSError`` (``ConnectionResetError``), which
    SQLAlchemy does not recognise as a disconnect.
    """
    if isinstance(error, sa_exc.DBAPIError):
        return error.connection_invalidated
    return isinstance(error, OSError)


@contextmanager
def violation_of(*constraints: str, raises: Exception) -> Iterator[None]:
    """Raise ``raises`` when the block violates one of the unique or foreign-key
    ``constraints``, named as in the schema; any other database error passes unchanged::

        with violation_of("uq_users_email", raises=Conflict("this email is taken")):
            session.flush()

    pg8000 raises ``ProgrammingError`` for some violations and SQLAlchemy ``IntegrityError``
    for others, so catching a class would sort them by accident; this asks the database which
    constraint failed. SQLite names a unique constraint by its columns, and no foreign key at
    all: there, any foreign-key violation in the block counts as one of ``constraints``' own.
    """
    try:
        yield
    except sa_exc.DBAPIError as error:
        if violated(error, constraints):
            raise raises from error
        raise


def violated(error: BaseException, constraints: tuple[str, ...]) -> bool:
    """True when ``error`` is a unique or foreign-key violation of one of ``constraints``."""
    code = sqlstate(error)
    if code not in ("23505", "23503"):
        return False
    orig = error.orig if isinstance(error, sa_exc.DBAPIError) else error
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], dict):  # pg8000: the server names the constraint
        return args[0].get("n") in constraints
    known = _constraints()
    if code == "23503":
        return any(isinstance(known.get(name), ForeignKeyConstraint) for name in constraints)
    failed = str(orig).partition("constraint failed: ")[2]  # SQLite: "users.email, ..."
    return any(
        isinstance(constraint := known.get(name), UniqueConstraint)
        and failed == ", ".join(f"{col.table.name}.{col.name}" for col in constraint.columns)
        for name in constraints
    )


@functools.cache
def _constraints() -> dict[str, object]:
    """The models' named constraints."""
    from db.models import Base  # noqa: PLC0415  # needed only to read a SQLite error

    metadata: MetaData = Base.metadata
    return {
        str(constraint.name): constraint
        for table in metadata.tables.values()
        for constraint in table.constraints
        if constraint.name
    }
