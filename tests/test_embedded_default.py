"""With no configuration the service runs on its own SQLite file and creates its schema."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from tests.conftest import Instance


@pytest.fixture
def embedded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, instances: Callable[..., Instance]
) -> Instance:
    """An api instance with no database configured, in an empty working directory."""
    monkeypatch.chdir(tmp_path)
    return instances()


def test_serves_users_on_a_sqlite_file_it_creates(embedded: Instance, tmp_path: Path) -> None:
    """The first request creates app.db with the migrated schema; users work end to end."""
    assert not (tmp_path / "app.db").exists()

    created = embedded.client.post("/users", json={"name": "Ada", "email": "Ada@example.com"})

    assert created.status_code == 201
    assert created.json["email"] == "ada@example.com"
    assert embedded.client.get(f"/users/{created.json['id']}").json == created.json
    assert (
        embedded.client.post("/users", json={"name": "B", "email": "ADA@example.com"}).status_code
        == 409
    )
    assert embedded.client.get("/healthz").json == {"status": "ok", "database": "ok"}
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    assert {"users", "alembic_version"} <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_timestamps_are_utc_on_sqlite(embedded: Instance) -> None:
    """SQLite stores no zone, yet timestamps come back as RFC 3339 UTC."""
    created = embedded.client.post("/users", json={"name": "Ada", "email": "a@example.com"}).json
    read = embedded.client.get(f"/users/{created['id']}").json
    assert read["created_at"] == created["created_at"]
    assert read["created_at"].endswith("Z")


def test_concurrent_writes_on_sqlite_all_succeed(embedded: Instance) -> None:
    """Writers on the embedded file take turns instead of failing with 'database is locked'."""
    embedded.client.get("/healthz")
    start = threading.Barrier(8)

    def write(n: int) -> int:
        start.wait()
        body = {"name": f"U{n}", "email": f"u{n}@example.com"}
        return int(embedded.client.post("/users", json=body).status_code)

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(write, range(8))) == [201] * 8
    assert len(embedded.client.get("/users").json["users"]) == 8


def test_items_and_transfers_work_on_sqlite(embedded: Instance) -> None:
    """Batches, idempotent transfers and the 409 for removing a user with transfers all work."""
    client = embedded.client
    ada = client.post("/users", json={"name": "Ada", "email": "a@x.io", "balance": 10}).json
    bob = client.post("/users", json={"name": "Bob", "email": "b@x.io"}).json
    batch = {"items": [{"owner_id": bob["id"], "name": "pen", "quantity": 1}] * 3}
    assert client.post("/items", json=batch).status_code == 201
    transfer = {"from_user_id": ada["id"], "to_user_id": bob["id"], "amount": 4}
    assert (
        client.post("/transfers", json=transfer, headers={"Idempotency-Key": "k"}).status_code
        == 201
    )
    assert (
        client.post("/transfers", json=transfer, headers={"Idempotency-Key": "k"}).headers[
            "Idempotent-Replayed"
        ]
        == "true"
    )

    assert client.delete(f"/users/{ada['id']}").status_code == 409
    assert client.get(f"/users/{ada['id']}").json["balance"] == 6
    assert len(client.get(f"/items?owner_id={bob['id']}").json["items"]) == 3


def test_sqlite_refuses_what_postgresql_cannot_store(embedded: Instance) -> None:
    """A NUL character, which SQLite would keep and PostgreSQL refuses, is a 422 on both."""
    response = embedded.client.post("/users", json={"name": "A\u0000", "email": "a@x.io"})

    assert response.status_code == 422
    assert response.json["error"]["details"][0]["loc"] == ["name"]
    assert embedded.client.get("/users").json["users"] == []
