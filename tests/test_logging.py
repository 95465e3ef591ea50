"""Logs: one JSON object per line on Cloud Run, with request id and trace; text in a terminal."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine

from dev.postgres import PASSWORD
from tests.conftest import PROBE, Instance
from web.logs import JsonFormatter

TRACE_ID = "105445aa7843bc8bf206b12000100000"


@pytest.fixture(autouse=True)
def json_logs(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """JSON lines, as on Cloud Run, unless the test is about the terminal format."""
    if "text_logs" not in request.fixturenames:
        monkeypatch.setenv("LOG_FORMAT", "json")


@pytest.fixture
def text_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    """No LOG_FORMAT and no K_SERVICE: a terminal's readable lines."""
    monkeypatch.delenv("LOG_FORMAT", raising=False)
    monkeypatch.delenv("K_SERVICE", raising=False)


@pytest.fixture
def project(monkeypatch: pytest.MonkeyPatch) -> str:
    """The project id the runtime (or deploy.sh) sets."""
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "acme-prod")
    return "acme-prod"


def log_lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    """Every line written to stdout so far, each parsed as JSON (any other line fails)."""
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


@pytest.mark.parametrize(
    ("created", "expected"),
    [
        (1796686082.7412221, "2026-12-07T23:28:02.741222+00:00"),
        (1796686082.9999996, "2026-12-07T23:28:03.000000+00:00"),
        (1796686083.0, "2026-12-07T23:28:03.000000+00:00"),
        (1796686083.0000004, "2026-12-07T23:28:03.000000+00:00"),
        (1796686082.25, "2026-12-07T23:28:02.250000+00:00"),
    ],
)
def test_json_lines_carry_their_time_in_utc_to_the_microsecond(
    created: float, expected: str
) -> None:
    """The time is RFC 3339 in UTC with microseconds, rounded as ``datetime`` rounds them, from
    one line to the next whatever second each falls in."""
    formatter = JsonFormatter()
    for moment in (created - 1.5, created):  # the second before is formatted first
        record = logging.LogRecord("app", logging.INFO, "", 0, "hello", None, None)
        record.created = moment
        line = json.loads(formatter.format(record))

    assert line["time"] == expected


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

    ours = [h for h in logging.getLogger().handlers if isinstance(h.formatter, JsonFormatter)]
    assert len(ours) == 1
    assert len(logging.getLogger().handlers) == len(before)


@pytest.mark.usefixtures("text_logs")
def test_a_terminal_gets_one_readable_line_per_request_and_tracebacks_as_printed(
    pg: Engine, instances: Callable[..., Instance], capsys: pytest.CaptureFixture[str]
) -> None:
    """Without K_SERVICE: a plain line per request, and a traceback on its own lines."""
    client = instances("probe", PROBE).client
    client.get("/users")
    capsys.readouterr()

    client.get("/users", headers={"X-Request-Id": "plain-1"})
    client.post("/boom", headers={"X-Request-Id": "plain-2"})

    lines = capsys.readouterr().out.splitlines()
    timestamp = r"\d\d:\d\d:\d\d\.\d{3}"
    assert re.fullmatch(
        timestamp + r" INFO     web\.http: GET /users 200 [0-9.]+ ms  \[plain-1\]", lines[0]
    )
    assert "ERROR    web.errors: unhandled error  [plain-2]" in lines[1]
    assert lines[2] == "Traceback (most recent call last):"
    assert "RuntimeError: handler failed after writing" in lines
    assert re.search(r"WARNING  web\.http: POST /boom 500 [0-9.]+ ms  \[plain-2\]", lines[-1])
    assert not any(line.startswith("{") for line in lines)


@pytest.mark.parametrize(
    ("environ", "json_expected"),
    [
        ({"K_SERVICE": "api"}, True),
        ({"K_SERVICE": "api", "LOG_FORMAT": "text"}, False),
        ({"LOG_FORMAT": "json"}, True),
        ({}, False),
    ],
)
@pytest.mark.usefixtures("text_logs")
def test_the_log_format_follows_cloud_run_unless_chosen(
    pg: Engine,
    instances: Callable[..., Instance],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    environ: dict[str, str],
    json_expected: bool,
) -> None:
    """JSON where K_SERVICE is set (Cloud Run), text elsewhere; LOG_FORMAT decides when given."""
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    client = instances().client
    capsys.readouterr()

    client.get("/users")

    [line] = [line for line in capsys.readouterr().out.splitlines() if "GET /users" in line]
    assert line.startswith("{") is json_expected
