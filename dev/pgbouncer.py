"""PgBouncer in transaction mode in front of a local PostgreSQL, as Cloud SQL's Managed
Connection Pooling runs it, for the tests and the benchmarks.

Its startup-parameter rules are PgBouncer's defaults (no ``ignore_startup_parameters``):
a client that sends a parameter it does not know is refused, as it would be in production.
Clients log in with SCRAM. Run as root, it runs as the ``postgres`` user, like the server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from sqlalchemy.engine import URL

from dev.postgres import PASSWORD, RUNTIME_PASSWORD, RUNTIME_USER, PostgresServer, free_port


def _binary() -> str:
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
    if found is None:
        raise RuntimeError("pgbouncer not found; scripts/test.sh installs Debian's pgbouncer")
    return found


class PgBouncer:
    """One PgBouncer for ``server``; ``url(database)`` reaches that database through it."""

    def __init__(
        self, server: PostgresServer, *, default_pool_size: int = 20, query_wait_timeout: int = 120
    ) -> None:
        self.server = server
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
        self.config = self.root / "pgbouncer.ini"
        self.log = self.root / "pgbouncer.log"
        self.pidfile = self.root / "pgbouncer.pid"
        (self.root / "userlist.txt").write_text(
            f'"postgres" "{PASSWORD}"\n"{RUNTIME_USER}" "{RUNTIME_PASSWORD}"\n'
        )
        self.config.write_text(
            "[databases]\n"
            f"* = host=127.0.0.1 port={server.port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            f"unix_socket_dir = {self.root}\n"
            "auth_type = scram-sha-256\n"
            f"auth_file = {self.root / 'userlist.txt'}\n"
            "pool_mode = transaction\n"
            "max_client_conn = 1000\n"
            f"default_pool_size = {default_pool_size}\n"
            f"query_wait_timeout = {query_wait_timeout}\n"
            f"logfile = {self.log}\n"
            f"pidfile = {self.pidfile}\n"
        )
        self._user = "postgres" if os.geteuid() == 0 else None
        if self._user:
            for path in (self.root, *self.root.iterdir()):
                shutil.chown(path, self._user)

    def url(self, database: str = "postgres") -> URL:
        return self.server.url(database).set(port=self.port)

    def runtime_url(self, database: str = "app") -> URL:
        """``database`` through the pooler as the functions' login user."""
        return self.server.runtime_url(database).set(port=self.port)

    def start(self) -> PgBouncer:
        command = [_binary(), "-d", str(self.config)]
        if self._user:
            command = ["runuser", "-u", self._user, "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=30)
        deadline = time.monotonic() + 30
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"PgBouncer did not start:\n{self.log.read_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
            os.kill(int(self.pidfile.read_text()), signal.SIGINT)
            deadline = time.monotonic() + 10
            while self.pidfile.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        shutil.rmtree(self.root, ignore_errors=True)
