"""For tests that watch the server: its connections, and a served probe app to kill or freeze."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Engine, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError

from dev.postgres import free_port
from tests.conftest import MAIN, PROBE, ROOT


def server_connections(engine: Engine, name: str, state: str | None = None) -> int:
    """The server's connections with this application_name (in this state)."""
    query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = :name"
    if state is not None:
        query += " AND state = :state"
    with engine.connect() as connection:
        return int(connection.scalar(text(query), {"name": name, "state": state}) or 0)


def wait_for(condition: Callable[[], bool], seconds: float) -> None:
    """Return once ``condition()`` holds; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def listening(process: subprocess.Popen[bytes], port: int) -> bool:
    """Whether a served process accepts connections on ``port``; it must still be running."""
    assert process.poll() is None
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class ServedProbe:
    """The probe app served by functions-framework in its own process, to be killed or frozen."""

    def __init__(self, url: URL, name: str, tmp_path: Path, **env: str) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [str(Path(sys.executable).with_name("functions-framework")), "--target=probe",
             f"--source={PROBE}", f"--port={self.port}"],
            cwd=tmp_path,
            env={**os.environ, "DATABASE_URL": url.render_as_string(hide_password=False),
                 "K_SERVICE": name, "THREADS": "2", "PYTHONPATH": str(ROOT), **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # gunicorn's master and its worker form one process group
        )  # fmt: skip
        wait_for(lambda: listening(self.process, self.port), 30)

    def post_in_background(self, path: str) -> None:
        def send() -> None:
            with socket.create_connection(("127.0.0.1", self.port), timeout=60) as conn:
                conn.sendall(
                    f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode()
                )
                with contextlib.suppress(OSError):
                    conn.recv(1024)

        threading.Thread(target=send, daemon=True).start()

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the server and its worker alike, as a host stopping would."""
        os.killpg(self.process.pid, signum)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGKILL)
        self.process.wait(timeout=30)


def row_is_free_and_unchanged(pg: Engine, user: int) -> bool:
    """Whether the user's row can be locked at once and still holds the balance 10."""
    with pg.connect() as connection:
        connection.execute(text("SET LOCAL lock_timeout = '200ms'"))
        try:
            balance = connection.scalar(
                text("SELECT balance FROM users WHERE id = :id FOR UPDATE"), {"id": user}
            )
        except DBAPIError:  # still locked
            return False
        finally:
            connection.rollback()
    return bool(balance == 10)


class ServedFunction:
    """An entry point of main.py served by functions-framework (gunicorn) in its own process."""

    def __init__(self, target: str, env: dict[str, str], folder: Path) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [str(Path(sys.executable).with_name("functions-framework")), f"--target={target}",
             f"--source={MAIN}", f"--port={self.port}"],
            cwd=folder,
            env={**os.environ, "PYTHONPATH": str(ROOT), **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for(lambda: listening(self.process, self.port), 30)

    def post(self, path: str, body: bytes) -> int:
        """POST a JSON body; the status, or 502 when the connection failed."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=body,
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:  # loopback
                return int(answer.status)
        except urllib.error.HTTPError as error:
            error.close()
            return int(error.getcode() or 0)
        except OSError:
            return 502

    def worker_memory(self) -> float:
        """The resident size of gunicorn's worker process, in MiB."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text()
        status = Path(f"/proc/{children.split()[0]}/status").read_text()
        return int(status.split("VmRSS:")[1].split()[0]) / 1024

    def kill(self) -> None:
        """SIGKILL gunicorn's worker and its master at once, as an instance that is lost."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text()
        for pid in [*map(int, children.split()), self.process.pid]:
            os.kill(pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(timeout=30)
