"""Event functions: each Pub/Sub message applied once, through the real ``transfer_events``.

Deliveries are made as Pub/Sub makes them: a raw push (which functions-framework turns into a
CloudEvent, the topic taken from the push path) or an Eventarc binary-mode CloudEvent built with
the ``cloudevents`` SDK. The end-to-end run through the real Pub/Sub emulator is
``tests/test_pubsub.py``.
"""

from __future__ import annotations

import base64
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session
from werkzeug.test import TestResponse

from dev.round_trips import counting_round_trips
from service.events import purge_expired
from tests.conftest import Instance
from tests.deliveries import PROJECT, eventarc, push

TOPIC = "transfer-requests"
SOURCE = f"//pubsub.googleapis.com/projects/{PROJECT}/topics/{TOPIC}"
EVENTS = Path(__file__).resolve().parent / "scenarios" / "events.py"


def scalar(pg: Engine, sql: str) -> Any:
    with pg.connect() as connection:
        return connection.scalar(text(sql))


def balances(pg: Engine) -> list[int]:
    with pg.connect() as connection:
        return list(connection.scalars(text("SELECT balance FROM users ORDER BY id")))


def handled(pg: Engine) -> list[tuple[str, str, str, str | None]]:
    with pg.connect() as connection:
        rows = connection.execute(
            text("SELECT source, id, outcome, reason FROM handled_events ORDER BY id, source")
        )
        return [tuple(row) for row in rows]


def event_lines(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "web.events" and r.levelno == level]


@pytest.fixture
def users(pg: Engine) -> tuple[int, int]:
    """Two users: the first with a balance of 100, the second with 0."""
    with pg.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO users (name, email, balance, created_at, updated_at) VALUES"
                " ('A', 'a@x.io', 100, now(), now()), ('B', 'b@x.io', 0, now(), now())"
            )
        )
    return 1, 2


@pytest.fixture
def events_fn(pg: Engine, instances: Callable[..., Instance]) -> Instance:
    """The real ``transfer_events`` entry point on the test PostgreSQL."""
    return instances("transfer_events")


def move(amount: int = 5) -> dict[str, int]:
    return {"from_user_id": 1, "to_user_id": 2, "amount": amount}


@pytest.mark.variants("direct", "pgbouncer", "untuned")
def test_a_message_makes_its_transfer_and_records_its_event(
    events_fn: Instance, users: tuple[int, int], pg: Engine
) -> None:
    """A pushed message moves the money and records its identity as applied; 2xx acknowledges."""
    answer = push(events_fn.client, move(5), "1001")

    assert answer.status_code == 200
    assert balances(pg) == [95, 5]
    assert scalar(pg, "SELECT count(*) FROM transfers") == 1
    assert handled(pg) == [(SOURCE, "1001", "applied", None)]


