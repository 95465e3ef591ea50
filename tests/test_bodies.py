"""Hostile bodies against a real functions-framework process, over real sockets: large ones
cost no memory, slow ones hold no thread past ``BODY_TIMEOUT``."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import Engine

from tests.serving import ServedFunction

MIB = 1024 * 1024
BODY_TIMEOUT = 2.0


@pytest.fixture
def served(pg: Engine, tmp_path: Path) -> Iterator[ServedFunction]:
    """The api function served by functions-framework with 8 threads, on the test PostgreSQL."""
    function = ServedFunction("api", {"THREADS": "8", "BODY_TIMEOUT": str(BODY_TIMEOUT)}, tmp_path)
    assert function.post("/users", b'{"name": "A", "email": "a@x.io"}') == 201  # warm
    yield function
    function.stop()


def _post(port: int, size: int, *, chunked: bool = False, stall: bool = False) -> tuple[str, float]:
    """Send a POST /users with a body of ``size`` bytes (or its first 4 bytes, then nothing);
    the status line and the seconds until it came."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        head = "POST /users HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        head += (
            "Transfer-Encoding: chunked\r\n\r\n" if chunked else f"Content-Length: {size}\r\n\r\n"
        )
        connection.sendall(head.encode())
        started = time.perf_counter()
        chunk, sent = b"x" * 65536, 0
        try:
            if stall:
                connection.sendall(b'{"na')
            while sent < size and not stall:
                connection.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                sent += len(chunk)
        except OSError:
            pass  # the server answered and closed before the whole body was sent
        answer = connection.recv(64).split(b"\r\n")[0].decode()
        return answer, time.perf_counter() - started


@pytest.mark.parametrize("chunked", [False, True], ids=["declared", "chunked"])
def test_eight_32_mib_bodies_at_once_cost_no_memory(served: ServedFunction, chunked: bool) -> None:
    """Each is a 413 once 1 MiB is read (at once when its length is declared); the worker's
    resident memory grows by less than 50 MiB (Cloud Run allows 32 MiB bodies)."""
    before = served.worker_memory()
    peak = [before]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], served.worker_memory())
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(
                pool.map(lambda _: _post(served.port, 32 * MIB, chunked=chunked), range(8))
            )
    finally:
        done.set()
        watcher.join()

    assert [status for status, _ in answers] == ["HTTP/1.1 413 REQUEST ENTITY TOO LARGE"] * 8
    assert peak[0] - before < 50, (before, peak[0])
    assert served.post("/users", b'{"name": "B", "email": "b@x.io"}') == 201


def test_stalled_bodies_are_cut_off_and_other_requests_are_served(
    served: ServedFunction,
) -> None:
    """Eight clients (as many as the threads) stop in the middle of a body: each gets a 408 once
    BODY_TIMEOUT has passed, and a request sent meanwhile is answered by then."""
    with ThreadPoolExecutor(8) as pool:
        stalled = [pool.submit(_post, served.port, 512 * 1024, stall=True) for _ in range(8)]
        time.sleep(0.5)
        began = time.perf_counter()
        other = served.post("/users", b'{"name": "C", "email": "c@x.io"}')
        waited = time.perf_counter() - began
        answers = [future.result() for future in stalled]

    assert [status for status, _ in answers] == ["HTTP/1.1 408 REQUEST TIMEOUT"] * 8
    assert all(BODY_TIMEOUT - 0.1 < seconds < BODY_TIMEOUT + 1.5 for _, seconds in answers)
    assert other == 201
    assert waited < BODY_TIMEOUT + 1


def test_a_body_sent_slowly_but_in_time_is_served(served: ServedFunction) -> None:
    """The limit is on the whole body, not a refusal of slow clients: one that trickles its body
    within BODY_TIMEOUT is served."""
    body = b'{"name": "D", "email": "d@x.io"}'
    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as connection:
        connection.sendall(
            b"POST /users HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        for part in (body[:10], body[10:20], body[20:]):
            connection.sendall(part)
            time.sleep(0.3)
        answer = connection.recv(64).split(b"\r\n")[0]

    assert answer == b"HTTP/1.1 201 CREATED"
