"""One engine per instance, built on first use, safe under concurrent first requests."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import socket
import ssl
import threading
import time
from types import FrameType
from typing import Any

from sqlalchemy import Engine, create_engine, event, orm
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session
from sqlalchemy.pool import ConnectionPoolEntry, QueuePool

from db import driver
from db.config import Settings
from db.errors import is_disconnect
from db.outage import describe, outages
from db.pubsub import Publisher

# How long a connection may sit in the pool before it is checked on its way out: long
# enough that a busy instance never pays for the check, short enough that a connection a
# server restart or a network timeout took while the instance idled is caught before use.
PING_AFTER_IDLE_SECONDS = 10.0

log = logging.getLogger(__name__)


class Database:
    """An instance's engine, session factory, Cloud SQL connector and Pub/Sub publisher, for
    validated settings.

    Nothing is built or connected until first use; ``dispose()`` returns the
    instance to that state. Each deployed function process holds one.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._engine: Engine | None = None
        self._sessionmaker: orm.sessionmaker[Session] | None = None
        self._connector: Any = None
        self._publisher: Publisher | None = None

    @property
    def engine(self) -> Engine:
        """The engine, built on first access."""
        return self._built()[0]

    @property
    def sessionmaker(self) -> orm.sessionmaker[Session]:
        """The session factory, bound to the engine and living as long as it."""
        return self._built()[1]

    @property
    def publisher(self) -> Publisher | None:
        """The Pub/Sub publisher of the outbox, built on first use; None without Pub/Sub."""
        if self._publisher is None and self.settings.pubsub is not None:
            with self._lock:
                if self._publisher is None:
                    self._publisher = Publisher(self.settings.pubsub)
        return self._publisher

    @property
    def is_built(self) -> bool:
        """Whether the engine exists (for diagnostics and tests)."""
        return self._engine is not None

    def dispose(self) -> None:
        """Close every pooled connection and the connector; the next use builds anew."""
        with self._lock:
            engine, connector, publisher = self._engine, self._connector, self._publisher
            self._engine = self._sessionmaker = self._connector = self._publisher = None
        if publisher is not None:
            publisher.close()
        if engine is not None:
            engine.dispose()
        if connector is not None:
            from db.cloudsql import close_connector  # noqa: PLC0415  # loaded only on this path

            close_connector(connector)
        if engine is not None:
            log.info("database disposed")

    def dispose_on_shutdown(self) -> None:
        """Dispose at interpreter exit and on SIGTERM; SIGTERM then does what it did before.

        gunicorn (functions-framework's server) installs its own SIGTERM handler in each
        worker after loading the app and exits the worker through ``sys.exit``: there the
        exit hook does the work.
        """
        atexit.register(self.dispose)
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            self.dispose()
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)

        signal.signal(signal.SIGTERM, on_sigterm)

    def _built(self) -> tuple[Engine, orm.sessionmaker[Session]]:
        engine, factory = self._engine, self._sessionmaker
        if engine is None or factory is None:
            with self._lock:
                if self._engine is None or self._sessionmaker is None:
                    self._build()
                engine, factory = self._engine, self._sessionmaker
        assert engine is not None
        assert factory is not None
        return engine, factory

    def _build(self) -> None:
        settings = self.settings
        if settings.is_embedded:
            engine = _sqlite_engine(settings)
            from db.migrate import upgrade  # noqa: PLC0415  # Alembic loads only where it runs

            upgrade(engine)
        else:
            engine, self._connector = _postgresql_engine(settings)
        event.listen(engine, "invalidate", _note_lost_connection)
        event.listen(engine, "handle_error", _recognize_lost_connection)
        event.listen(engine, "checkin", _note_idle_since)
        event.listen(engine, "checkout", _check_if_idle_long)
        log.info("engine built", extra={"database": engine.url.render_as_string()})
        # The session closes right after its COMMIT (db/session.py): expiring every object it
        # loaded, to reload them on next access, would be work for nothing.
        self._sessionmaker = orm.sessionmaker(bind=engine, expire_on_commit=False)
        if not settings.is_embedded:  # SQLite has no read-only transactions
            event.listen(self._sessionmaker, "after_begin", _begin_read_only)
        self._engine = engine


def _begin_read_only(session: Session, _transaction: Any, connection: Any) -> None:
    """Open the transaction of a session marked ``info["read_only"]`` read-only, before its
    first statement."""
    if not session.info.get("read_only"):
        return
    tuned = getattr(connection.connection.dbapi_connection, "tuned", None)
    if tuned is not None:
        tuned.read_only = True  # BEGIN READ ONLY, in the same write as the first statement
    else:
        connection.exec_driver_sql("SET TRANSACTION READ ONLY")


