"""The items resource: single items, batches of up to 1000 in one statement, all or nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine, event, text

from tests.conftest import Instance

MAX_INT = 2**31 - 1
ITEM_FIELDS = {"id", "owner_id", "name", "quantity", "created_at"}


@pytest.fixture
def api(pg: Engine, instances: Callable[..., Instance]) -> Instance:
    """An api instance on the test PostgreSQL."""
    return instances()


@pytest.fixture
def owner(api: Instance) -> int:
    """The id of a user who can own items."""
    return int(api.client.post("/users", json={"name": "O", "email": "o@example.com"}).json["id"])


def batch(owner: int, count: int) -> dict[str, list[dict[str, Any]]]:
    return {
        "items": [{"owner_id": owner, "name": f"item {i}", "quantity": i} for i in range(count)]
    }


def item_count(pg: Engine) -> int:
    with pg.connect() as connection:
        return int(connection.scalar(text("SELECT count(*) FROM items")) or 0)


def test_create_one_item_returns_201_with_location(api: Instance, owner: int) -> None:
    """POST /items with one item answers 201, the item and its Location."""
    response = api.client.post("/items", json={"owner_id": owner, "name": " Pen ", "quantity": 3})

    assert response.status_code == 201
    assert set(response.json) == ITEM_FIELDS
    assert (response.json["owner_id"], response.json["name"], response.json["quantity"]) == (
        owner,
        "Pen",
        3,
    )
    assert response.headers["Location"] == f"/items/{response.json['id']}"
    assert api.client.get(f"/items/{response.json['id']}").json == response.json


def test_batch_of_1000_is_one_insert_statement_in_input_order(
    api: Instance, owner: int, pg: Engine
) -> None:
    """1000 items are written with a single INSERT ... RETURNING and come back in input order."""
    statements: list[str] = []
    event.listen(
        api.database.engine,
        "before_cursor_execute",
        lambda _c, _cur, sql, *_: statements.append(sql),
    )

    response = api.client.post("/items", json=batch(owner, 1000))

    assert response.status_code == 201
    created = response.json["items"]
    assert [item["name"] for item in created] == [f"item {i}" for i in range(1000)]
    assert [item["id"] for item in created] == sorted(item["id"] for item in created)
    inserts = [sql for sql in statements if sql.lstrip().upper().startswith("INSERT INTO ITEMS")]
    assert len(inserts) == 1
    assert "RETURNING" in inserts[0].upper()
    assert item_count(pg) == 1000


def test_batch_with_one_bad_item_at_the_end_stores_nothing(
    api: Instance, owner: int, pg: Engine
) -> None:
    """A field error in the last of 1000 items is a 422 naming its index; no item is kept."""
    body = batch(owner, 1000)
    body["items"][999]["quantity"] = -1

    response = api.client.post("/items", json=body)

    assert response.status_code == 422
    assert [d["loc"] for d in response.json["error"]["details"]] == [["items", 999, "quantity"]]
    assert item_count(pg) == 0


def test_batch_with_a_missing_owner_stores_nothing(api: Instance, owner: int, pg: Engine) -> None:
    """A missing owner (only the database knows) is a 404 naming the index; nothing is kept."""
    body = batch(owner, 1000)
    body["items"][500]["owner_id"] = owner + 1000

    response = api.client.post("/items", json=body)

    assert response.status_code == 404
    assert response.json["error"]["details"][0]["loc"] == ["items", 500, "owner_id"]
    assert item_count(pg) == 0


def test_single_item_with_a_missing_owner_is_404(api: Instance, pg: Engine) -> None:
    """One item whose owner does not exist is a 404 naming owner_id."""
    response = api.client.post("/items", json={"owner_id": 12345, "name": "Pen", "quantity": 1})

    assert response.status_code == 404
    assert response.json["error"]["details"][0]["loc"] == ["owner_id"]
    assert item_count(pg) == 0


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"items": []}, ["items"]),
        ({"items": "pens"}, ["items"]),
        ({"items": None}, ["items"]),
        ({"items": [{"owner_id": 1, "name": "x", "quantity": 1}] * 1001}, ["items"]),
        ({"items": [{"owner_id": 1, "name": "x", "quantity": 1, "c": 1}]}, ["items", 0, "c"]),
        ({"items": [{"owner_id": 1, "name": "x", "quantity": 1}], "extra": 1}, ["extra"]),
        ({"owner_id": 1, "name": "x", "quantity": MAX_INT + 1}, ["quantity"]),
        ({"owner_id": 1, "name": "x", "quantity": -1}, ["quantity"]),
        ({"owner_id": 1, "name": "x", "quantity": 1.5}, ["quantity"]),
        ({"owner_id": 1, "name": "x", "quantity": False}, ["quantity"]),
        ({"owner_id": 1, "name": "x" * 201, "quantity": 1}, ["name"]),
        ({"owner_id": 1, "name": " ", "quantity": 1}, ["name"]),
        ({"owner_id": 0, "name": "x", "quantity": 1}, ["owner_id"]),
        ({"owner_id": 2**63, "name": "x", "quantity": 1}, ["owner_id"]),
        ({"owner_id": "1", "name": "x", "quantity": 1}, ["owner_id"]),
        ({"name": "x", "quantity": 1}, ["owner_id"]),
    ],
)  # fmt: skip
def test_invalid_items_are_422_naming_the_value(
    api: Instance, owner: int, pg: Engine, body: dict[str, Any], loc: list[object]
) -> None:
    """Every field rule is checked, in batches too, and nothing is stored."""
    response = api.client.post("/items", json=body)

    assert response.status_code == 422
    assert loc in [d["loc"] for d in response.json["error"]["details"]]
    assert item_count(pg) == 0


def test_item_bounds_are_accepted(api: Instance, owner: int) -> None:
    """quantity 0 and 2^31-1 and a 200-character name are valid."""
    for body in (
        {"owner_id": owner, "name": "x", "quantity": 0},
        {"owner_id": owner, "name": "x" * 200, "quantity": MAX_INT},
    ):
        assert api.client.post("/items", json=body).status_code == 201


def test_list_items_by_owner_pages_in_id_order(api: Instance, owner: int) -> None:
    """owner_id filters; limit and after page; another owner's items never appear."""
    other = api.client.post("/users", json={"name": "P", "email": "p@example.com"}).json["id"]
    mine = api.client.post("/items", json=batch(owner, 5)).json["items"]
    api.client.post("/items", json=batch(other, 2))

    first = api.client.get(f"/items?owner_id={owner}&limit=3").json
    second = api.client.get(f"/items?owner_id={owner}&limit=3&after={first['next_after']}").json

    assert first["items"] + second["items"] == mine
    assert second["next_after"] is None
    assert len(api.client.get("/items").json["items"]) == 7
    assert api.client.get("/items?owner_id=999999").json == {"items": [], "next_after": None}


