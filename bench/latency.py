"""A TCP proxy that delays what it forwards by a fixed time each way, in a process of its own.

On loopback a round trip to PostgreSQL costs about 0.1 ms; from a Cloud Function to Cloud SQL
it costs 0.5 to 2 ms. Benchmarks put this proxy between the functions and the server to
measure at production's round trip. Each chunk read is held until its arrival time plus the
delay, then sent on, so the delay neither adds up for bursts nor reorders bytes; a sender
thread per direction sleeps with the clock's full resolution, learning how late its sleeps
wake and waking that much earlier (0.2 ms at most), so the delay holds to within about 0.1 ms.

    python -m bench.latency --port LISTEN --target PORT --delay-ms 0.5
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

# Sleeps wake about 0.08 ms late here; a busy machine wakes them later still, which must not
# teach the proxy to send far ahead of time once it is quiet again.
MAX_EARLY = 0.0002


@dataclass
class _Direction:
    """One direction of one connection: chunks waiting for their time, and the socket out."""

    out: socket.socket
    delay: float
    queue: collections.deque[tuple[float, bytes]] = field(default_factory=collections.deque)
    ready: threading.Condition = field(default_factory=threading.Condition)
    closed: bool = False
    late: float = 0.0  # how late a sleep tends to wake; the next one wakes that much earlier

    def receive_from(self, source: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                with self.ready:
                    self.queue.append((time.perf_counter() + self.delay, chunk))
                    self.ready.notify()
        except OSError:
            pass
        with self.ready:
            self.closed = True
            self.ready.notify()

    def send(self) -> None:
        try:
            while True:
                with self.ready:
                    while not self.queue and not self.closed:
                        self.ready.wait()
                    if not self.queue:
                        break
                    due, chunk = self.queue.popleft()
                target = due - self.late
                wait = target - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                    overshoot = time.perf_counter() - target
                    self.late = min(MAX_EARLY, max(0.0, 0.9 * self.late + 0.1 * overshoot))
                self.out.sendall(chunk)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            self.out.shutdown(socket.SHUT_WR)


def _forward(client: socket.socket, target: int, delay: float) -> None:
    server = socket.create_connection(("127.0.0.1", target))
    for sock in (client, server):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    directions = [(client, _Direction(server, delay)), (server, _Direction(client, delay))]
    threads = []
    for source, direction in directions:
        threads.append(threading.Thread(target=direction.receive_from, args=(source,)))
        threads.append(threading.Thread(target=direction.send))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    client.close()
    server.close()


def serve(port: int, target: int, delay: float) -> None:
    """Accept on 127.0.0.1:``port`` forever, forwarding each connection to ``target``."""
    listener = socket.create_server(("127.0.0.1", port))
    while True:
        client, _ = listener.accept()
        threading.Thread(target=_forward, args=(client, target, delay), daemon=True).start()


class LatencyProxy:
    """The proxy as a child process: ``port`` reaches ``target`` ``delay_ms`` later each way."""

    def __init__(self, target: int, delay_ms: float) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self.delay_ms = delay_ms
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.latency", f"--port={self.port}", f"--target={target}",
             f"--delay-ms={delay_ms}"],
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the latency proxy did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--target", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, required=True)
    arguments = parser.parse_args()
    serve(arguments.port, arguments.target, arguments.delay_ms / 1000)
