"""The OpenAPI document of the contract, served as JSON at ``/openapi.json``.

It is ``docs/openapi.yaml``, the same file the test suite fuzzes the service against,
read on the first request that asks for it.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from web.http import Document, route

DOCUMENT = Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml"


@functools.cache
def document() -> Any:
    """The parsed OpenAPI document."""
    import yaml  # noqa: PLC0415  # only this request needs a YAML parser

    with DOCUMENT.open(encoding="utf-8") as source:
        return yaml.safe_load(source)


ROUTES = [route("/openapi.json", GET=Document(document))]
