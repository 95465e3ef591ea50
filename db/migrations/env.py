"""Alembic environment: migrations run on the engine that ``db.migrate`` hands over."""

from __future__ import annotations

from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext

from db import types
from db.models import Base
from db.roles import grant_runtime, runtime_role

engine = context.config.attributes["engine"]


def render_item(kind: str, item: Any, autogen: AutogenContext) -> str | Literal[False]:
    """Write the project's own column types by name, with their import, in new migrations."""
    if kind == "type" and isinstance(item, types.UTCDateTime):
        autogen.imports.add("from db.types import UTCDateTime")
        return "UTCDateTime()"
    return False


with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        render_item=render_item,
    )
    with context.begin_transaction():
        context.run_migrations()
        if connection.dialect.name == "postgresql" and context.config.attributes.get("grant"):
            # Every table, a new migration's too, gets exactly the runtime role's privileges.
            grant_runtime(connection, runtime_role())
    connection.commit()
