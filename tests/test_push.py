"""``python -m dev.push``, the README's way to send a Pub/Sub push to a locally served event
function, against transfer_events served by functions-framework."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from tests.conftest import ROOT
from tests.serving import ServedFunction


@pytest.fixture
def served(pg: Engine, tmp_path: Path) -> Iterator[ServedFunction]:
    """transfer_events served on the test PostgreSQL, with two users."""
    with pg.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO users (name, email, balance, created_at, updated_at) VALUES"
                " ('A', 'a@x.io', 10, now(), now()), ('B', 'b@x.io', 0, now(), now())"
            )
        )
    function = ServedFunction("transfer_events", {}, tmp_path)
    yield function
    function.stop()


def _push(served: ServedFunction, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dev.push", "--url", f"http://127.0.0.1:{served.port}", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def _outcomes(pg: Engine) -> list[tuple[str, str, str | None]]:
    with pg.connect() as connection:
        rows = connection.execute(
            text("SELECT id, outcome, reason FROM handled_events ORDER BY id")
        )
        return [(row[0], row[1], row[2]) for row in rows]


def test_a_pushed_message_is_applied_once_however_often_it_is_sent(
    served: ServedFunction, pg: Engine
) -> None:
    """The push reaches the function as Pub/Sub's would: applied; sent again with the same id,
    acknowledged and nothing more."""
    transfer = json.dumps({"from_user_id": 1, "to_user_id": 2, "amount": 4})

    first = _push(served, "transfer-requests", transfer, "--id", "41")
    again = _push(served, "transfer-requests", transfer, "--id", "41")

    assert (first.returncode, again.returncode) == (0, 0), first.stderr
    assert ": 200 " in first.stdout
    assert "acknowledged" in first.stdout
    assert _outcomes(pg) == [("41", "applied", None)]
    with pg.connect() as connection:
        assert connection.scalar(text("SELECT count(*) FROM transfers")) == 1


def test_a_pushed_message_breaking_a_rule_is_recorded_as_rejected(
    served: ServedFunction, pg: Engine
) -> None:
    """A new id each run; a transfer to oneself is acknowledged and recorded with its reason."""
    result = _push(served, "transfer-requests", '{"from_user_id": 1, "to_user_id": 1, "amount": 1}')

    assert result.returncode == 0, result.stderr
    [(_, outcome, reason)] = _outcomes(pg)
    assert outcome == "rejected"
    assert str(reason).startswith("validation_failed")


def test_a_push_to_nothing_says_where_it_tried(tmp_path: Path) -> None:
    """No server at the URL: exit 1 with the URL and the question to ask."""
    result = subprocess.run(
        [sys.executable, "-m", "dev.push", "--url", "http://127.0.0.1:9", "t", "{}"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip

    assert result.returncode == 1
    assert "could not reach http://127.0.0.1:9/projects/local-project/topics/t" in result.stderr
