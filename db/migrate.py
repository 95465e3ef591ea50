"""Schema migrations with Alembic, configured in code."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(engine: Engine | None = None) -> Config:
    """An Alembic configuration for this project, bound to ``engine`` when given."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = engine
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema of ``engine``'s database up to ``revision``, and give the runtime role
    its privileges on every table (``db/roles.py``)."""
    config = alembic_config(engine)
    config.attributes["grant"] = True
    command.upgrade(config, revision)
