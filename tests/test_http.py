"""Rules every response follows: order of checks, error bodies, headers, routing, health."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine, text

from dev.postgres import PASSWORD
from tests.conftest import PROBE, Instance
from web.errors import HttpError
from web.http import Endpoint, Router, route

LEAKS = ("Traceback", "sqlalchemy", "pg8000", "SELECT", "INSERT", "Error", "postgresql", PASSWORD)


def assert_error(response: object, status: int, code: str) -> None:
    """The response is the contract's error body with this status and code, and leaks nothing."""
    assert response.status_code == status  # type: ignore[attr-defined]
    assert response.headers["Content-Type"] == "application/json"  # type: ignore[attr-defined]
    body = response.json  # type: ignore[attr-defined]
    assert set(body) == {"error"}
    assert set(body["error"]) <= {"code", "message", "details"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    raw = response.get_data(as_text=True)  # type: ignore[attr-defined]
    for leak in LEAKS:
        assert leak not in raw


@pytest.mark.parametrize(
    ("content_type", "message"),
    [
        (None, "the body must be sent as Content-Type: application/json"),
        ("text/plain", "the body must be sent as Content-Type: application/json"),
        (
            "application/x-www-form-urlencoded",
            "the body must be sent as Content-Type: application/json",
        ),
        (
            "application/json; charset=latin-1",
            "the body must be JSON in UTF-8, not charset=latin-1: send charset=utf-8 or none",
        ),
    ],
)
def test_body_without_json_content_type_is_415(
    client: FlaskClient, pg: Engine, content_type: str | None, message: str
) -> None:
    """A POST whose Content-Type is missing or not JSON is a 415 saying what to send, and
    adds nothing."""
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post(
        "/users", data=b'{"name": "A", "email": "a@example.com"}', headers=headers
    )

    assert_error(response, 415, "unsupported_media_type")
    assert response.json["error"]["message"] == message
    with pg.connect() as connection:
        assert connection.scalar(text("SELECT count(*) FROM users")) == 0


def test_json_content_type_with_utf8_charset_is_accepted(client: FlaskClient) -> None:
    """application/json; charset=utf-8 is JSON."""
    response = client.post(
        "/users",
        data=json.dumps({"name": "Zoë", "email": "zoe@example.com"}).encode(),
        headers={"Content-Type": "application/json; charset=UTF-8"},
    )
    assert response.status_code == 201
    assert response.json["name"] == "Zoë"


def test_body_over_one_mebibyte_is_413(client: FlaskClient) -> None:
    """A body over 1 MiB is refused with 413 before it is parsed."""
    body = b'{"name": "' + b"x" * (1024 * 1024) + b'", "email": "a@example.com"}'
    assert_error(
        client.post("/users", data=body, content_type="application/json"), 413, "payload_too_large"
    )


def test_body_of_exactly_one_mebibyte_is_parsed(client: FlaskClient) -> None:
    """A body of exactly 1 MiB passes the size check and reaches validation."""
    prefix, suffix = b'{"email": "a@example.com", "name": "', b'"}'
    body = prefix + b"x" * (1024 * 1024 - len(prefix) - len(suffix)) + suffix
    assert client.post("/users", data=body, content_type="application/json").status_code == 422


@pytest.mark.parametrize(
    "body",
    [b"{", b"", b"[]", b'"text"', b"42", b"null", b'{"balance": NaN}', b"\xff\xfe", b"[" * 100_000],
)
def test_body_that_is_not_a_json_object_is_400(client: FlaskClient, body: bytes) -> None:
    """Malformed JSON, or JSON that is not an object, is a 400 bad_request saying which."""
    response = client.post("/users", data=body, content_type="application/json")

    assert_error(response, 400, "bad_request")
    assert response.json["error"]["message"] == (
        "the body is not UTF-8"
        if body == b"\xff\xfe"
        else "the body must be a JSON object"
        if body in (b"[]", b'"text"', b"42", b"null")
        else "the body is not valid JSON"
    )


@pytest.mark.parametrize(
    "body",
    [
        b'{"name": "Ada \\ud800", "email": "a@example.com"}',
        b'{"name": "Ada", "email": "a\\udc00@example.com"}',
        b'{"name": "Ada", "email": "a@example.com", "\\udbff": 1}',
    ],
)
def test_body_with_an_unpaired_surrogate_escape_is_400_and_adds_nothing(
    client: FlaskClient, pg: Engine, body: bytes
) -> None:
    """JSON may escape half a surrogate pair, which is no character and not UTF-8: a 400 that
    says so, not a 500 from the driver or the answer's encoding, and nothing is written."""
    response = client.post("/users", data=body, content_type="application/json")

    assert_error(response, 400, "bad_request")
    assert response.json["error"]["message"] == (
        "the body escapes half of a surrogate pair, which stands for no character"
    )
    with pg.connect() as connection:
        assert connection.scalar(text("SELECT count(*) FROM users")) == 0


def test_body_with_an_escaped_surrogate_pair_is_that_character(client: FlaskClient) -> None:
    """A pair of escapes is one character outside the BMP, stored and answered as such."""
    body = b'{"name": "Ada \\ud83d\\ude00", "email": "a@example.com"}'
    response = client.post("/users", data=body, content_type="application/json")
    assert response.status_code == 201
    assert response.json["name"] == "Ada \U0001f600"
    assert client.get(f"/users/{response.json['id']}").json["name"] == "Ada \U0001f600"


def test_checks_run_in_the_contract_order(client: FlaskClient) -> None:
    """Path 404, then 405, then 415, then 413, then 400, then 422."""
    big = b"{" + b" " * (1024 * 1024 + 1)
    assert client.put("/users/abc", data=big).status_code == 404
    assert client.put("/users", data=big).status_code == 405
    assert client.post("/users", data=big, content_type="text/plain").status_code == 415
    assert client.post("/users", data=big, content_type="application/json").status_code == 413
    assert client.post("/users", data=b"{", content_type="application/json").status_code == 400
    assert client.post("/users", json={}).status_code == 422


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("put", "/users", "GET, POST, HEAD"),
        ("delete", "/users", "GET, POST, HEAD"),
        ("post", "/users/1", "DELETE, GET, PATCH, HEAD"),
        ("post", "/healthz", "GET, HEAD"),
    ],
)
def test_wrong_method_is_405_with_allow(
    client: FlaskClient, method: str, path: str, allow: str
) -> None:
    """A method the path does not accept is a 405 listing the methods it does."""
    response = getattr(client, method)(path)
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["Allow"] == allow


