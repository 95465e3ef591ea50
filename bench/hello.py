"""A hello-world function: the cost of functions-framework, gunicorn and HTTP alone."""

from __future__ import annotations

import flask
import functions_framework


@functions_framework.http
def hello(request: flask.Request) -> flask.Response:
    """No database, no validation: the floor of any HTTP function."""
    return flask.Response('{"hello":"world"}', content_type="application/json")
