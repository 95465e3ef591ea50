"""A scenario app of event functions given the per-event scope, each failing as told."""

from __future__ import annotations

import functions_framework
from sqlalchemy import text
from sqlalchemy.orm import Session

from db.config import startup_settings
from db.engine import Database
from web import events
from web.logs import configure_logging

configure_logging()
database = Database(startup_settings())
sessions: list[Session] = []
attempts: list[str] = []


@functions_framework.cloud_event
@events.event_scope(database, topic="signups")
def signups(session: Session, message: events.Message) -> None:
    """Add the user a message names; its ``fail`` attribute makes it fail after the write."""
    sessions.append(session)
    attempts.append(message.id)
    body = message.json()
    session.execute(
        text(
            "INSERT INTO users (name, email, balance, created_at, updated_at)"
            " VALUES (:name, :email, 0, now(), now())"
        ),
        {"name": body["name"], "email": body["email"]},
    )
    failure = message.attributes.get("fail")
    if failure == "serialization":  # transient: retried in the scope, then redelivered
        session.execute(text("DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '40001'; END $$"))
    if failure == "bug":
        raise RuntimeError("a bug after the write")


@functions_framework.cloud_event
@events.event_scope(database, topic="signups")
def ignore(session: Session, message: events.Message) -> None:
    """Apply a message by doing nothing with the database."""
    sessions.append(session)
