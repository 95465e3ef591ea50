"""The users resource, row by row of the contract (docs/API.md)."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine, text

from tests.conftest import Instance

MAX_BIGINT = 2**63 - 1
RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
USER_FIELDS = {"id", "name", "email", "balance", "created_at", "updated_at"}


def create(
    client: FlaskClient, email: str = "ada@example.com", **fields: object
) -> dict[str, object]:
    response = client.post("/users", json={"name": "Ada", "email": email, **fields})
    assert response.status_code == 201, response.json
    return dict(response.json)


def details(response: object) -> list[tuple[object, ...]]:
    body = response.json  # type: ignore[attr-defined]
    assert response.status_code == 422, body  # type: ignore[attr-defined]
    assert body["error"]["code"] == "validation_failed"
    return [tuple(d["loc"]) for d in body["error"]["details"]]


def test_create_user_returns_201_with_location_and_the_user(client: FlaskClient) -> None:
    """POST /users answers 201, the exact representation and a Location header."""
    response = client.post(
        "/users", json={"name": "  Ada  ", "email": "Ada@Example.COM", "balance": 5}
    )

    assert response.status_code == 201
    user = response.json
    assert set(user) == USER_FIELDS
    assert user["name"] == "Ada"
    assert user["email"] == "ada@example.com"
    assert user["balance"] == 5
    assert RFC3339_UTC.match(user["created_at"])
    assert user["created_at"] == user["updated_at"]
    assert response.headers["Location"] == f"/users/{user['id']}"
    assert response.headers["Content-Type"] == "application/json"


def test_create_user_balance_defaults_to_zero_and_accepts_the_maximum(client: FlaskClient) -> None:
    """balance is optional (0) and may be 2^63-1."""
    assert create(client, "a@example.com")["balance"] == 0
    assert create(client, "b@example.com", balance=MAX_BIGINT)["balance"] == MAX_BIGINT


def test_create_user_with_taken_email_in_other_case_is_a_conflict(
    client: FlaskClient, pg: Engine
) -> None:
    """Emails are unique regardless of case: 409 conflict, and nothing is added."""
    create(client, "ada@example.com")

    response = client.post("/users", json={"name": "Other", "email": "ADA@example.com"})

    assert response.status_code == 409
    assert response.json == {
        "error": {"code": "conflict", "message": "a user with this email already exists"}
    }
    with pg.connect() as connection:
        assert connection.scalar(text("SELECT count(*) FROM users")) == 1


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"email": "a@example.com"}, ("name",)),
        ({"name": "   ", "email": "a@example.com"}, ("name",)),
        ({"name": "x" * 101, "email": "a@example.com"}, ("name",)),
        ({"name": None, "email": "a@example.com"}, ("name",)),
        ({"name": 5, "email": "a@example.com"}, ("name",)),
        ({"name": "A\u0000da", "email": "a@example.com"}, ("name",)),
        ({"name": "Ada", "email": "a\u0000@example.com"}, ("email",)),
        ({"name": "Ada"}, ("email",)),
        ({"name": "Ada", "email": "no-at-sign"}, ("email",)),
        ({"name": "Ada", "email": "two@@example.com"}, ("email",)),
        ({"name": "Ada", "email": "@example.com"}, ("email",)),
        ({"name": "Ada", "email": "ada@"}, ("email",)),
        ({"name": "Ada", "email": "a" * 243 + "@example.com"}, ("email",)),
        ({"name": "Ada", "email": "a@example.com", "balance": -1}, ("balance",)),
        ({"name": "Ada", "email": "a@example.com", "balance": MAX_BIGINT + 1}, ("balance",)),
        ({"name": "Ada", "email": "a@example.com", "balance": True}, ("balance",)),
        ({"name": "Ada", "email": "a@example.com", "balance": 1.0}, ("balance",)),
        ({"name": "Ada", "email": "a@example.com", "balance": "5"}, ("balance",)),
        ({"name": "Ada", "email": "a@example.com", "balance": None}, ("balance",)),
        ({"name": "Ada", "email": "a@example.com", "id": 7}, ("id",)),
    ],
)  # fmt: skip
def test_create_user_rejects_each_broken_field_rule(
    client: FlaskClient, pg: Engine, body: dict[str, object], loc: tuple[str, ...]
) -> None:
    """Each violation is a 422 naming the field, and nothing is added."""
    assert details(client.post("/users", json=body)) == [loc]
    with pg.connect() as connection:
        assert connection.scalar(text("SELECT count(*) FROM users")) == 0


def test_create_user_reports_every_failing_field(client: FlaskClient) -> None:
    """details lists each failing value, not just the first."""
    response = client.post("/users", json={"name": "", "email": "x", "balance": -5, "extra": 1})

    assert sorted(details(response)) == [("balance",), ("email",), ("extra",), ("name",)]


def test_name_length_counts_unicode_characters(client: FlaskClient) -> None:
    """100 non-ASCII characters are a valid name; 101 are not."""
    assert create(client, "a@example.com", name="é" * 100)["name"] == "é" * 100
    response = client.post("/users", json={"name": "é" * 101, "email": "b@example.com"})
    assert details(response) == [("name",)]


def test_get_user_returns_the_user(client: FlaskClient) -> None:
    """GET /users/{id} answers 200 and the representation."""
    user = create(client)

    response = client.get(f"/users/{user['id']}")

    assert response.status_code == 200
    assert response.json == user


@pytest.mark.parametrize(
    "path_id", ["999", "0", "-1", "abc", "1.0", "%201", str(MAX_BIGINT + 1), "9" * 40]
)
def test_get_user_with_unknown_or_malformed_id_is_not_found(
    client: FlaskClient, path_id: str
) -> None:
    """An unknown id, or a path segment that is not an id, is a 404 not_found."""
    create(client)

    response = client.get(f"/users/{path_id}")

    assert response.status_code == 404
    assert response.json["error"]["code"] == "not_found"


def test_malformed_path_id_is_not_found_whatever_the_method_and_body(client: FlaskClient) -> None:
    """A path id that is not an id is a 404 before the method or the body is looked at."""
    assert client.put("/users/abc", data="not json").status_code == 404
    assert client.patch("/users/abc", data="{", content_type="text/plain").status_code == 404


def test_list_users_pages_through_all_rows_in_id_order(client: FlaskClient) -> None:
    """limit and after page through every user; next_after is null on the last page."""
    ids = [create(client, f"u{i}@example.com")["id"] for i in range(5)]

    first = client.get("/users?limit=2").json
    second = client.get(f"/users?limit=2&after={first['next_after']}").json
    third = client.get(f"/users?limit=2&after={second['next_after']}").json

    assert [u["id"] for u in first["users"]] == ids[:2]
    assert [u["id"] for u in second["users"]] == ids[2:4]
    assert [u["id"] for u in third["users"]] == ids[4:]
    assert first["next_after"] == ids[1]
    assert second["next_after"] == ids[3]
    assert third["next_after"] is None
    assert client.get("/users").json == {
        "users": first["users"] + second["users"] + third["users"],
        "next_after": None,
    }


def test_list_users_full_last_page_points_to_an_empty_next_page(client: FlaskClient) -> None:
    """A full page gives next_after even when nothing follows; the next page is then empty."""
    ids = [create(client, f"u{i}@example.com")["id"] for i in range(2)]

    page = client.get("/users?limit=2").json

    assert page["next_after"] == ids[-1]
    assert client.get(f"/users?after={ids[-1]}").json == {"users": [], "next_after": None}


def test_list_users_filters_by_email_regardless_of_case(client: FlaskClient) -> None:
    """email= finds the user whatever its case; an unknown email gives an empty page."""
    user = create(client, "ada@example.com")
    create(client, "bob@example.com")

    assert client.get("/users?email=ADA@example.com").json == {"users": [user], "next_after": None}
    assert client.get("/users?email=nobody@example.com").json == {"users": [], "next_after": None}


@pytest.mark.parametrize(
    ("query", "loc"),
    [
        ("limit=0", ("query", "limit")),
        ("limit=1001", ("query", "limit")),
        ("limit=abc", ("query", "limit")),
        ("limit=", ("query", "limit")),
        ("limit=-1", ("query", "limit")),
        ("limit=1.5", ("query", "limit")),
        ("after=-1", ("query", "after")),
        ("after=x", ("query", "after")),
        (f"after={MAX_BIGINT + 1}", ("query", "after")),
        ("email=a%00@example.com", ("query", "email")),
    ],
)
def test_list_users_rejects_bad_paging_parameters(
    client: FlaskClient, query: str, loc: tuple[str, ...]
) -> None:
    """A bad limit or after is a 422 naming the query parameter."""
    assert details(client.get(f"/users?{query}")) == [loc]


def test_list_users_accepts_the_paging_bounds(client: FlaskClient) -> None:
    """limit 1 and 1000 and after 0 are valid."""
    for query in ("limit=1", "limit=1000", "after=0"):
        assert client.get(f"/users?{query}").status_code == 200


def test_patch_user_changes_name_and_email(client: FlaskClient) -> None:
    """PATCH changes the given fields, lower-cases the email and moves updated_at."""
    user = create(client)

    response = client.patch(
        f"/users/{user['id']}", json={"name": " Grace ", "email": "Grace@Example.com"}
    )

    assert response.status_code == 200
    changed = response.json
    assert (changed["name"], changed["email"], changed["balance"]) == (
        "Grace",
        "grace@example.com",
        0,
    )
    assert changed["created_at"] == user["created_at"]
    assert changed["updated_at"] > user["updated_at"]
    assert client.get(f"/users/{user['id']}").json == changed


def test_patch_user_with_empty_body_changes_nothing(client: FlaskClient) -> None:
    """PATCH {} returns the user unchanged."""
    user = create(client)

    response = client.patch(f"/users/{user['id']}", json={})

    assert response.status_code == 200
    assert response.json == user


def test_patch_user_to_a_taken_email_is_a_conflict(client: FlaskClient) -> None:
    """Moving to another user's email is 409, and the user keeps its email."""
    create(client, "ada@example.com")
    bob = create(client, "bob@example.com")

    response = client.patch(f"/users/{bob['id']}", json={"email": "ADA@example.com"})

    assert response.status_code == 409
    assert client.get(f"/users/{bob['id']}").json["email"] == "bob@example.com"


