"""A scenario app: the real HTTP layer and session scope, with handlers that misbehave on purpose.

It serves the real users resource too, so one warm instance can fail and then serve.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import flask
import functions_framework
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from db.config import startup_settings
from db.engine import Database
from db.models import User, utcnow
from web import http, users
from web.errors import Reply
from web.http import Call, Endpoint, Route, Router, route
from web.logs import configure_logging

configure_logging()
database = Database(startup_settings())
sessions: list[Session] = []  # every session a handler was given, to inspect afterwards
held: list[Any] = []  # loaded rows kept alive across requests, as a careless cache would
attempts: list[str] = []  # one entry per run of a retry handler: the thread's name
backend_pids: list[int] = []  # server process of each run of /write, for tests to terminate
meet: threading.Barrier | None = None  # where two requests wait for each other once


def _new_user(email: str) -> User:
    now = utcnow()
    user = User(name="probe", email=email, balance=0, created_at=now, updated_at=now)
    held.append(user)
    return user


def fresh(session: Session, call: Call) -> Reply:
    """Report the state of the session it was given, then load a user and keep it referenced."""
    state = {
        "reused": bool(session.info.get("served")),
        "identity_map": len(session.identity_map),
        "in_transaction": session.in_transaction(),
    }
    session.info["served"] = True
    sessions.append(session)
    user = session.get(User, call.query)
    held.append(user)
    return Reply(200, {**state, "name": user.name if user else None})


def boom(session: Session, call: Call) -> Reply:
    """Write a row, then fail with an exception the service does not know."""
    sessions.append(session)
    session.add(_new_user("boom@example.com"))
    session.flush()
    raise RuntimeError("handler failed after writing")


def overflow(session: Session, call: Call) -> Reply:
    """Write a row, then hit an error only the database catches (int4 overflow, SQLSTATE 22003)."""
    sessions.append(session)
    session.add(_new_user("overflow@example.com"))
    session.flush()
    session.execute(text("SELECT 2147483647::int4 + 1"))
    return Reply(200, {})


def commit_fails(session: Session, call: Call) -> Reply:
    """Insert into a table whose deferred constraint trigger refuses the COMMIT."""
    sessions.append(session)
    session.add(_new_user("commit@example.com"))
    session.execute(text("INSERT INTO commit_probe (id) VALUES (1)"))
    return Reply(201, {})


def kill_connection(session: Session, call: Call) -> Reply:
    """Write a row, then have the server terminate this very connection."""
    sessions.append(session)
    session.add(_new_user("killed@example.com"))
    session.flush()
    session.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
    return Reply(200, {})


def autoflush(session: Session, call: Call) -> Reply:
    """Add a user without flushing, then query for it in the same request."""
    sessions.append(session)
    session.add(_new_user("autoflush@example.com"))
    found = session.scalars(select(User).where(User.email == "autoflush@example.com")).first()
    return Reply(200, {"found": found is not None})


def serial_increment(session: Session, call: Call) -> Reply:
    """Read a balance, meet the other request (first attempt only), then write it plus one.

    Two of these at once under SERIALIZABLE force a real serialization failure on one.
    """
    session.execute(text("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"))
    balance = session.scalar(text("SELECT balance FROM users WHERE id = :id"), {"id": call.query})
    thread = threading.current_thread().name
    attempts.append(thread)
    if meet is not None and attempts.count(thread) == 1:
        meet.wait(timeout=5)
    session.execute(
        text("UPDATE users SET balance = :balance WHERE id = :id"),
        {"balance": balance + 1, "id": call.query},
    )
    return Reply(200, {"attempt": attempts.count(thread)})


def always_conflicts(session: Session, call: Call) -> Reply:
    """Fail with a real serialization failure (SQLSTATE 40001) on every attempt."""
    attempts.append(threading.current_thread().name)
    session.execute(
        text("DO $$ BEGIN RAISE EXCEPTION 'forced' USING ERRCODE = 'serialization_failure'; END $$")
    )
    return Reply(200, {})


def kill_once(session: Session, call: Call) -> Reply:
    """Write a row; on the first attempt only, lose the connection before COMMIT."""
    attempts.append(threading.current_thread().name)
    session.add(_new_user("kill-once@example.com"))
    session.flush()
    if len(attempts) == 1:
        session.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
    return Reply(201, {"attempts": len(attempts)})


def reset_once(session: Session, call: Call) -> Reply:
    """Write a row; on the first attempt, fail as pg8000 does on a reset socket (a bare OSError)."""
    attempts.append(threading.current_thread().name)
    session.add(_new_user("reset-once@example.com"))
    session.flush()
    if len(attempts) == 1:
        session.connection().invalidate()  # the socket is gone, as after a real reset
        raise ConnectionResetError(104, "Connection reset by peer")
    return Reply(201, {"attempts": len(attempts)})


def write(session: Session, call: Call) -> Reply:
    """Write a row and record which server process holds the transaction."""
    attempts.append(threading.current_thread().name)
    backend_pids.append(int(session.scalar(text("SELECT pg_backend_pid()")) or 0))
    session.add(_new_user("write@example.com"))
    return Reply(201, {})


def sleep(session: Session, call: Call) -> Reply:
    """Spend the given number of seconds inside one statement on the server."""
    session.execute(text("SELECT pg_sleep(:seconds)"), {"seconds": call.query})
    return Reply(200, {})


def hold(session: Session, call: Call) -> Reply:
    """Change a user's balance, then keep the transaction open (idle on the server) for 30 s."""
    session.execute(
        text("UPDATE users SET balance = balance + 1 WHERE id = :id"), {"id": call.query}
    )
    time.sleep(30)
    return Reply(200, {})


