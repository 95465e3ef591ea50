"""A throwaway PostgreSQL server for the test suite, in a temporary folder on 127.0.0.1.

PostgreSQL refuses to run as root, and CI runs as root: there the server runs as
the ``postgres`` system user (created when missing). Password authentication is
SCRAM, as on Cloud SQL.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from sqlalchemy.engine import URL

PASSWORD = "test-only-password-7f3a"


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
    """Start, stop and restart one server; ``url(database)`` reaches it through pg8000."""

    def __init__(self) -> None:
        self.bindir = _bindir()
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="pgtest-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._user = self._os_user()

    def url(self, database: str = "postgres") -> URL:
        return URL.create(
            "postgresql+pg8000",
            username="postgres",
            password=PASSWORD,
            host="127.0.0.1",
            port=self.port,
            database=database,
        )

    def init(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        if self._user:
            shutil.chown(self.root, self._user)
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
                f"-c unix_socket_directories={self.root}",
                "-c max_connections=200",
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
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

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
