"""docs/openapi.yaml is kept true by fuzzing the running api entry point with schemathesis.

Every generated request, valid or not, must get a documented status, content type, headers
and body, never a 5xx; and a request that is refused must leave the database as it was.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

import pytest
import schemathesis
import yaml
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import Engine, text

from tests.conftest import ROOT, Instance
from web import routes
from web.openapi import DOCUMENT

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
STATE = text(
    "SELECT (SELECT md5(coalesce(string_agg(u::text, ',' ORDER BY u.id), '')) FROM users u)"
    " || (SELECT md5(coalesce(string_agg(i::text, ',' ORDER BY i.id), '')) FROM items i)"
    " || (SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY t.id), '')) FROM transfers t)"
    " || (SELECT count(*) FROM idempotency_records)::text"
)


schema = schemathesis.openapi.from_path(DOCUMENT)


@pytest.fixture
def app(pg: Engine, instances: Callable[..., Instance]) -> Flask:
    """A fresh api instance holding a few users and items for generated requests to find."""
    instance = instances()
    for n in range(1, 4):
        user = {"name": f"U{n}", "email": f"u{n}@example.com", "balance": 1000}
        owner = instance.client.post("/users", json=user).json["id"]
        instance.client.post("/items", json={"owner_id": owner, "name": "pen", "quantity": n})
    return instance.app


def database_state(pg: Engine) -> str:
    with pg.connect() as connection:
        return str(connection.scalar(STATE))


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_every_generated_request_gets_a_documented_answer(
    case: Any, app: Flask, pg: Engine
) -> None:
    """No 5xx, responses match the document, and a refused request changes nothing."""
    before = database_state(pg)

    response = case.call_and_validate(app=app, checks=CHECKS)

    if response.status_code >= 400:
        assert database_state(pg) == before


def test_the_api_serves_this_document_at_openapi_json(client: FlaskClient) -> None:
    """GET /openapi.json is the file the fuzzing above reads, as JSON."""
    response = client.get("/openapi.json")

    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.json == yaml.safe_load(DOCUMENT.read_text())


def _documented() -> set[tuple[str, str]]:
    document = yaml.safe_load(DOCUMENT.read_text())
    methods = {"get", "put", "post", "delete", "patch", "head", "options"}
    return {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in methods
    }


def test_every_route_of_the_api_is_documented_and_nothing_else() -> None:
    """The api entry point's routes and the document's operations are the same set."""
    served = {
        (method, re.sub(r"<id:(\w+)>", r"{\1}", path))
        for path, entry in routes.API.routes.items()
        for method in entry.methods
    }
    assert served == _documented()


def test_the_prose_contract_names_every_documented_operation() -> None:
    """docs/API.md lists each operation of the OpenAPI document."""
    prose = (ROOT / "docs" / "API.md").read_text()
    for method, path in _documented():
        assert f"`{method} {path}" in prose, (method, path)
