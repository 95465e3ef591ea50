"""scripts/serve.sh, the README's way to run the service: on SQLite, and on a local PostgreSQL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dev.postgres import free_port
from tests.conftest import CONFIG_VARIABLES, ROOT
from tests.copies import copy_of_the_project


@pytest.fixture
def project() -> Iterator[Path]:
    """A copy of the project, sharing this checkout's virtual environment.

    It is not under pytest's own temporary folder, which only its owner may enter: run as
    root, PostgreSQL runs as another user, who must reach its data folder in the copy.
    """
    folder = Path(tempfile.mkdtemp(prefix="serve-"))
    folder.chmod(0o755)
    copy_of_the_project(folder)
    (folder / ".venv").symlink_to(ROOT / ".venv")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


class Served:
    """scripts/serve.sh running in the background in a project copy."""

    def __init__(self, project: Path, *args: str) -> None:
        self.port = free_port()
        self.log = project / f"serve-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if k not in CONFIG_VARIABLES}
        with self.log.open("w") as output:
            self.process = subprocess.Popen(
                ["bash", "scripts/serve.sh", *args], cwd=project,
                env={**env, "PORT": str(self.port)}, stdout=output, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 120
        while True:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            try:
                self.call("GET", "/healthz")
                return
            except OSError:
                assert time.monotonic() < deadline, self.log.read_text()[-3000:]
                time.sleep(0.2)

    def call(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", data=data, method=method
        )
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


@pytest.fixture
def serve(project: Path) -> Iterator[type[Served]]:
    """Start scripts/serve.sh in the project copy; whatever is left running is stopped."""
    started: list[Served] = []

    class Tracked(Served):
        def __init__(self, project: Path, *args: str) -> None:
            super().__init__(project, *args)
            started.append(self)

    yield Tracked
    for served in started:
        if served.process.poll() is None:
            served.process.kill()
            served.process.wait(timeout=30)


def test_serve_runs_the_api_on_an_sqlite_file(project: Path, serve: type[Served]) -> None:
    """With nothing configured, scripts/serve.sh serves the api on ./app.db."""
    served = serve(project)

    assert served.call("POST", "/users", {"name": "Ada", "email": "ada@x.io"})[0] == 201
    assert (project / "app.db").exists()
    assert served.stop() == 0


def test_serve_postgres_keeps_its_data_and_stops_its_server(
    project: Path, serve: type[Served]
) -> None:
    """--postgres migrates a local PostgreSQL, serves from it, stops it on exit, and finds the
    same data on the next run."""
    served = serve(project, "--postgres")
    created = served.call("POST", "/users", {"name": "Ada", "email": "ada@x.io"})
    assert created[0] == 201
    assert served.call("GET", "/users?email=nobody%00@x.io")[0] == 422
    assert served.stop() == 0
    assert not (project / ".dev" / "postgres" / "data" / "postmaster.pid").exists()
    assert not (project / "app.db").exists()

    again = serve(project, "--postgres")
    try:
        assert again.call("GET", f"/users/{created[1]['id']}") == (200, created[1])
    finally:
        assert again.stop() == 0
    assert not (project / ".dev" / "postgres" / "data" / "postmaster.pid").exists()


def _listening_addresses(port: int) -> set[str]:
    """The IPv4 addresses a socket listens on at ``port``, from /proc/net/tcp."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # LISTEN
            found.add(".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def test_serve_says_where_it_listens_and_listens_on_this_machine_only(
    project: Path, serve: type[Served]
) -> None:
    """One line names the address; the socket is bound to 127.0.0.1, not every interface."""
    served = serve(project)

    assert f"serving api on http://localhost:{served.port}" in served.log.read_text()
    assert _listening_addresses(served.port) == {"127.0.0.1"}
    assert served.stop() == 0


def test_serve_on_a_taken_port_says_what_to_do(project: Path) -> None:
    """A port another server holds: exit 1 at once, naming the port and another to try."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k not in CONFIG_VARIABLES}

        result = subprocess.run(
            ["bash", "scripts/serve.sh"], cwd=project, env={**env, "PORT": str(port)},
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip

    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1 port {port}" in result.stderr
    assert f"PORT={port + 1} scripts/serve.sh" in result.stderr
