"""What publishing a transfer's event costs ``POST /transfers``, at a 1 ms round trip.

Three ``api`` instances, each on PostgreSQL through the latency proxy (``bench/latency.py``,
a 1 ms round trip), served as deployed (``THREADS=8``), one sequential keep-alive client each,
in interleaved rounds (``bench/run.py``'s ``single_client``), every request moving 1 between
two of 100 users:

- **no Pub/Sub**: the event is written in the transfer's transaction and waits for the relay;
- **published**: then published to the real Pub/Sub emulator on loopback before the answer;
- **published, Pub/Sub 1 ms away**: the same with the emulator behind a latency proxy too.

``--runs`` repeats the comparison and reports the median and the spread of the ratios.
``--compare-with DIR`` adds a fourth instance served from another checkout of the project
(a commit before a change, say), publishing to the emulator on loopback.

    .venv/bin/python -m bench.outbox [--runs 5] [--compare-with /tmp/before]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from bench.latency import LatencyProxy
from bench.run import DELAY_MS, Request, Served, serving, single_client
from db.migrate import upgrade
from dev.postgres import PostgresServer, add_users
from dev.pubsub import PubSubEmulator

ROOT = Path(__file__).resolve().parent.parent
USERS = 100
LABEL = "POST /transfers"


def _transfers(seed: int) -> Request:
    chooser = random.Random(seed)  # noqa: S311  # a reproducible workload

    def request(_: int) -> tuple[str, str, Any]:
        payer, payee = chooser.sample(range(1, USERS + 1), 2)
        return "POST", "/transfers", {"from_user_id": payer, "to_user_id": payee, "amount": 1}

    return request


def _waiting(engine: Any) -> int:
    with engine.connect() as connection:
        query = text("SELECT count(*) FROM outbox_events WHERE published_at IS NULL")
        return int(connection.scalar(query) or 0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.outbox", description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--compare-with", type=Path, help="another checkout, served beside")
    args = parser.parse_args(argv)

    server = PostgresServer(Path(tempfile.mkdtemp(prefix="bench-outbox-")))
    server.init()
    server.start()
    emulator = PubSubEmulator().start()
    proxies: list[LatencyProxy] = []
    try:
        url = server.create_database("app")
        engine = create_engine(url, poolclass=NullPool)
        upgrade(engine)
        add_users(engine, USERS, 1_000_000_000)
        emulator.create_topic("transfer-completed")
        database = LatencyProxy(server.port, DELAY_MS)
        pubsub_away = LatencyProxy(emulator.port, DELAY_MS)
        proxies += [database, pubsub_away]
        env = {"DATABASE_URL": url.set(port=database.port).render_as_string(hide_password=False)}
        near = {**env, "GOOGLE_CLOUD_PROJECT": emulator.project,
                "PUBSUB_EMULATOR_HOST": f"127.0.0.1:{emulator.port}"}  # fmt: skip
        away = {**near, "PUBSUB_EMULATOR_HOST": f"127.0.0.1:{pubsub_away.port}"}
        servers = {
            "no Pub/Sub": Served("outbox-none", "api", ROOT / "main.py", env),
            "published": Served("outbox-near", "api", ROOT / "main.py", near),
            "published, Pub/Sub 1 ms away": Served("outbox-away", "api", ROOT / "main.py", away),
        }
        if args.compare_with is not None:
            other = args.compare_with.resolve()
            servers[f"published ({other.name})"] = Served(
                "outbox-other", "api", other / "main.py", {**near, "PYTHONPATH": str(other)}
            )
        runs: list[dict[str, Any]] = []
        with serving(servers):
            for run in range(args.runs):
                runs.append(single_client(servers, {LABEL: _transfers(run)})[LABEL])
        baseline = "no Pub/Sub"
        report: dict[str, Any] = {
            name: {
                "p50_ms": [round(measured[name]["p50_ms"], 2) for measured in runs],
                "p99_ms": [round(measured[name]["p99_ms"], 2) for measured in runs],
            }
            for name in servers
        }
        for name in servers:
            ratios = [measured[name]["p50_ms"] / measured[baseline]["p50_ms"] for measured in runs]
            report[name]["p50_ratio_to_no_pubsub"] = {
                "median": round(statistics.median(ratios), 3),
                "min": round(min(ratios), 3),
                "max": round(max(ratios), 3),
            }
            p50s = [measured[name]["p50_ms"] for measured in runs]
            report[name]["p50_ms_median"] = round(statistics.median(p50s), 2)
        report["waiting_in_the_outbox"] = _waiting(engine)  # no Pub/Sub's events alone
        print(json.dumps(report, indent=2))
        engine.dispose()
    finally:
        for proxy in proxies:
            proxy.stop()
        emulator.stop()
        server.destroy()


if __name__ == "__main__":
    main()