def _recognize_lost_connection(context: Any) -> None:
    """Teach SQLAlchemy the ways pg8000 reports a connection that is gone, so the pool drops it
    and the connections opened before it, and the transaction is retried in a new one."""
    if is_disconnect(context.original_exception):
        context.is_disconnect = True


def _note_idle_since(_dbapi: Any, record: Any) -> None:
    record.info["idle_since"] = time.monotonic()


def _check_if_idle_long(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    """Ping a connection that sat in the pool long enough to have been dropped.

    A connection in steady use is not pinged: that would cost a round trip per request, and
    one found dead at its first statement costs no more, since a transaction whose connection
    was lost before COMMIT is retried on a new one (db/session.py).
    """
    idle_since = record.info.get("idle_since")
    if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_SECONDS:
        return
    try:
        cursor = dbapi_connection.cursor()
        cursor.execute("SELECT 1")
        cursor.close()
    except Exception as error:
        if not is_disconnect(error):
            raise
        dropped = sa_exc.DisconnectionError(f"dropped while idle in the pool ({describe(error)})")
        dropped.invalidate_pool = True  # a restart or failover took the others with it
        raise dropped from error


def _note_lost_connection(_dbapi: Any, _record: Any, exception: BaseException | None) -> None:
    """The pool discards a connection the server or network dropped: one line, or a count."""
    if exception is not None:
        outages.failure(f"a connection was lost ({describe(exception)})")


class IdleFirstPool(QueuePool):
    """A ``QueuePool`` whose queue holds only entries with an open connection.

    SQLAlchemy puts an entry back in the queue after its connection was lost, invalidated or
    refused, with no connection in it, and checkouts take the queue in order: an instance
    holding idle connections would try to open a new one about every other request, and on
    a server at its connection limit answer 503 while connections sat idle. Here such an
    entry is dropped instead, freeing its place: a new connection is opened only when no
    idle one is left.
    """

    # Log as SQLAlchemy's own pool does, under the logger it keeps at WARNING.
    _sqla_logger_namespace = "sqlalchemy.pool.impl.QueuePool"

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        if record.dbapi_connection is None:
            self._dec_overflow()
            return
        super()._do_return_conn(record)


def _pool_arguments(settings: Settings) -> dict[str, Any]:
    return {
        "poolclass": IdleFirstPool,
        "pool_size": settings.pool_size,
        "max_overflow": settings.max_overflow,
        "pool_timeout": settings.pool_timeout,
        "pool_recycle": settings.pool_recycle,
        # Bound parameters hold user data: keep them out of exception messages and logs.
        "hide_parameters": True,
    }


def _postgresql_engine(settings: Settings) -> tuple[Engine, Any]:
    connect_args: dict[str, Any] = {
        # A socket read never outlives the statement it waits for by much.
        "timeout": settings.statement_timeout + 10,
        # Names the function in pg_stat_activity; Cloud Run sets K_SERVICE.
        "application_name": os.environ.get("K_SERVICE", "cloud-function")[:63],
    }
    connector = None
    if settings.cloud_sql is None:
        engine = create_engine(settings.url, connect_args=connect_args, **_pool_arguments(settings))
        if settings.password_file:

            @event.listens_for(engine, "do_connect")
            def _password_as_it_is_now(_d: Any, _r: Any, _a: Any, cparams: dict[str, Any]) -> None:
                cparams["password"] = settings.password()  # a rotated one, at its next connect

        event.listen(engine, "do_connect", _TlsNegotiation(settings.ssl_mode).connect)
    else:
        from db.cloudsql import connector_creator  # noqa: PLC0415  # Google's client loads only here

        creator, connector = connector_creator(settings.cloud_sql, connect_args, settings.password)
        engine = create_engine(settings.url, creator=creator, **_pool_arguments(settings))
    _set_timeouts_per_transaction(engine, settings)
    return engine, connector


def transaction_settings(settings: Settings) -> tuple[str, ...]:
    """The ``SET LOCAL`` statements of the server-side timeouts, for the start of every
    transaction.

    They travel with each transaction rather than in the connection's startup packet:
    a transaction-mode pooler (PgBouncer, Cloud SQL's Managed Connection Pooling) refuses
    startup parameters it does not know, and would not keep session settings between the
    transactions it hands to different server connections. A frozen or killed instance
    cannot hold locks longer than these.
    """
    statement = int(settings.statement_timeout * 1000)
    idle = int(settings.idle_in_transaction_timeout * 1000)
    return (
        f"SET LOCAL statement_timeout = {statement}",
        f"SET LOCAL idle_in_transaction_session_timeout = {idle}",
    )


def _set_timeouts_per_transaction(engine: Engine, settings: Settings) -> None:
    # Each new connection is set up ahead of SQLAlchemy's own first queries on it (insert=True):
    # an instance frozen during those holds a transaction the idle timeout still ends.
    begin = ("BEGIN", *transaction_settings(settings))
    if driver.is_tested():
        driver.mend_close()
    if settings.driver_tuning and driver.is_tested():
        # The settings ride in the same write as BEGIN and the first statement: no round trip.
        event.listen(
            engine,
            "connect",
            lambda dbapi, _record: driver.tune_connection(dbapi, begin),
            insert=True,
        )
        return
    if settings.driver_tuning:
        log.warning(
            "pg8000 %s has not been tested with this service's tuning (db/driver.py, tested: "
            "%s); running it as installed",
            driver.installed_version(),
            ", ".join(driver.TESTED_PG8000),
        )
    set_local = "; ".join(begin[1:])

    @event.listens_for(engine, "connect", insert=True)
    def _open_with_settings(dbapi_connection: Any, _record: Any) -> None:
        # Opens the connection's first transaction, which its first checkout goes on with.
        cursor = dbapi_connection.cursor()
        cursor.execute(set_local)
        cursor.close()

    @event.listens_for(engine, "begin")
    def _set_local(connection: Any) -> None:
        # pg8000 sends its own BEGIN first; these are one more round trip.
        connection.exec_driver_sql(set_local)


class _TlsNegotiation:
    """TLS for one server, decided once per engine.

    Left to itself, pg8000 builds a new SSL context (loading the CA bundle) on every
    connect. Here the context is built once, and loads the CA bundle only for the modes that
    verify the server's certificate (loading it takes about 30 ms of a cold start); with
    ``prefer`` or ``allow`` (libpq's default, and pg8000's), the first connection learns
    whether the server speaks TLS and the following ones go straight to it or straight to
    plaintext.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.context: ssl.SSLContext | bool = False
        if mode in ("allow", "prefer", "require"):  # encrypted, the certificate not checked
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            self.context.check_hostname = False
            self.context.verify_mode = ssl.CERT_NONE
        elif mode in ("verify-ca", "verify-full"):
            self.context = ssl.create_default_context()
            self.context.check_hostname = mode == "verify-full"
        self.server_refused = False

    def connect(self, dialect: Any, _record: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
        if self.mode in ("allow", "prefer") and self.server_refused:
            return _connect(dialect, cargs, cparams, ssl_context=False)
        try:
            return _connect(dialect, cargs, cparams, ssl_context=self.context)
        except dialect.loaded_dbapi.InterfaceError as error:
            if self.mode not in ("allow", "prefer") or "refuses SSL" not in str(error):
                raise
        self.server_refused = True
        return _connect(dialect, cargs, cparams, ssl_context=False)


def _connect(dialect: Any, cargs: Any, cparams: dict[str, Any], ssl_context: Any) -> Any:
    """pg8000's connect on a socket opened here, and closed here if the connect fails.

    pg8000 does not close its socket when the server resets it during the TLS request (as a
    restarting server does), which leaves it to the garbage collector.
    """
    address = (cparams.get("host", "localhost"), cparams.get("port", 5432))
    try:
        sock = socket.create_connection(address, cparams.get("timeout"))
    except OSError as error:  # reported as pg8000 reports it
        raise dialect.loaded_dbapi.InterfaceError(
            f"can't create a connection to {address[0]} port {address[1]}"
        ) from error
    timeout = sock.gettimeout()
    sock = _Socket(sock.family, sock.type, sock.proto, fileno=sock.detach())
    sock.settimeout(timeout)  # a socket made from a descriptor would not know it
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        # pg8000.connect() takes no socket; the Connection it would make does.
        return dialect.loaded_dbapi.Connection(
            *cargs, **cparams, sock=sock, ssl_context=ssl_context
        )
    except BaseException:
        for file in sock.files:  # a failed startup leaves its packet in the file's buffer
            with contextlib.suppress(OSError, ValueError):
                file.close()
        sock.close()
        raise


class _Socket(socket.socket):
    """A socket that keeps the files made from it, so that a failed connect closes them too:
    a file collected later would try to send what it holds on a closed socket."""

    __slots__ = ("files",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.files: list[Any] = []

    def makefile(self, *args: Any, **kwargs: Any) -> Any:
        file = super().makefile(*args, **kwargs)
        self.files.append(file)
        return file


def _sqlite_engine(settings: Settings) -> Engine:
    engine = create_engine(settings.url, **_pool_arguments(settings))

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from the driver, which would otherwise begin
        # lazily and read outside any transaction.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute(f"PRAGMA busy_timeout = {int(settings.pool_timeout * 1000)}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        # One writer at a time, decided up front: no lock upgrades that fail midway.
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine
