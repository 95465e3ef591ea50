"""The transactional outbox against the real Pub/Sub emulator: every committed transfer is one
event on ``transfer-completed``, none for what rolled back, none lost while Pub/Sub is away.

The instances reach the emulator through a ``Gate`` that can refuse connections or accept
them and never answer; a pull subscription made by each test reads what was published.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from db import outbox
from db.config import load_settings
from db.engine import Database
from db.session import transaction
from dev.pubsub import PubSubEmulator
from dev.round_trips import counting_round_trips
from tests.conftest import Instance
from tests.deliveries import push
from tests.gate import Gate
from tests.serving import ServedFunction, wait_for

TOPIC = "transfer-completed"
_names = itertools.count()


@pytest.fixture(scope="module")
def emulator() -> Iterator[PubSubEmulator]:
    """The Pub/Sub emulator for this module, with the topic; a missing one fails, naming its
    package."""
    started = PubSubEmulator().start()
    started.create_topic(TOPIC)
    yield started
    started.stop()


@pytest.fixture
def gate(emulator: PubSubEmulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    """Instances started from now on publish to the emulator through this gate, open."""
    between = Gate(emulator.port)
    between.set("open")
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", emulator.project)
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", between.host)
    yield between
    between.close()


@pytest.fixture
def subscription(emulator: PubSubEmulator) -> str:
    """A new pull subscription on the topic: it holds what is published from now on."""
    name = f"ledger-{next(_names)}"
    emulator.create_pull_subscription(name, TOPIC)
    return name


@pytest.fixture
def users(pg: Engine) -> None:
    """Users 1 and 2, with balances of 1000 and 0."""
    with pg.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO users (name, email, balance, created_at, updated_at) VALUES"
                " ('A', 'a@x.io', 1000, now(), now()), ('B', 'b@x.io', 0, now(), now())"
            )
        )


def move(amount: int = 1) -> dict[str, int]:
    return {"from_user_id": 1, "to_user_id": 2, "amount": amount}


def rows(pg: Engine, sql: str) -> list[Any]:
    with pg.connect() as connection:
        return [tuple(row) for row in connection.execute(text(sql))]


def waiting(pg: Engine) -> int:
    return int(rows(pg, "SELECT count(*) FROM outbox_events WHERE published_at IS NULL")[0][0])


def transfer_ids(pg: Engine) -> set[int]:
    return {row[0] for row in rows(pg, "SELECT id FROM transfers")}


def published_ids(messages: list[dict[str, Any]]) -> list[int]:
    return [json.loads(message["data"])["id"] for message in messages]


@pytest.mark.variants("direct", "pgbouncer", "untuned")
def test_every_committed_transfer_is_one_event_carrying_what_get_answers(
    pg: Engine,
    users: None,
    gate: Gate,
    subscription: str,
    emulator: PubSubEmulator,
    instances: Callable[..., Instance],
) -> None:
    """Committed: one event each, its data the GET answer; refused or replayed: none."""
    client = instances().client
    created = [client.post("/transfers", json=move(amount)) for amount in (1, 2, 3)]
    keyed = {"Idempotency-Key": "pay-1"}
    first = client.post("/transfers", json=move(4), headers=keyed)
    replay = client.post("/transfers", json=move(4), headers=keyed)
    refused = client.post("/transfers", json=move(10_000))

    assert [answer.status_code for answer in created] == [201, 201, 201]
    assert (first.status_code, replay.status_code, refused.status_code) == (201, 201, 409)
    assert replay.headers["Idempotent-Replayed"] == "true"
    messages = emulator.pull(subscription)
    assert len(messages) == 4
    for message in messages:
        shown = client.get(f"/transfers/{json.loads(message['data'])['id']}").get_json()
        assert json.loads(message["data"]) == shown
        assert message["attributes"]["event_type"] == "transfer.completed"
    assert len({message["attributes"]["event_id"] for message in messages}) == 4
    assert sorted(published_ids(messages)) == sorted(transfer_ids(pg))
    wait_for(lambda: waiting(pg) == 0, 5)  # the marks are not waited for (db/outbox.py)


def test_the_outbox_row_costs_no_round_trip_of_its_own(
    pg: Engine, users: None, instances: Callable[..., Instance]
) -> None:
    """Without Pub/Sub, a transfer with its event costs the 4 round trips it cost before."""
    client = instances().client
    client.post("/transfers", json=move())  # warm: a connection open

    with counting_round_trips() as counts:
        assert client.post("/transfers", json=move()).status_code == 201

    assert counts["round_trips"] == 4
    assert waiting(pg) == 2


def test_publishing_and_marking_published_add_no_round_trip_to_the_database(
    pg: Engine, users: None, gate: Gate, subscription: str, emulator: PubSubEmulator,
    instances: Callable[..., Instance],
) -> None:  # fmt: skip
    """With Pub/Sub, a transfer still waits on the database 4 times: the mark goes in one
    write whose answer the connection's next statement reads. The mark is applied."""
    client = instances().client
    client.post("/transfers", json=move())  # warm: a connection open, the publisher built

    with counting_round_trips() as counts:
        assert client.post("/transfers", json=move()).status_code == 201

    assert counts == {"writes": 5, "round_trips": 4}
    assert len(emulator.pull(subscription)) == 2
    wait_for(lambda: waiting(pg) == 0, 5)