@pytest.mark.variants("direct", "pgbouncer", "untuned")
def test_a_redelivered_message_changes_nothing_and_is_acknowledged(
    events_fn: Instance, users: tuple[int, int], pg: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """The same message id again (a lost acknowledgement): 200, no second transfer."""
    caplog.set_level(logging.INFO)
    assert push(events_fn.client, move(5), "1001").status_code == 200

    again = push(events_fn.client, move(5), "1001")

    assert again.status_code == 200
    assert balances(pg) == [95, 5]
    assert scalar(pg, "SELECT count(*) FROM transfers") == 1
    assert event_lines(caplog, logging.INFO)[-1].startswith(
        f"event 1001 from {SOURCE} already handled: applied"
    )


def test_eventarc_and_a_push_of_one_message_are_one_event(
    events_fn: Instance, users: tuple[int, int], pg: Engine
) -> None:
    """An Eventarc CloudEvent and a raw push name a message alike: the second changes nothing."""
    assert eventarc(events_fn.client, move(5), "2002").status_code == 200
    assert push(events_fn.client, move(5), "2002").status_code == 200

    assert balances(pg) == [95, 5]
    assert handled(pg) == [(SOURCE, "2002", "applied", None)]


def test_the_same_id_from_another_topic_is_another_event(
    pg: Engine, users: tuple[int, int], events_fn: Instance, instances: Callable[..., Instance]
) -> None:
    """Message ids are unique within a topic only: the source is part of the identity."""
    signups = instances("signups", EVENTS)

    assert (
        push(signups.client, {"name": "C", "email": "c@x.io"}, "7", topic="signups").status_code
        == 200
    )
    assert push(events_fn.client, move(5), "7").status_code == 200

    assert [row[:3] for row in handled(pg)] == [
        ("//pubsub.googleapis.com/projects/test-project/topics/signups", "7", "applied"),
        (SOURCE, "7", "applied"),
    ]
    assert balances(pg) == [95, 5, 0]


POISON = {
    "not JSON": (b"{not json", "malformed_event: the message's data is not valid JSON"),
    "not UTF-8": (b"\xff\xfe", "malformed_event: the message's data is not UTF-8"),
    "half a surrogate pair": (
        b'{"from_user_id": 1, "to_user_id": 2, "amount": 5, "\\ud800": 1}',
        "malformed_event: the message's data escapes half of a surrogate pair, which stands for"
        " no character",
    ),
    "not an object": ([1, 2], "malformed_event: the message's data must be a JSON object"),
    "a field rule": (
        {"from_user_id": 1, "to_user_id": 2, "amount": 0},
        "validation_failed: the request is not valid (amount: Input should be greater than or"
        " equal to 1)",
    ),
    "a missing field": (
        {"from_user_id": 1, "amount": 5},
        "validation_failed: the request is not valid (to_user_id: Field required)",
    ),
    "an unknown user": (
        {"from_user_id": 1, "to_user_id": 99, "amount": 5},
        "not_found: user 99 not found",
    ),
    "insufficient funds": (move(101), "insufficient_funds: user 1 has a balance below 101"),
    "a transfer to oneself": (
        {"from_user_id": 1, "to_user_id": 1, "amount": 5},
        "validation_failed: the request is not valid (to_user_id: must differ from from_user_id)",
    ),
}


@pytest.mark.parametrize("kind", POISON)
def test_a_poison_message_is_acknowledged_recorded_once_and_moves_nothing(
    events_fn: Instance,
    users: tuple[int, int],
    pg: Engine,
    caplog: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    """Refused for good: 200 at the first delivery, the reason recorded, one WARNING line naming
    the event and the reason; a redelivery is acknowledged with no new judgement."""
    caplog.set_level(logging.INFO)
    data, reason = POISON[kind]

    first = push(events_fn.client, data, "3003")
    again = push(events_fn.client, data, "3003")

    assert (first.status_code, again.status_code) == (200, 200)
    assert handled(pg) == [(SOURCE, "3003", "rejected", reason)]
    assert balances(pg) == [100, 0]
    assert scalar(pg, "SELECT count(*) FROM transfers") == 0
    warnings = event_lines(caplog, logging.WARNING)
    assert len(warnings) == 1
    assert warnings[0].startswith(f"event 3003 from {SOURCE} rejected: {reason} (")
    assert event_lines(caplog, logging.INFO)[-1].startswith(
        f"event 3003 from {SOURCE} already handled: rejected: {reason}"
    )


@pytest.mark.parametrize(
    ("deliver", "reason"),
    [
        (
            lambda client: eventarc(client, move(), "4004", event_type="google.cloud.audit.log.v1"),
            "unknown_event: events of type google.cloud.audit.log.v1 are not taken here",
        ),
        (
            lambda client: push(client, move(), "4004", topic="other-topic"),
            "unknown_event: messages from topic other-topic are not taken here, only "
            "transfer-requests",
        ),
    ],
    ids=["an unknown event type", "another topic"],
)
def test_an_event_the_function_does_not_take_is_rejected(
    events_fn: Instance,
    users: tuple[int, int],
    pg: Engine,
    deliver: Callable[[FlaskClient], TestResponse],
    reason: str,
) -> None:
    """Another type, or a message from another topic: recorded as rejected and acknowledged."""
    assert deliver(events_fn.client).status_code == 200

    assert [row[2:] for row in handled(pg)] == [("rejected", reason)]
    assert balances(pg) == [100, 0]


def test_the_first_outcome_is_final(
    events_fn: Instance, users: tuple[int, int], pg: Engine
) -> None:
    """Rejected for want of funds, the message stays rejected after the funds arrive."""
    assert push(events_fn.client, move(150), "5005").status_code == 200
    with pg.begin() as connection:
        connection.execute(text("UPDATE users SET balance = 1000 WHERE id = 1"))

    assert push(events_fn.client, move(150), "5005").status_code == 200

    assert balances(pg) == [1000, 0]
    assert [row[2] for row in handled(pg)] == ["rejected"]


@pytest.mark.variants("direct", "pgbouncer", "untuned")
def test_a_transient_failure_fails_the_delivery_and_keeps_nothing(
    pg: Engine, instances: Callable[..., Instance], caplog: pytest.LogCaptureFixture
) -> None:
    """A serialization failure on every attempt: retried in the scope, then a 503 so that Pub/Sub
    redelivers; nothing is recorded, and the redelivery applies the message."""
    scenario = instances("signups", EVENTS)
    scenario.module.attempts.clear()
    signup = {"name": "A", "email": "a@x.io"}

    failed = push(
        scenario.client, signup, "6006", topic="signups", attributes={"fail": "serialization"}
    )

    assert failed.status_code == 503
    assert failed.json["error"]["code"] == "service_unavailable"
    assert len(scenario.module.attempts) == 4
    assert scalar(pg, "SELECT count(*) FROM handled_events") == 0
    assert scalar(pg, "SELECT count(*) FROM users") == 0
    assert "6006" in event_lines(caplog, logging.WARNING)[-1]

    assert push(scenario.client, signup, "6006", topic="signups").status_code == 200
    assert scalar(pg, "SELECT count(*) FROM users") == 1


def test_a_bug_is_redelivered_not_dropped(pg: Engine, instances: Callable[..., Instance]) -> None:
    """An unexpected exception is a 500: the message is kept for a fixed deployment."""
    scenario = instances("signups", EVENTS)

    failed = push(
        scenario.client, {"name": "A", "email": "a@x.io"}, "6007", topic="signups",
        attributes={"fail": "bug"},
    )  # fmt: skip

    assert failed.status_code == 500
    assert failed.json == {"error": {"code": "internal", "message": "internal error"}}
    assert scalar(pg, "SELECT count(*) FROM handled_events") == 0
    assert scalar(pg, "SELECT count(*) FROM users") == 0


def test_an_unreachable_database_fails_the_delivery(
    monkeypatch: pytest.MonkeyPatch, instances: Callable[..., Instance]
) -> None:
    """No database: a 503 with Retry-After, so the message is redelivered later."""
    monkeypatch.setenv("DATABASE_URL", "postgresql+pg8000://app:x@127.0.0.1:9/app")
    monkeypatch.setenv("DB_POOL_TIMEOUT", "1")
    events_fn = instances("transfer_events")

    failed = push(events_fn.client, move(), "6008")

    assert failed.status_code == 503
    assert failed.headers["Retry-After"] == "1"


def test_a_message_pushed_to_a_path_without_its_topic_is_not_dropped(
    events_fn: Instance, users: tuple[int, int], pg: Engine
) -> None:
    """A push endpoint whose path names no topic is a setting to fix: a 500 that says what to
    fix, so the message is redelivered once it is fixed; nothing recorded."""
    body = {
        "subscription": f"projects/{PROJECT}/subscriptions/s",
        "message": {"data": base64.b64encode(b"{}").decode(), "messageId": "6009"},
    }

    answer = events_fn.client.post("/", json=body)

    assert answer.status_code == 500
    assert answer.json["error"]["code"] == "misrouted_event"
    assert answer.json["error"]["message"].endswith(
        "set the push endpoint to a path ending in /projects/PROJECT/topics/transfer-requests"
    )
    assert handled(pg) == []


@pytest.mark.variants("direct", "pgbouncer")
def test_one_message_delivered_at_once_to_two_instances_moves_money_once(
    pg: Engine, users: tuple[int, int], instances: Callable[..., Instance]
) -> None:
    """Twenty concurrent deliveries of one message over two instances: one transfer, all 200."""
    clients = [instances("transfer_events").client, instances("transfer_events").client]
    start = threading.Barrier(20)

    def deliver(n: int) -> int:
        start.wait()
        return push(clients[n % 2], move(5), "7007").status_code

    with ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(deliver, range(20)))

    assert statuses == [200] * 20
    assert balances(pg) == [95, 5]
    assert scalar(pg, "SELECT count(*) FROM transfers") == 1


@pytest.mark.variants("direct", "untuned")
def test_every_outcome_closes_the_session_and_returns_the_connection(
    pg: Engine, instances: Callable[..., Instance]
) -> None:
    """Applied, redelivered, rejected, failed: each time a new session, closed, nothing held."""
    scenario = instances("signups", EVENTS)
    scenario.module.sessions.clear()
    deliveries = [
        ({"name": "A", "email": "a@x.io"}, "1", {}),
        ({"name": "A", "email": "a@x.io"}, "1", {}),
        ({"name": "B", "email": "a@x.io"}, "2", {}),  # the same email: 409, rejected
        ({"name": "C", "email": "c@x.io"}, "3", {"fail": "bug"}),
        (b"not json", "4", {}),
    ]
    for data, message_id, attributes in deliveries:
        push(scenario.client, data, message_id, topic="signups", attributes=attributes)
        assert scenario.database.engine.pool.checkedout() == 0  # type: ignore[attr-defined]

    sessions = scenario.module.sessions
    assert len({id(session) for session in sessions}) == len(sessions)
    assert all(not session.in_transaction() for session in sessions)
    assert scalar(pg, "SELECT count(*) FROM users") == 1


def test_a_transfer_event_costs_the_round_trips_of_the_same_post(
    events_fn: Instance, users: tuple[int, int], instances: Callable[..., Instance]
) -> None:
    """The claim travels with the transaction's first statement: no round trip of its own."""
    api = instances().client
    push(events_fn.client, move(1), "8000")  # warm: connections open
    api.post("/transfers", json=move(1))

    with counting_round_trips() as event:
        assert push(events_fn.client, move(1), "8001").status_code == 200
    with counting_round_trips() as post:
        assert api.post("/transfers", json=move(1)).status_code == 201
    with counting_round_trips() as redelivered:
        assert push(events_fn.client, move(1), "8001").status_code == 200

    assert event["round_trips"] == post["round_trips"] == 4
    assert redelivered["round_trips"] <= 3  # the claim and its ROLLBACK, the outcome's read


def test_an_event_that_inserts_a_row_costs_two_round_trips(
    pg: Engine, instances: Callable[..., Instance]
) -> None:
    """Like ``POST /users``: BEGIN, the claim and the INSERT in one write, then COMMIT."""
    scenario = instances("signups", EVENTS)
    push(scenario.client, {"name": "A", "email": "a@x.io"}, "1", topic="signups")

    with counting_round_trips() as counts:
        answer = push(scenario.client, {"name": "B", "email": "b@x.io"}, "2", topic="signups")

    assert answer.status_code == 200
    assert counts["round_trips"] == 2


def test_an_event_function_that_runs_no_statement_still_claims_its_event(
    pg: Engine, instances: Callable[..., Instance]
) -> None:
    """The claim waiting for a statement is sent before COMMIT: the event is still recorded."""
    scenario = instances("ignore", EVENTS)

    assert push(scenario.client, {}, "9", topic="signups").status_code == 200

    assert [row[1:3] for row in handled(pg)] == [("9", "applied")]


def test_a_missing_events_table_is_a_500_and_the_message_kept(
    pg: Engine, users: tuple[int, int], events_fn: Instance
) -> None:
    """A schema behind the code (migration not applied) fails the delivery; nothing is moved."""
    with pg.begin() as connection:
        connection.execute(text("ALTER TABLE handled_events RENAME TO handled_events_away"))
    try:
        assert push(events_fn.client, move(5), "9009").status_code == 500
    finally:
        with pg.begin() as connection:
            connection.execute(text("ALTER TABLE handled_events_away RENAME TO handled_events"))
    assert balances(pg) == [100, 0]


def test_events_on_the_embedded_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, instances: Callable[..., Instance]
) -> None:
    """On SQLite the claim is a statement of its own, with the same outcomes."""
    monkeypatch.chdir(tmp_path)
    api = instances()
    events_fn = instances("transfer_events")
    api.client.post("/users", json={"name": "A", "email": "a@x.io", "balance": 10})
    api.client.post("/users", json={"name": "B", "email": "b@x.io"})

    assert push(events_fn.client, move(4), "1").status_code == 200
    assert push(events_fn.client, move(4), "1").status_code == 200
    assert push(events_fn.client, move(40), "2").status_code == 200

    assert api.client.get("/users/1").json["balance"] == 6
    assert len(api.client.get("/transfers").json["transfers"]) == 1


