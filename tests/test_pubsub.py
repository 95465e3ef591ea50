"""``transfer_events`` behind the real Pub/Sub emulator, served by real functions-framework
processes, with a step between the two that loses acknowledgements and delivers twice at once.

The emulator pushes each message to ``FaultyPush``, which forwards it to an instance and
relays the answer, except where told otherwise: it answers 503 after the function committed
(an acknowledgement lost on the way back), or sends one delivery to two instances at the same
moment. PostgreSQL is restarted in the middle of the run.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.pool import NullPool

from db.migrate import upgrade
from dev.postgres import PostgresServer, add_users
from dev.pubsub import PubSubEmulator
from tests.serving import ServedFunction, wait_for

TOPIC = "transfer-requests"
USERS = 10
START_BALANCE = 100


@dataclass
class FaultyPush:
    """Between the emulator and the instances: forwards each push, relays or loses the answer."""

    instances: list[ServedFunction]
    lose_ack: Callable[[str], bool] = lambda _: False
    twice_at_once: Callable[[str], bool] = lambda _: False
    deliveries: Counter[str] = field(default_factory=Counter)
    acknowledged: set[str] = field(default_factory=set)
    after_ack: list[str] = field(default_factory=list)
    lost: set[str] = field(default_factory=set)
    statuses: Counter[int] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # BaseHTTPRequestHandler's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = outer.deliver(self.path, body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def deliver(self, path: str, body: bytes) -> int:
        message_id = json.loads(body)["message"]["messageId"]
        with self._lock:
            self.deliveries[message_id] += 1
            first = self.deliveries[message_id] == 1
            if message_id in self.acknowledged:
                self.after_ack.append(message_id)
            instance = self.instances[self.deliveries.total() % len(self.instances)]
        if first and self.twice_at_once(message_id):
            with ThreadPoolExecutor(len(self.instances)) as pool:
                answers: list[int] = list(pool.map(lambda i: i.post(path, body), self.instances))
            status = max(answers)  # a failure on either side is relayed
        else:
            status = instance.post(path, body)
        with self._lock:
            self.statuses[status] += 1
            if status == 200 and first and self.lose_ack(message_id):
                self.lost.add(message_id)
                return 503
            if 200 <= status < 300:
                self.acknowledged.add(message_id)
        return status

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def emulator() -> Iterator[PubSubEmulator]:
    """The Pub/Sub emulator for this module; a missing one fails, naming its package."""
    started = PubSubEmulator().start()
    yield started
    started.stop()


@pytest.fixture
def server() -> Iterator[PostgresServer]:
    """A migrated server of the test's own, which it may restart."""
    own = PostgresServer()
    own.init()
    own.start()
    engine = create_engine(own.create_database("app"))
    upgrade(engine)
    add_users(engine, USERS, START_BALANCE)
    engine.dispose()
    own.add_runtime_user("app")
    yield own
    own.destroy()


@pytest.fixture
def served(server: PostgresServer, tmp_path: Path) -> Iterator[list[ServedFunction]]:
    """Two instances of ``transfer_events`` on the test's server, as the runtime role."""
    # Served as in production: by a user with the runtime role's privileges only.
    env = {"DATABASE_URL": server.runtime_url("app").render_as_string(hide_password=False),
           "THREADS": "8", "DB_POOL_TIMEOUT": "2"}  # fmt: skip
    instances = [ServedFunction("transfer_events", env, tmp_path) for _ in range(2)]
    yield instances
    for instance in instances:
        instance.stop()


def _outcomes(engine: Engine) -> Counter[str]:
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT outcome, count(*) FROM handled_events GROUP BY 1"))
        return Counter({outcome: int(count) for outcome, count in rows})


def test_500_messages_through_lost_acks_duplicates_and_a_restart_apply_exactly_once(
    emulator: PubSubEmulator, server: PostgresServer, served: list[ServedFunction]
) -> None:
    """Every message moves 1 exactly once: balances exact, no message redelivered once
    acknowledged, though acknowledgements were lost, deliveries doubled and PostgreSQL restarted."""
    step = FaultyPush(
        served,
        lose_ack=lambda message_id: int(message_id) % 7 == 0,
        twice_at_once=lambda message_id: int(message_id) % 11 == 0,
    )
    topic = f"{TOPIC}"
    emulator.create_topic(topic)
    emulator.create_push_subscription(
        "transfers-exactly-once", topic, step.endpoint + emulator.push_path(topic)
    )
    chooser = random.Random(14)  # a reproducible workload, not a secret
    moves = [chooser.sample(range(1, USERS + 1), 2) for _ in range(500)]
    expected = Counter(dict.fromkeys(range(1, USERS + 1), START_BALANCE))
    for sender, receiver in moves:
        expected[sender] -= 1
        expected[receiver] += 1
    engine = create_engine(server.url("app"), poolclass=NullPool)  # none held over the restart

    ids = emulator.publish(
        topic,
        [json.dumps({"from_user_id": s, "to_user_id": r, "amount": 1}).encode() for s, r in moves],
    )
    wait_for(lambda: _outcomes(engine).total() >= 150, 60)
    server.stop("fast")  # every connection of both instances goes with it
    time.sleep(1.5)
    server.start()
    wait_for(lambda: _outcomes(engine)["applied"] == 500, 180)
    time.sleep(3)  # time for any redelivery still to come

    with engine.connect() as connection:
        balances: dict[int, int] = {
            int(row.id): int(row.balance)
            for row in connection.execute(text("SELECT id, balance FROM users"))
        }
        transfers = connection.scalar(text("SELECT count(*) FROM transfers"))
    engine.dispose()
    step.stop()
    assert _outcomes(engine) == Counter({"applied": 500})
    assert transfers == 500
    assert balances == dict(expected)
    assert step.after_ack == []
    assert set(step.acknowledged) == set(ids)
    assert step.lost  # acknowledgements were lost after the commit...
    assert all(step.deliveries[m] >= 2 for m in step.lost)  # ...and those were redelivered
    assert step.statuses[503] > 0  # some deliveries met the restart


POISON = [
    b"{not json",
    b"[1, 2]",
    json.dumps({"from_user_id": 1, "to_user_id": 2, "amount": 0}).encode(),
    json.dumps({"from_user_id": 1, "to_user_id": 99, "amount": 1}).encode(),
    json.dumps({"from_user_id": 1, "to_user_id": 2, "amount": 10**6}).encode(),
    json.dumps({"from_user_id": 1, "to_user_id": 1, "amount": 1}).encode(),
]


def test_each_poison_message_is_acknowledged_at_its_first_delivery(
    emulator: PubSubEmulator, server: PostgresServer, served: list[ServedFunction]
) -> None:
    """Malformed, invalid, unknown user, no funds, to oneself: one delivery each, recorded as
    rejected, no transfer."""
    step = FaultyPush(served)
    topic = "poison-transfers"
    emulator.create_topic(topic)
    # The function takes transfer-requests only: push this topic's messages as if they were.
    emulator.create_push_subscription(
        "poison-push", topic, step.endpoint + emulator.push_path(TOPIC)
    )
    engine = create_engine(server.url("app"))

    ids = emulator.publish(topic, POISON)
    wait_for(lambda: _outcomes(engine)["rejected"] == len(POISON), 60)
    time.sleep(2)  # a redelivery would come within a second

    with engine.connect() as connection:
        transfers = connection.scalar(text("SELECT count(*) FROM transfers"))
    engine.dispose()
    step.stop()
    assert transfers == 0
    assert {m: step.deliveries[m] for m in ids} == dict.fromkeys(ids, 1)
    assert step.statuses == Counter({200: len(POISON)})
