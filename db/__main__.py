"""``python -m db upgrade|current|check|revision -m MSG``: the configured database's schema."""

from __future__ import annotations

import argparse
import sys

from alembic import command

from db.config import ConfigError
from db.engine import Database
from db.migrate import alembic_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m db", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("upgrade", help="bring the schema up to date")
    commands.add_parser("current", help="print the schema's revision")
    commands.add_parser("check", help="fail if the models differ from the migrated schema")
    revision = commands.add_parser("revision", help="write a new migration from the models")
    revision.add_argument("-m", "--message", required=True)
    args = parser.parse_args(argv)

    database = Database()
    try:
        config = alembic_config(database.engine)
        if args.command == "upgrade":
            command.upgrade(config, "head")
        elif args.command == "current":
            command.current(config)
        elif args.command == "check":
            command.check(config)
        else:
            command.revision(config, message=args.message, autogenerate=True)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    finally:
        database.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
