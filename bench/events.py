"""Events per second through a Pub/Sub push subscription against ``POST /transfers`` per second.

Both at a 1 ms round trip to PostgreSQL (``bench/latency.py``), one run, on one machine:
``transfer_events`` behind the real Pub/Sub emulator, which pushes at most 2 messages at a
time, and ``api`` under as many keep-alive clients (``--clients``, 2 by default), each instance
with 8 threads as deployed. Every message and every request moves 1 between two of 100 users.

    .venv/bin/python -m bench.events [--messages 2000]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from bench.latency import LatencyProxy
from bench.run import Client, Served, serving
from db.migrate import upgrade
from dev.postgres import PostgresServer, add_users
from dev.pubsub import PubSubEmulator

ROOT = Path(__file__).resolve().parent.parent
USERS = 100


def _moves(count: int, seed: int) -> list[dict[str, int]]:
    chooser = random.Random(seed)  # noqa: S311  # a reproducible workload
    return [
        dict(
            zip(("from_user_id", "to_user_id"), chooser.sample(range(1, USERS + 1), 2), strict=True)
        )
        | {"amount": 1}
        for _ in range(count)
    ]


def _count(engine: Any, table: str) -> int:
    with engine.connect() as connection:
        return int(connection.scalar(text(f"SELECT count(*) FROM {table}")) or 0)


def _post_all(port: int, bodies: list[dict[str, int]], clients: int) -> float:
    """Send every body as ``POST /transfers`` from ``clients`` keep-alive clients; the seconds
    it took."""
    lock = threading.Lock()

    def post() -> None:
        client = Client(port)
        while True:
            with lock:
                if not bodies:
                    return
                body = bodies.pop()
            status, _ = client.send("POST", "/transfers", body)
            assert status == 201, status

    started = time.perf_counter()
    threads = [threading.Thread(target=post) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.events", description=__doc__)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=2)
    args = parser.parse_args(argv)

    server = PostgresServer(Path(tempfile.mkdtemp(prefix="bench-events-")))
    server.init()
    server.start()
    emulator = PubSubEmulator().start()
    proxy = None
    try:
        url = server.create_database("app")
        engine = create_engine(url, poolclass=NullPool)
        upgrade(engine)
        add_users(engine, USERS, 1_000_000)
        proxy = LatencyProxy(server.port, 0.5)
        delayed = url.set(port=proxy.port).render_as_string(hide_password=False)
        env = {"DATABASE_URL": delayed}
        servers = {
            "events": Served("events", "transfer_events", ROOT / "main.py", env),
            "api": Served("api", "api", ROOT / "main.py", env),
        }
        with serving(servers):
            emulator.create_topic("transfer-requests")
            emulator.create_push_subscription(
                "bench",
                "transfer-requests",
                f"http://127.0.0.1:{servers['events'].port}"
                + emulator.push_path("transfer-requests"),
                ack_deadline=60,
            )
            payloads = [json.dumps(m).encode() for m in _moves(args.messages, 1)]
            started = time.perf_counter()
            emulator.publish("transfer-requests", payloads)
            while _count(engine, "handled_events") < args.messages:
                time.sleep(0.05)
            events_seconds = time.perf_counter() - started

            posts_seconds = _post_all(servers["api"].port, _moves(args.messages, 2), args.clients)
        assert _count(engine, "transfers") == 2 * args.messages
        report = {
            "messages": args.messages,
            "clients": args.clients,
            "events_per_second": round(args.messages / events_seconds, 1),
            "posts_per_second": round(args.messages / posts_seconds, 1),
            "ratio": round(posts_seconds / events_seconds, 2),
        }
        print(json.dumps(report, indent=2))
        engine.dispose()
    finally:
        if proxy is not None:
            proxy.stop()
        emulator.stop()
        server.destroy()


if __name__ == "__main__":
    main()