@pytest.mark.parametrize(
    "query", ["owner_id=abc", "owner_id=0", "owner_id=-3", "limit=0", "after=x"]
)
def test_list_items_rejects_bad_parameters(api: Instance, query: str) -> None:
    """A malformed filter or paging parameter is a 422 on that query parameter."""
    response = api.client.get(f"/items?{query}")

    assert response.status_code == 422
    assert response.json["error"]["details"][0]["loc"] == ["query", query.split("=", maxsplit=1)[0]]


def test_get_unknown_item_is_404(api: Instance) -> None:
    """An id that names no item is a 404."""
    assert api.client.get("/items/42").status_code == 404


def test_removing_the_owner_removes_their_items(api: Instance, owner: int, pg: Engine) -> None:
    """DELETE /users/{id} takes the user's items with it."""
    api.client.post("/items", json=batch(owner, 3))

    assert api.client.delete(f"/users/{owner}").status_code == 204

    assert item_count(pg) == 0


@pytest.mark.parametrize("prefix", ["", "/items"])
def test_items_entry_point_serves_with_and_without_prefix(
    pg: Engine, instances: Callable[..., Instance], prefix: str
) -> None:
    """The items target serves / and /{id}, also under /items."""
    api, items = instances(), instances("items")
    owner = api.client.post("/users", json={"name": "O", "email": "o@example.com"}).json["id"]

    created = items.client.post(
        f"{prefix}/", json={"owner_id": owner, "name": "Pen", "quantity": 1}
    )

    assert created.status_code == 201
    assert items.client.get(f"{prefix}/{created.json['id']}").json == created.json
    assert items.client.get("/users").status_code == 404