@pytest.mark.variants("direct", "untuned")
def test_work_that_raises_after_emitting_leaves_no_event(
    pg: Engine, gate: Gate, subscription: str, emulator: PubSubEmulator
) -> None:
    """The event is part of the transaction: a rollback takes it away, and nothing is sent."""
    database = Database(load_settings())

    def emit_then_fail(session: Any) -> None:
        outbox.emit(session, TOPIC, {"n": 1})
        session.execute(text("SELECT 1"))
        raise RuntimeError("after the event")

    try:
        with pytest.raises(RuntimeError):
            transaction(database, emit_then_fail)
    finally:
        database.dispose()

    assert rows(pg, "SELECT count(*) FROM outbox_events") == [(0,)]
    assert emulator.pull(subscription, wait=1) == []


@pytest.mark.variants("direct", "untuned")
def test_an_event_alone_in_its_transaction_is_written_and_published(
    pg: Engine, gate: Gate, subscription: str, emulator: PubSubEmulator
) -> None:
    """Work that only emits still commits its row (sent with the COMMIT) and publishes it."""
    database = Database(load_settings())
    try:
        event_id = transaction(database, lambda session: outbox.emit(session, TOPIC, {"n": 1}))
    finally:
        database.dispose()

    [message] = emulator.pull(subscription)
    assert message["attributes"] == {"event_id": event_id}
    assert json.loads(message["data"]) == {"n": 1}
    marked = "SELECT event_id FROM outbox_events WHERE published_at IS NOT NULL"
    wait_for(lambda: rows(pg, marked) == [(event_id,)], 5)


def test_an_event_in_a_read_only_transaction_fails_it_and_is_not_published(
    pg: Engine, gate: Gate, subscription: str, emulator: PubSubEmulator
) -> None:
    """The row sent with the COMMIT is refused (read-only): the commit fails with its error."""
    database = Database(load_settings())
    try:
        with pytest.raises(Exception, match="read-only"):
            transaction(
                database, lambda session: outbox.emit(session, TOPIC, {"n": 1}), read_only=True
            )
    finally:
        database.dispose()

    assert rows(pg, "SELECT count(*) FROM outbox_events") == [(0,)]
    assert emulator.pull(subscription, wait=1) == []


