"""Shutdown through the real server: functions-framework on gunicorn, stopped with SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

from dev.postgres import free_port
from tests.conftest import ROOT


def _wait_until_serving(port: int, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError("functions-framework did not start")


def _connections(pg: Engine, name: str) -> int:
    with pg.connect() as connection:
        query = text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :name")
        return int(connection.scalar(query, {"name": name}) or 0)


def test_sigterm_stops_the_server_and_closes_its_connections(
    pg: Engine, database_url: URL, tmp_path: Path
) -> None:
    """After SIGTERM the worker disposes the engine: exit 0, and no server connection is left."""
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url.render_as_string(hide_password=False),
        "K_SERVICE": "shutdown-check",
        "THREADS": "2",
    }
    functions_framework = Path(sys.executable).with_name("functions-framework")
    process = subprocess.Popen(
        [
            str(functions_framework),
            "--target=health",
            f"--port={port}",
            f"--source={ROOT / 'main.py'}",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_until_serving(port, process)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
            assert response.status == 200
        assert _connections(pg, "shutdown-check") == 1

        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()

    assert process.returncode == 0, output
    messages = [json.loads(line)["message"] for line in output.splitlines() if line.startswith("{")]
    assert "database disposed" in messages
    assert _connections(pg, "shutdown-check") == 0