@pytest.mark.parametrize(
    "path",
    ["/", "/nothing", "/users/1/extra", "/users//1", "/healthz/1", "/favicon.ico", "/robots.txt"],
)
def test_unknown_path_is_404(client: FlaskClient, path: str) -> None:
    """Paths the api target does not serve, its root included, are a JSON 404."""
    assert_error(client.get(path), 404, "not_found")


def _view(_session: object, _call: object) -> None:
    return None


def _other_view(_session: object, _call: object) -> None:
    return None


def test_router_takes_ids_and_text_segments_and_serves_a_mount_at_its_root() -> None:
    """``<id:name>`` gives an int, ``<name>`` the segment's text; a mount is also served
    without its prefix; slashes around a path do not matter."""
    read, tagged = Endpoint(_view), Endpoint(_other_view)
    router = Router(
        [route("/notes/<id:id>", GET=read), route("/notes/<id:id>/tags/<tag>", PUT=tagged)],
        mount="/notes",
    )

    assert router.match("/notes/42", "GET") == (read, {"id": 42})
    assert router.match("/42/", "HEAD") == (read, {"id": 42})
    assert router.match("//notes/7/tags/red", "PUT") == (tagged, {"id": 7, "tag": "red"})


@pytest.mark.parametrize(
    "path", ["/notes/0", "/notes/9223372036854775808", "/notes/-1", "/notes/1.5", "/notes/x"]
)
def test_router_answers_404_for_what_is_not_an_id(path: str) -> None:
    """An id is 1 to 2^63-1 in ASCII digits: anything else matches no rule, whatever the method."""
    router = Router([route("/notes/<id:id>", GET=Endpoint(_view))])
    with pytest.raises(HttpError) as refused:
        router.match(path, "DELETE")
    assert refused.value.status == 404


def test_router_refuses_a_parameter_kind_it_does_not_know() -> None:
    """A rule with ``<int:id>`` fails when the router is built, naming the rule."""
    with pytest.raises(ValueError, match="/notes/<int:id>"):
        Router([route("/notes/<int:id>", GET=Endpoint(_view))])


def test_head_is_answered_like_get_without_a_body(client: FlaskClient) -> None:
    """HEAD on a readable path answers GET's status and headers with no body."""
    response = client.head("/users")
    assert response.status_code == 200
    assert response.data == b""


