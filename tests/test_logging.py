"""Logs: one JSON object per line, as Cloud Logging reads them, with request id and trace."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine

from tests.conftest import PROBE, Instance
from tests.postgres import PASSWORD

TRACE_ID = "105445aa7843bc8bf206b12000100000"


@pytest.fixture
def project(monkeypatch: pytest.MonkeyPatch) -> str:
    """The project id the runtime (or deploy.sh) sets."""
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "acme-prod")
    return "acme-prod"


def log_lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    """Every line written to stdout so far, each parsed as JSON (any other line fails)."""
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


@pytest.mark.usefixtures("project")
@pytest.mark.parametrize(
    ("header", "value", "span", "sampled"),
    [
        ("X-Cloud-Trace-Context", f"{TRACE_ID}/1234567;o=1", "1234567", True),
        ("X-Cloud-Trace-Context", TRACE_ID, None, False),
        ("traceparent", f"00-{TRACE_ID}-00f067aa0ba902b7-01", "00f067aa0ba902b7", True),
    ],
)
def test_request_log_line_carries_the_trace(
    pg: Engine,
    instances: Callable[..., Instance],
    capsys: pytest.CaptureFixture[str],
    header: str,
    value: str,
    span: str | None,
    sampled: bool,
) -> None:
    """A traced request logs a JSON line with logging.googleapis.com/trace for the project."""
    client = instances().client
    capsys.readouterr()

    client.get("/users", headers={header: value, "X-Request-Id": "req-1"})

    [line] = [entry for entry in log_lines(capsys) if entry.get("status") == 200]
    assert line["severity"] == "INFO"
    assert line["logging.googleapis.com/trace"] == f"projects/acme-prod/traces/{TRACE_ID}"
    assert line.get("logging.googleapis.com/spanId") == span
    assert line["logging.googleapis.com/trace_sampled"] is sampled
    assert line["request_id"] == "req-1"
    assert (line["method"], line["path"]) == ("GET", "/users")
    assert line["httpRequest"]["status"] == 200
    assert line["latency_ms"] >= 0


@pytest.mark.usefixtures("project")
@pytest.mark.parametrize("value", ["", "garbage", "0" * 32, "zz45aa7843bc8bf206b12000100000zz/1"])
def test_malformed_trace_header_is_left_out(
    pg: Engine, instances: Callable[..., Instance], capsys: pytest.CaptureFixture[str], value: str
) -> None:
    """A trace header that is not a trace adds no trace field and breaks nothing."""
    client = instances().client
    capsys.readouterr()

    assert client.get("/users", headers={"X-Cloud-Trace-Context": value}).status_code == 200

    assert all("logging.googleapis.com/trace" not in line for line in log_lines(capsys))


def test_failing_request_logs_one_error_line_with_its_request_id_and_no_secret(
    pg: Engine, instances: Callable[..., Instance], capsys: pytest.CaptureFixture[str]
) -> None:
    """An unexpected exception gives exactly one ERROR line; every line has the request id."""
    client = instances("probe", PROBE).client
    client.get("/users")  # the engine is built here, not in the request under test
    capsys.readouterr()

    response = client.post("/boom", headers={"X-Request-Id": "failing-7"})

    assert response.status_code == 500
    lines = log_lines(capsys)
    errors = [line for line in lines if line["severity"] == "ERROR"]
    assert len(errors) == 1
    assert errors[0]["request_id"] == "failing-7"
    assert "RuntimeError" in errors[0]["stack_trace"]  # the log has the detail the body hides
    assert all(line["request_id"] == "failing-7" for line in lines)
    assert PASSWORD not in json.dumps(lines)


def test_request_bodies_and_passwords_never_reach_the_logs(
    pg: Engine, instances: Callable[..., Instance], capsys: pytest.CaptureFixture[str]
) -> None:
    """Neither a body's values nor the database password appear in any log line."""
    client = instances().client
    capsys.readouterr()

    client.post("/users", json={"name": "Marker-Name-5521", "email": "marker@example.com"})
    client.post("/users", json={"name": "Marker-Name-5521", "email": "marker@example.com"})
    client.post("/users", json={"name": "", "email": "bad-marker"})

    text = json.dumps(log_lines(capsys))
    for secret in ("Marker-Name-5521", "marker@example.com", "bad-marker", PASSWORD):
        assert secret not in text


def test_logging_is_configured_once_per_import(
    pg: Engine, instances: Callable[..., Instance]
) -> None:
    """Loading the entry points again, or serving requests, never adds another log handler."""
    instances()
    before = list(logging.getLogger().handlers)
    client = instances().client
    for _ in range(3):
        client.get("/users")

    json_handlers = [
        h for h in logging.getLogger().handlers if type(h.formatter).__name__ == "JsonFormatter"
    ]
    assert len(json_handlers) == 1
    assert len(logging.getLogger().handlers) == len(before)


def test_bad_configuration_is_one_log_line_naming_the_variable(
    pg: Engine,
    instances: Callable[..., Instance],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bad setting met on a first request: 500 internal, one ERROR line, no trace or password."""
    monkeypatch.setenv("DB_POOL_SIZE", "many")
    client = instances().client
    capsys.readouterr()

    response = client.get("/users")

    assert response.status_code == 500
    assert response.json == {"error": {"code": "internal", "message": "internal error"}}
    [error] = [line for line in log_lines(capsys) if line["severity"] == "ERROR"]
    assert (
        error["message"]
        == "configuration error: DB_POOL_SIZE must be a whole number of at least 1, got 'many'"
    )
    assert "stack_trace" not in error
    assert PASSWORD not in json.dumps(error)
