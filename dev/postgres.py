"""A PostgreSQL server of one's own on 127.0.0.1, for the tests, the benchmarks,
``python -m db revision`` and ``scripts/serve.sh --postgres``.

The server lives in a temporary folder and goes with it, or in a folder that is kept
(local development). PostgreSQL refuses to run as root, and CI runs as root: there the
server runs as the ``postgres`` system user (created when missing). Password
authentication is SCRAM, as on Cloud SQL.

``python -m dev.postgres [--data DIR] -- COMMAND ...`` starts a server, creates and
migrates its ``app`` database (as its owner), runs COMMAND with ``DATABASE_URL`` set to the
functions' login user, which has only the runtime role's privileges, and stops the server
when COMMAND ends.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

from db.roles import add_runtime_user, runtime_role

PASSWORD = "test-only-password-7f3a"
# The login user the functions run as: a member of the runtime role, nothing more (db/roles.py).
RUNTIME_USER = "functions"
RUNTIME_PASSWORD = "test-only-runtime-password-c41d"


def _bindir() -> Path:
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not candidates:
        raise RuntimeError("PostgreSQL binaries (initdb, pg_ctl) not found; run scripts/test.sh")
    return Path(candidates[-1]).parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PostgresServer:
    """Start, stop and restart one server; ``url(database)`` reaches it through pg8000.

    ``root`` keeps the server's files in that folder across runs; by default they go in
    a temporary folder that ``destroy()`` removes.
    """

    def __init__(self, root: Path | None = None, *, max_connections: int = 200) -> None:
        self.max_connections = max_connections
        self.bindir = _bindir()
        self.port = free_port()
        self.root = root.resolve() if root else Path(tempfile.mkdtemp(prefix="pgtest-"))
        self.root.mkdir(parents=True, exist_ok=True)
        # A socket path has a length limit: the sockets get a short folder of their own.
        self.sockets = Path(tempfile.mkdtemp(prefix="pgsock-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._user = self._os_user()
        if self._user:
            shutil.chown(self.root, self._user)
            shutil.chown(self.sockets, self._user)

    @property
    def initialized(self) -> bool:
        """Whether the data folder holds a database cluster."""
        return (self.data / "PG_VERSION").exists()

    def url(self, database: str = "postgres") -> URL:
        return URL.create(
            "postgresql+pg8000",
            username="postgres",
            password=PASSWORD,
            host="127.0.0.1",
            port=self.port,
            database=database,
        )

    def runtime_url(self, database: str = "app") -> URL:
        """``url(database)`` as the functions' login user, which only the runtime role's
        privileges reach (``add_runtime_user`` creates it)."""
        return self.url(database).set(username=RUNTIME_USER, password=RUNTIME_PASSWORD)

    def add_runtime_user(self, database: str = "app") -> URL:
        """Create the functions' login user, a member of the runtime role; its URL."""
        engine = create_engine(self.url(database), poolclass=NullPool)
        with engine.begin() as connection:
            add_runtime_user(connection, RUNTIME_USER, RUNTIME_PASSWORD, runtime_role())
        engine.dispose()
        return self.runtime_url(database)

    def init(self) -> None:
        """Create the database cluster, with the password for ``postgres``."""
        if (
            self._user
            and subprocess.run(
                ["runuser", "-u", self._user, "--", "test", "-w", str(self.root)], check=False
            ).returncode
        ):
            raise RuntimeError(
                f"the {self._user} user, which runs PostgreSQL here because this process is "
                f"root, cannot write to {self.root}: use a folder it can reach"
            )
        pwfile = self.root / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        if self._user:
            shutil.chown(pwfile, self._user)
        self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "--auth=scram-sha-256",
            f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C", "--no-sync",
        )  # fmt: skip
        pwfile.unlink()

    def start(self) -> None:
        options = " ".join(
            [
                f"-p {self.port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self.sockets}",
                f"-c max_connections={self.max_connections}",
                # Durability is not under test; speed is welcome.
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off",
            ]
        )
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60",
            "start",
        )  # fmt: skip

    def trust(self, role: str) -> None:
        """Let ``role`` log in from 127.0.0.1 without a password, as Cloud SQL's proxy lets an
        IAM principal in on its token."""
        hba = self.data / "pg_hba.conf"
        rule = f'host all "{role}" 127.0.0.1/32 trust\n'
        if rule not in hba.read_text():
            hba.write_text(rule + hba.read_text())
            self._run("pg_ctl", "-D", str(self.data), "reload")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def destroy(self) -> None:
        """Stop the server at once and remove its files."""
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.sockets, ignore_errors=True)

    def create_database(self, name: str) -> URL:
        """Create the database ``name`` unless it exists; its URL."""
        admin = create_engine(self.url(), poolclass=NullPool, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            exists = connection.scalar(
                text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}
            )
            if not exists:
                connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
        admin.dispose()
        return self.url(name)

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bindir / program), *args]
        if self._user:
            command = ["runuser", "-u", self._user, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise subprocess.CalledProcessError(
                result.returncode, command, result.stdout, result.stderr + log
            )

    @staticmethod
    def _os_user() -> str | None:
        if os.geteuid() != 0:
            return None
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "postgres"], check=True, timeout=60
            )
        return "postgres"


@contextlib.contextmanager
def throwaway_database(name: str = "app") -> Iterator[URL]:
    """A new server with an empty database ``name``, removed with everything on exit."""
    server = PostgresServer()
    try:
        server.init()
        server.start()
        yield server.create_database(name)
    finally:
        server.destroy()


def add_users(engine: Engine, count: int, balance: int) -> None:
    """Users 1 to ``count`` (``U1``, ``u1@x.io``, ...), each with ``balance``, for a workload."""
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO users (name, email, balance, created_at, updated_at)"
                " VALUES (:name, :email, :balance, now(), now())"
            ),
            [
                {"name": f"U{n}", "email": f"u{n}@x.io", "balance": balance}
                for n in range(1, count + 1)
            ],
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dev.postgres",
        description="Run COMMAND with DATABASE_URL naming a migrated database on a local server.",
    )
    parser.add_argument("--data", type=Path, help="keep the server's files in this folder")
    parser.add_argument("command", nargs="+", help="the command to run, after --")
    args = parser.parse_args(argv)

    server = PostgresServer(args.data)
    if not server.initialized:
        server.init()
    server.start()
    try:
        owner = server.create_database("app").render_as_string(hide_password=False)
        subprocess.run(
            [sys.executable, "-m", "db", "upgrade"],
            env={**os.environ, "DATABASE_URL": owner},
            check=True,
        )
        # The command runs as the functions do: through the runtime role only.
        url = server.add_runtime_user("app").render_as_string(hide_password=False)
        env = {**os.environ, "DATABASE_URL": url}
        print(f"PostgreSQL {server.port} on 127.0.0.1, database app, files in {server.root}")
        child = subprocess.Popen(args.command, env=env)
        # Stopping this process stops the command first, then the server (below).
        signal.signal(signal.SIGTERM, lambda *_: child.terminate())
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:
                continue  # the command got the same Ctrl-C and is stopping
    finally:
        if args.data:
            server.stop()
            shutil.rmtree(server.sockets, ignore_errors=True)
        else:
            server.destroy()


if __name__ == "__main__":
    sys.exit(main())