def test_request_id_is_echoed_when_valid_and_replaced_otherwise(client: FlaskClient) -> None:
    """X-Request-Id comes back as sent when it is 1-128 safe characters, else a fresh one."""
    valid = "abc.DEF_123:xyz-" + "9" * 100
    assert client.get("/users", headers={"X-Request-Id": valid}).headers["X-Request-Id"] == valid
    for invalid in ("", "has space", "x" * 129, "semi;colon", "é"):
        returned = client.get("/users", headers={"X-Request-Id": invalid}).headers["X-Request-Id"]
        assert returned
        assert returned != invalid
    first = client.get("/users").headers["X-Request-Id"]
    assert first != client.get("/users").headers["X-Request-Id"]


def test_every_response_carries_request_id_and_json_content_type(client: FlaskClient) -> None:
    """Success, errors and 204 all carry X-Request-Id; all but 204 are application/json."""
    created = client.post("/users", json={"name": "A", "email": "a@example.com"})
    responses = [
        created,
        client.get("/users"),
        client.get("/nope"),
        client.put("/users"),
        client.post("/users", json={}),
    ]
    for response in responses:
        assert response.headers["X-Request-Id"]
        assert response.headers["Content-Type"] == "application/json"
    deleted = client.delete(f"/users/{created.json['id']}")
    assert deleted.status_code == 204
    assert deleted.headers["X-Request-Id"]


def test_unexpected_error_is_500_internal_without_details(
    pg: Engine, instances: Callable[..., Instance]
) -> None:
    """An exception the service does not know becomes 500 internal, with no trace or class name."""
    assert_error(instances("probe", PROBE).client.post("/boom"), 500, "internal")


def test_error_only_the_database_catches_is_422_without_sql(
    pg: Engine, instances: Callable[..., Instance]
) -> None:
    """A value the database refuses (SQLSTATE 22003) is a 422 naming no SQL or driver."""
    response = instances("probe", PROBE).client.post("/overflow")
    assert_error(response, 422, "validation_failed")
    assert response.json["error"]["details"]


# Health


def test_health_answers_ok_after_a_database_round_trip(client: FlaskClient) -> None:
    """GET /healthz is 200 with the database status."""
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json == {"status": "ok", "database": "ok"}


@pytest.mark.parametrize("path", ["/", "/healthz"])
def test_health_entry_point_serves_root_and_healthz(
    pg: Engine, instances: Callable[..., Instance], path: str
) -> None:
    """The health target answers at / and /healthz."""
    assert instances("health").client.get(path).json == {"status": "ok", "database": "ok"}


def test_health_is_503_with_retry_after_when_the_database_is_unreachable(
    instances: Callable[..., Instance], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no server at the configured address, /healthz is 503 with Retry-After."""
    monkeypatch.setenv("DATABASE_URL", f"postgresql+pg8000://postgres:{PASSWORD}@127.0.0.1:9/app")
    monkeypatch.setenv("DB_POOL_TIMEOUT", "1")

    response = instances("health").client.get("/healthz")

    assert_error(response, 503, "service_unavailable")
    assert int(response.headers["Retry-After"]) >= 1


@pytest.mark.parametrize(
    ("path", "typo"),
    [("/users", "e-mail"), ("/items", "owner"), ("/transfers", "userid"), ("/transfers", "page")],
)
def test_an_unknown_query_parameter_is_a_422_naming_it(
    client: FlaskClient, path: str, typo: str
) -> None:
    """A misspelt filter is refused, never ignored: the answer is not every row."""
    ada = client.post("/users", json={"name": "Ada", "email": "ada@x.io", "balance": 9}).json
    bob = client.post("/users", json={"name": "Bob", "email": "bob@x.io"}).json
    client.post(
        "/transfers", json={"from_user_id": ada["id"], "to_user_id": bob["id"], "amount": 1}
    )

    response = client.get(f"{path}?{typo}=1")

    assert_error(response, 422, "validation_failed")
    [detail] = response.json["error"]["details"]
    assert detail["loc"] == ["query", typo]
    assert "limit, after or " in detail["msg"]


def test_a_query_parameter_given_twice_is_a_422(client: FlaskClient) -> None:
    """``?user_id=1&user_id=2`` has no single meaning: refused, naming the parameter."""
    response = client.get("/transfers?user_id=1&user_id=2")

    assert_error(response, 422, "validation_failed")
    assert [d["loc"] for d in response.json["error"]["details"]] == [["query", "user_id"]]