@pytest.mark.parametrize("mode", ["refusing", "silent"])
def test_requests_stay_prompt_while_pubsub_is_away_and_the_relay_publishes_after(
    mode: Any,
    pg: Engine,
    users: None,
    gate: Gate,
    subscription: str,
    emulator: PubSubEmulator,
    instances: Callable[..., Instance],
) -> None:
    """Refused or never answered: each transfer answers within about a second, its event
    waits; the relay answers 503 meanwhile, then publishes every waiting event."""
    gate.set(mode)
    api, relay = instances().client, instances("relay_outbox").client

    timings = []
    for _ in range(5):
        started = time.monotonic()
        assert api.post("/transfers", json=move()).status_code == 201
        timings.append(time.monotonic() - started)
    away = relay.post("/")

    assert max(timings) < 1.5
    assert sum(timings) < 2.5  # after one failure, requests leave the publishing to the relay
    assert away.status_code == 503
    assert away.get_json()["error"]["code"] == "pubsub_unavailable"
    assert waiting(pg) == 5

    gate.set("open")
    back = relay.post("/")

    assert back.status_code == 200
    assert back.get_json()["published"] == 5
    assert sorted(published_ids(emulator.pull(subscription))) == sorted(transfer_ids(pg))
    assert waiting(pg) == 0


def test_two_relays_at_once_publish_every_waiting_event(
    pg: Engine,
    users: None,
    gate: Gate,
    subscription: str,
    emulator: PubSubEmulator,
    instances: Callable[..., Instance],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """300 events waiting, two relays taking batches of 20 side by side: every event is
    published, and the two took different batches (SKIP LOCKED)."""
    gate.set("refusing")
    api = instances().client
    for _ in range(300):
        assert api.post("/transfers", json=move()).status_code == 201
    gate.set("open")
    monkeypatch.setattr("web.relay.BATCH", 20)
    relays = [instances("relay_outbox").client for _ in range(2)]
    start = threading.Barrier(2)

    def run(client: Any) -> Any:
        start.wait()
        return client.post("/")

    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(run, relays))

    assert [answer.status_code for answer in answers] == [200, 200]
    counts = [answer.get_json()["published"] for answer in answers]
    assert sum(counts) >= 300
    assert min(counts) > 0
    assert set(published_ids(emulator.pull(subscription))) == transfer_ids(pg)
    assert waiting(pg) == 0


def test_a_process_killed_during_a_burst_loses_no_event(
    pg: Engine,
    users: None,
    gate: Gate,
    subscription: str,
    emulator: PubSubEmulator,
    tmp_path: Path,
    instances: Callable[..., Instance],
) -> None:
    """SIGKILL in the middle of concurrent transfers, some of them between their commit and
    their publish; after a restart and a relay, every transfer in the database has its event."""
    gate.set("silent")  # each publish hangs until its time-out: commits wait to be published
    env = {"DATABASE_URL": os.environ["DATABASE_URL"], "THREADS": "8"}
    served = ServedFunction("api", env, tmp_path)
    body = json.dumps(move()).encode()
    stop = threading.Event()

    def keep_posting() -> None:
        while not stop.is_set() and served.post("/transfers", body) != 502:
            pass

    threads = [threading.Thread(target=keep_posting) for _ in range(8)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(transfer_ids(pg)) >= 20, 30)
    served.kill()
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    served.stop()
    committed = transfer_ids(pg)
    assert waiting(pg) > 0  # some were cut off before their publish

    gate.set("open")
    answer = instances("relay_outbox").client.post("/")

    assert answer.status_code == 200
    assert set(published_ids(emulator.pull(subscription))) == committed
    assert waiting(pg) == 0


def test_no_pubsub_configured_attempts_nothing_and_the_relay_says_why(
    pg: Engine, users: None, instances: Callable[..., Instance], caplog: pytest.LogCaptureFixture
) -> None:
    """The embedded default's way: events wait, one line at start says so, and the relay
    answers 500 ``pubsub_not_configured``."""
    api = instances().client
    relay = instances("relay_outbox").client

    assert api.post("/transfers", json=move()).status_code == 201
    answer = relay.post("/")

    assert waiting(pg) == 1
    assert answer.status_code == 500
    assert answer.get_json()["error"]["code"] == "pubsub_not_configured"
    assert relay.get("/").status_code == 405