def settings(session: Session, call: Call) -> Reply:
    """The server settings in force inside this request's transaction."""
    names = ("statement_timeout", "idle_in_transaction_session_timeout", "application_name")
    values = session.execute(
        text("SELECT " + ", ".join(f"current_setting('{name}')" for name in names))
    ).one()
    return Reply(200, dict(zip(names, values, strict=True)))


def missing_table(session: Session, call: Call) -> Reply:
    """Read from a table no migration created, as a model added without one would."""
    session.execute(text("SELECT id FROM table_without_migration"))
    return Reply(200, {})


def write_on_get(session: Session, call: Call) -> Reply:
    """Add a user from a GET, which must not write."""
    session.add(_new_user("write-on-get@example.com"))
    session.flush()
    return Reply(200, {})


def _one(path: str, method: str, view: http.View, **options: Any) -> Route:
    return route(path, **{method: Endpoint(view, **options)})


ROUTER = Router(
    [
        *users.ROUTES,
        _one("/fresh", "GET", fresh, query=lambda args: int(args["id"])),
        _one("/boom", "POST", boom),
        _one("/overflow", "POST", overflow),
        _one("/commit-fails", "POST", commit_fails),
        _one("/kill-connection", "POST", kill_connection),
        _one("/autoflush", "POST", autoflush),
        _one("/serial-increment", "POST", serial_increment, query=lambda args: int(args["id"])),
        _one("/always-conflicts", "POST", always_conflicts),
        _one("/kill-once", "POST", kill_once),
        _one("/reset-once", "POST", reset_once),
        _one("/write", "POST", write),
        _one("/sleep", "POST", sleep, query=lambda args: float(args["seconds"])),
        _one("/hold", "POST", hold, query=lambda args: int(args["id"])),
        _one("/settings", "GET", settings),
        _one("/missing-table", "GET", missing_table),
        _one("/write-on-get", "GET", write_on_get),
    ]
)


@functions_framework.http
def probe(request: flask.Request) -> flask.Response:
    return http.serve(request, database, ROUTER)
