"""What only the database's own dialect has: ``INSERT ... ON CONFLICT``."""

from __future__ import annotations

import importlib
from typing import Any

from sqlalchemy.orm import Session


def insert(session: Session, table: Any) -> Any:
    """An ``INSERT`` of ``table`` in the dialect of the session's database (PostgreSQL's and
    SQLite's both have ``on_conflict_do_nothing``).

    The engine has already loaded its dialect's module; the other one is never loaded, which
    keeps it out of a cold start.
    """
    name = session.get_bind().dialect.name
    return importlib.import_module(f"sqlalchemy.dialects.{name}").insert(table)