def test_published_events_are_kept_seven_days_and_purged_after(
    pg: Engine, users: None, gate: Gate, instances: Callable[..., Instance]
) -> None:
    """The relay removes events published over 7 days ago, and keeps those waiting."""
    api, relay = instances().client, instances("relay_outbox").client
    for _ in range(3):
        api.post("/transfers", json=move())
    with pg.begin() as connection:
        connection.execute(
            text(
                "UPDATE outbox_events SET published_at = now() - interval '7 days 1 minute'"
                " WHERE id = 1"
            )
        )
        connection.execute(text("UPDATE outbox_events SET published_at = NULL WHERE id = 3"))

    answer = relay.post("/")

    assert answer.get_json() == {"published": 1, "purged": 1}
    assert rows(pg, "SELECT id FROM outbox_events ORDER BY id") == [(2,), (3,)]


def test_a_consumer_applies_two_publishes_of_one_event_once(
    pg: Engine, users: None, instances: Callable[..., Instance]
) -> None:
    """Two Pub/Sub messages (two message ids) with one ``event_id``: one transfer."""
    consumer = instances("transfer_events").client
    same = {"event_id": "5f2c-order-1"}

    first = push(consumer, move(5), "3001", attributes=same)
    again = push(consumer, move(5), "3002", attributes=same)
    other = push(consumer, move(5), "3003", attributes={"event_id": "5f2c-order-2"})

    assert [first.status_code, again.status_code, other.status_code] == [200, 200, 200]
    assert len(transfer_ids(pg)) == 2
    assert [row[0] for row in rows(pg, "SELECT id FROM handled_events ORDER BY id")] == [
        "event_id:5f2c-order-1",
        "event_id:5f2c-order-2",
    ]


def test_a_blank_event_id_is_refused_for_good(
    pg: Engine, users: None, instances: Callable[..., Instance]
) -> None:
    consumer = instances("transfer_events").client

    answer = push(consumer, move(5), "3001", attributes={"event_id": " "})

    assert answer.status_code == 200  # acknowledged: no redelivery would fare better
    assert transfer_ids(pg) == set()
    [(outcome, reason)] = rows(pg, "SELECT outcome, reason FROM handled_events")
    assert outcome == "rejected"
    assert "event_id attribute must be 1 to 255 characters" in reason


def test_a_chain_through_the_emulator_is_exactly_once(
    pg: Engine,
    users: None,
    emulator: PubSubEmulator,
    tmp_path: Path,
) -> None:
    """A producer publishes one request twice, with one ``event_id``: the emulator pushes both
    to a served ``transfer_events``, which makes one transfer and publishes one event."""
    emulator.create_topic("transfer-requests")
    env = {"DATABASE_URL": os.environ["DATABASE_URL"], "GOOGLE_CLOUD_PROJECT": emulator.project,
           "PUBSUB_EMULATOR_HOST": f"127.0.0.1:{emulator.port}"}  # fmt: skip
    served = ServedFunction("transfer_events", env, tmp_path)
    name = f"ledger-{next(_names)}"
    emulator.create_pull_subscription(name, TOPIC)
    try:
        endpoint = f"http://127.0.0.1:{served.port}{emulator.push_path('transfer-requests')}"
        emulator.create_push_subscription(f"requests-{name}", "transfer-requests", endpoint)
        body = json.dumps(move(7)).encode()
        for _ in range(2):
            emulator.publish("transfer-requests", [body], {"event_id": "order-77"})
        wait_for(lambda: rows(pg, "SELECT count(*) FROM handled_events") == [(1,)], 30)
        time.sleep(1)  # room for a second transfer, were there to be one
        completed = emulator.pull(name)
    finally:
        served.stop()

    assert len(transfer_ids(pg)) == 1
    assert rows(pg, "SELECT balance FROM users ORDER BY id") == [(993,), (7,)]
    assert published_ids(completed) == sorted(transfer_ids(pg))