def test_outcomes_are_kept_seven_days_and_purged_after(
    events_fn: Instance, users: tuple[int, int], pg: Engine
) -> None:
    """purge_expired removes outcomes older than 7 days and keeps younger ones."""
    push(events_fn.client, move(1), "old")
    push(events_fn.client, move(1), "young")
    with pg.begin() as connection:
        connection.execute(
            text("UPDATE handled_events SET handled_at = now() - interval '7 days 1 minute'"
                 " WHERE id = 'old'")
        )  # fmt: skip

    with Session(pg) as session, session.begin():
        assert purge_expired(session) == 1

    assert [row[1] for row in handled(pg)] == ["young"]


@pytest.mark.parametrize("message_id", ["nul\x00id", "x" * 2000], ids=["U+0000", "too long"])
def test_an_identity_the_database_cannot_store_is_acknowledged_not_redelivered(
    events_fn: Instance,
    users: tuple[int, int],
    pg: Engine,
    caplog: pytest.LogCaptureFixture,
    message_id: str,
) -> None:
    """Its claim is refused for good, and so would its record be: a 200 with one WARNING line,
    rather than a refusal Pub/Sub would redeliver until the retry window ends."""
    answer = eventarc(events_fn.client, move(5), message_id)

    assert answer.status_code == 200
    assert balances(pg) == [100, 0]
    assert handled(pg) == []
    assert any("rejected, not recorded" in line for line in event_lines(caplog, logging.WARNING))