@pytest.mark.parametrize(
    "body",
    [{"balance": 5}, {"name": None}, {"email": None}, {"name": ""}, {"id": 1}, {"email": "bad"}],
)
def test_patch_user_rejects_fields_it_cannot_change(
    client: FlaskClient, body: dict[str, object]
) -> None:
    """Unknown fields (balance too), null and broken values are a 422; nothing changes."""
    user = create(client)

    assert details(client.patch(f"/users/{user['id']}", json=body)) == [tuple(body)]
    assert client.get(f"/users/{user['id']}").json == user


def test_patch_unknown_user_is_not_found(client: FlaskClient) -> None:
    """PATCH of an id that names no user is a 404."""
    assert client.patch("/users/999", json={"name": "X"}).status_code == 404


def test_delete_user_answers_204_without_body_and_removes_the_user(client: FlaskClient) -> None:
    """DELETE answers 204 with no body or Content-Type; the user is gone."""
    user = create(client)

    response = client.delete(f"/users/{user['id']}")

    assert response.status_code == 204
    assert response.data == b""
    assert "Content-Type" not in response.headers
    assert client.get(f"/users/{user['id']}").status_code == 404
    assert client.delete(f"/users/{user['id']}").status_code == 404


@pytest.mark.parametrize("prefix", ["", "/users"])
def test_users_entry_point_serves_with_and_without_prefix(
    pg: Engine, instances: Callable[..., Instance], prefix: str
) -> None:
    """The users target serves / and /{id}, also under /users."""
    client = instances("users").client
    created = client.post(f"{prefix}/", json={"name": "Ada", "email": "ada@example.com"})
    assert created.status_code == 201

    assert client.get(f"{prefix}/{created.json['id']}").json == created.json
    assert client.get(prefix or "/").json["users"] == [created.json]
    assert client.get("/healthz").status_code == 404
