"""The health check: a round trip to the database."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.orm import Session

from web.errors import Reply
from web.http import Call, Endpoint, route


def check(session: Session, call: Call) -> Reply:
    session.execute(text("SELECT 1"))
    return Reply(200, {"status": "ok", "database": "ok"})


ROUTES = [route("/healthz", GET=Endpoint(check))]
