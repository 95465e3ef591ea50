"""Connections kept alive by real clients against a functions-framework process: an answer after
which the service closes the connection says ``Connection: close``, so the client's next request
goes out on a new connection and succeeds; an answer to a body read whole keeps it open."""

from __future__ import annotations

import contextlib
import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from sqlalchemy import Engine

from tests.serving import ServedFunction

MIB = 1024 * 1024
BODY_TIMEOUT = 1.0
USER = json.dumps({"name": "Ada", "email": "ada@x.io"}).encode()
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def served(pg: Engine, tmp_path: Path) -> Iterator[ServedFunction]:
    """The api function served by functions-framework on the test PostgreSQL."""
    function = ServedFunction("api", {"THREADS": "4", "BODY_TIMEOUT": str(BODY_TIMEOUT)}, tmp_path)
    yield function
    function.stop()


def _connection(served: ServedFunction) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)


def _local_port(connection: http.client.HTTPConnection) -> int:
    assert connection.sock is not None
    return int(connection.sock.getsockname()[1])


def test_a_body_read_whole_keeps_the_connection_open(served: ServedFunction) -> None:
    """A 201 and a 422, each after reading its whole body, leave the same connection in use."""
    connection = _connection(served)
    connection.request("POST", "/users", body=USER, headers=JSON)
    created = connection.getresponse()
    created.read()
    port = _local_port(connection)

    connection.request("POST", "/users", body=b'{"name": ""}', headers=JSON)
    refused = connection.getresponse()
    refused.read()
    connection.request("GET", "/healthz")
    health = connection.getresponse()
    health.read()

    assert (created.status, refused.status, health.status) == (201, 422, 200)
    assert {r.getheader("Connection") for r in (created, refused, health)} == {"keep-alive"}
    assert _local_port(connection) == port
    connection.close()


@pytest.mark.parametrize(
    ("method", "path", "declared", "sent", "status"),
    [
        ("POST", "/users", 2 * MIB, 2 * MIB, 413),  # too large, sent whole
        ("POST", "/users", 2 * MIB, 10, 413),  # too large by its declared length
        ("POST", "/healthz", 5, 5, 405),  # a body nobody reads
    ],
    ids=["too-large", "declared-too-large", "unread"],
)
def test_an_answer_that_closes_says_so_and_the_next_request_succeeds(
    served: ServedFunction, method: str, path: str, declared: int, sent: int, status: int
) -> None:
    """http.client: the refusal carries Connection: close; the next request on the same client
    object is sent on a new connection and answered."""
    connection = _connection(served)
    connection.request("GET", "/healthz")
    connection.getresponse().read()
    first_port = _local_port(connection)

    connection.putrequest(method, path)
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(declared))
    connection.endheaders()
    with contextlib.suppress(OSError):  # answered before the whole body went out
        connection.send(b"x" * sent)
    refused = connection.getresponse()
    refused.read()
    connection.request("POST", "/users", body=USER, headers=JSON)
    following = connection.getresponse()
    following.read()

    assert refused.status == status
    assert refused.getheader("Connection") == "close"
    assert following.status == 201
    assert _local_port(connection) != first_port
    connection.close()


def test_a_late_body_is_a_408_that_closes_and_the_next_request_succeeds(
    served: ServedFunction,
) -> None:
    """A body that stalls past BODY_TIMEOUT: a 408 saying Connection: close; the client's next
    request is answered."""
    connection = _connection(served)
    connection.putrequest("POST", "/users")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(len(USER)))
    connection.endheaders()
    connection.send(USER[:5])
    time.sleep(BODY_TIMEOUT + 0.5)
    late = connection.getresponse()
    late.read()
    connection.request("POST", "/users", body=USER, headers=JSON)
    following = connection.getresponse()
    following.read()

    assert (late.status, late.getheader("Connection")) == (408, "close")
    assert following.status == 201
    connection.close()


def test_a_requests_session_carries_on_after_a_413(served: ServedFunction) -> None:
    """requests.Session, which pools connections: a 413 then more requests, none failing."""
    base = f"http://127.0.0.1:{served.port}"
    with requests.Session() as session:
        assert session.get(f"{base}/healthz", timeout=30).status_code == 200
        too_large = session.post(f"{base}/users", data=b"x" * (2 * MIB), headers=JSON, timeout=30)
        declared = requests.Request(
            "POST", f"{base}/users", data=b"{}", headers={**JSON, "Content-Length": str(2 * MIB)}
        ).prepare()
        declared.headers["Content-Length"] = str(2 * MIB)  # prepare() counts the body itself
        refused = session.send(declared, timeout=30)
        created = session.post(f"{base}/users", data=USER, headers=JSON, timeout=30)
        health = session.get(f"{base}/healthz", timeout=30)

    assert (too_large.status_code, too_large.headers["Connection"]) == (413, "close")
    assert (refused.status_code, refused.headers["Connection"]) == (413, "close")
    assert (created.status_code, health.status_code) == (201, 200)
