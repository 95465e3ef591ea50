"""The users handlers written the ways the field usually writes them, to compare against
(Google's sample pattern, the first of them, is ``bench/sample.py``).

Served by functions-framework next to the service itself, so that one benchmark run compares
them on the same machine, database and HTTP stack. Each uses pg8000 as installed. Not
deployable code: two of them are wrong on purpose.

- ``seeds_session``: a ``Session`` per request from a global ``sessionmaker``, closed in
  ``finally``, on SQLAlchemy's default pool.
- ``global_session``: one module-level ``Session`` for every request on every thread: fast,
  but it answers from a stale identity map and is unsafe under threads (wrong).
- ``engine_per_request``: a new engine, so a new connection, for every request: correct, slow.
"""

from __future__ import annotations

import os

import flask
import functions_framework
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from bench.answers import answer
from db.config import load_settings
from db.models import User, utcnow
from web.representations import user as represent

_settings = load_settings()
# Named like the service's connections, so the benchmark can count them on the server.
_connect_args = {"application_name": os.environ.get("K_SERVICE", "bench")}


def _user_id(request: flask.Request) -> int:
    return int(request.path.rstrip("/").rsplit("/", 1)[-1])


# A Session per request from a global sessionmaker


_sessions = sessionmaker(bind=create_engine(_settings.url, connect_args=_connect_args))


@functions_framework.http
def seeds_session(request: flask.Request) -> flask.Response:
    """Users through a new Session per request, closed in finally."""
    session = _sessions()
    try:
        return _handle(request, session, commit_reads=False)
    finally:
        session.close()


# Wrong on purpose


_engine = create_engine(
    _settings.url, pool_size=_settings.pool_size, max_overflow=0, connect_args=_connect_args
)
# One session for every request on every thread, never closed. Its identity map answers
# repeated reads without asking the database, and stays stale.
_global_session = Session(_engine)


def _handle(request: flask.Request, session: Session, *, commit_reads: bool) -> flask.Response:
    if request.method == "POST":
        fields = request.get_json()
        now = utcnow()
        user = User(name=fields["name"], email=fields["email"].lower(), balance=0,
                    created_at=now, updated_at=now)  # fmt: skip
        session.add(user)
        session.commit()
        return answer(201, represent(user))
    found = session.get(User, _user_id(request))
    body = represent(found) if found else {"error": "not found"}
    if commit_reads:
        session.commit()
    return answer(200 if found else 404, body)


@functions_framework.http
def global_session(request: flask.Request) -> flask.Response:
    """Users through one module-level Session."""
    return _handle(request, _global_session, commit_reads=False)


@functions_framework.http
def engine_per_request(request: flask.Request) -> flask.Response:
    """Users through a new engine, and so a new connection, for every request."""
    engine: Engine = create_engine(_settings.url, connect_args=_connect_args)
    try:
        with Session(engine) as session:
            return _handle(request, session, commit_reads=True)
    finally:
        engine.dispose()
