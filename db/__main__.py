"""``python -m db COMMAND``: the configured database's schema, by Alembic.

upgrade [REVISION]     bring the schema up to REVISION (default: the newest)
downgrade REVISION     take the schema back to REVISION (``-1``: one step)
current                print the schema's revision
check                  fail if the models differ from the migrated schema
revision -m MESSAGE    write the next migration from the difference between the models
                       and the migrated schema, on PostgreSQL: with no database
                       configured, a throwaway server is started for it
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config

from db.config import ConfigError, Settings, load_settings
from db.engine import Database
from db.migrate import MIGRATIONS, alembic_config, upgrade


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m db",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("upgrade", help="bring the schema up to date")
    up.add_argument("revision", nargs="?", default="head")
    down = commands.add_parser("downgrade", help="take the schema back to a revision")
    down.add_argument("revision")
    commands.add_parser("current", help="print the schema's revision")
    commands.add_parser("check", help="fail if the models differ from the migrated schema")
    revision = commands.add_parser("revision", help="write the next migration from the models")
    revision.add_argument("-m", "--message", required=True)
    args = parser.parse_args(argv)

    if args.command == "revision" and importlib.util.find_spec("ruff") is None:
        print(
            "python -m db revision formats the migration it writes with ruff, which this Python"
            " does not have: install the development tools first (scripts/test.sh does, or"
            f" {sys.executable} -m pip install -r requirements-dev.txt)",
            file=sys.stderr,
        )
        return 2
    try:
        settings = load_settings()
        with _database_for(args.command, settings) as database:
            config = alembic_config(database.engine)
            config.attributes["grant"] = args.command in ("upgrade", "downgrade")
            if args.command == "upgrade":
                command.upgrade(config, args.revision)
            elif args.command == "downgrade":
                command.downgrade(config, args.revision)
            elif args.command == "current":
                command.current(config)
            elif args.command == "check":
                command.check(config)
            else:
                print(f"wrote {write_revision(config, args.message)}")
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    return 0


@contextlib.contextmanager
def _database_for(name: str, settings: Settings) -> Iterator[Database]:
    """The configured database; for a revision with none configured, a throwaway PostgreSQL
    migrated to the newest revision."""
    if name == "revision" and settings.is_embedded:
        if os.environ.get("DATABASE_URL"):
            raise ConfigError(
                "DATABASE_URL names SQLite; revisions are written against PostgreSQL "
                "(leave DATABASE_URL unset to use a throwaway server)"
            )
        from dev.postgres import throwaway_database  # noqa: PLC0415  # a development tool

        with throwaway_database() as url:
            plain = url.render_as_string(hide_password=False)
            database = Database(load_settings({**os.environ, "DATABASE_URL": plain}))
            try:
                upgrade(database.engine)
                yield database
            finally:
                database.dispose()
        return
    database = Database(settings)
    try:
        yield database
    finally:
        database.dispose()


def write_revision(config: Config, message: str) -> Path:
    """Write the next numbered migration for what the models add, formatted by ruff."""
    names = (path.name for path in MIGRATIONS.glob("versions/*.py"))
    numbers = [int(found[1]) for name in names if (found := re.match(r"(\d+)_", name))]
    config.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    hooks = {"ruff_format": "format", "ruff_fix": "check --fix --quiet"}
    config.set_section_option("post_write_hooks", "hooks", ", ".join(hooks))
    for hook, options in hooks.items():
        config.set_section_option("post_write_hooks", f"{hook}.type", "module")
        config.set_section_option("post_write_hooks", f"{hook}.module", "ruff")
        config.set_section_option(
            "post_write_hooks", f"{hook}.options", f"{options} REVISION_SCRIPT_FILENAME"
        )
    script = command.revision(
        config, message=message, autogenerate=True, rev_id=f"{max(numbers, default=0) + 1:04d}"
    )
    if script is None or isinstance(script, list):
        raise RuntimeError("Alembic wrote no single migration")
    return Path(script.path)


if __name__ == "__main__":
    sys.exit(main())
