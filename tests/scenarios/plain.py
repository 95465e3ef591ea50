"""A scenario app of plain functions-framework functions, each given the per-request scope."""

from __future__ import annotations

from typing import Any

import flask
import functions_framework
from sqlalchemy import text
from sqlalchemy.orm import Session

from db.config import startup_settings
from db.engine import Database
from service.errors import NotFound
from web.errors import Reply
from web.http import request_scope
from web.logs import configure_logging

configure_logging()
database = Database(startup_settings())
sessions: list[Session] = []


@functions_framework.http
@request_scope(database, methods=["POST"])
def deposit(session: Session, request: flask.Request) -> Reply:
    """Add to a balance, then fail if asked to: ``POST /?user=1&amount=5[&fail=domain|bug]``."""
    sessions.append(session)
    session.execute(
        text("UPDATE users SET balance = balance + :amount WHERE id = :id"),
        {"amount": int(request.args["amount"]), "id": int(request.args["user"])},
    )
    if request.args.get("fail") == "domain":
        raise NotFound("no such account")
    if request.args.get("fail") == "bug":
        raise RuntimeError("a bug after the write")
    return Reply(201, {"deposited": int(request.args["amount"])})


@functions_framework.http
@request_scope(database)
def balance(session: Session, request: flask.Request) -> dict[str, Any]:
    """Any method: the balance of ``?user=``."""
    sessions.append(session)
    found = session.scalar(
        text("SELECT balance FROM users WHERE id = :id"), {"id": request.args["user"]}
    )
    return {"balance": found, "method": request.method}
