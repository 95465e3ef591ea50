"""Entry points. Each is deployable as its own function; ``api`` serves every HTTP route.

Every top-level function decorated with ``@functions_framework.http`` or
``@functions_framework.cloud_event`` here is an entry point: ``deploy.sh`` deploys each one
under its own name, an event function with its topic as trigger. Those that serve one router
of ``web/routes.py`` other than ``API`` repeat routes ``api`` serves: they are deployed only
when named. Settings are read and checked
when this module loads (a bad one stops the process); the instance's database (engine,
pool, connector) is built on the first request that needs it, never here.
"""

from __future__ import annotations

import flask
import functions_framework
from sqlalchemy.orm import Session
from werkzeug.exceptions import HTTPException

from db.config import startup_settings
from db.engine import Database
from service.transfers import create_transfer
from web import events, http, relay, routes
from web.logs import configure_logging
from web.transfers import new_transfer

configure_logging()
database = Database(startup_settings())
database.dispose_on_shutdown()


@functions_framework.http
def users(request: flask.Request) -> flask.Response:
    """The users resource: ``/`` and ``/{id}``, also under ``/users``."""
    return http.serve(request, database, routes.USERS)


@functions_framework.http
def items(request: flask.Request) -> flask.Response:
    """The items resource: ``/`` and ``/{id}``, also under ``/items``."""
    return http.serve(request, database, routes.ITEMS)


@functions_framework.http
def transfers(request: flask.Request) -> flask.Response:
    """The transfers resource: ``/`` and ``/{id}``, also under ``/transfers``."""
    return http.serve(request, database, routes.TRANSFERS)


@functions_framework.http
def health(request: flask.Request) -> flask.Response:
    """``GET /`` (also ``/healthz``): 200 after a round trip to the database, else 503."""
    return http.serve(request, database, routes.HEALTH)


@functions_framework.http
def api(request: flask.Request) -> flask.Response:
    """Every resource, by path, and the OpenAPI document at ``/openapi.json``."""
    return http.serve(request, database, routes.API)


@functions_framework.http
def relay_outbox(request: flask.Request) -> flask.Response:
    """``POST /``, every minute from Cloud Scheduler: publish every event the outbox holds."""
    return relay.serve(request, database)


@functions_framework.cloud_event
@events.event_scope(database, topic="transfer-requests")
def transfer_events(session: Session, message: events.Message) -> None:
    """A transfer per message: its data has the fields of ``POST /transfers``."""
    create_transfer(session, **new_transfer(message.json()))


@functions_framework.errorhandler(HTTPException)  # type: ignore[untyped-decorator]
def framework_error(error: HTTPException) -> flask.Response:
    """Paths the framework answers itself (``/favicon.ico``, ``/robots.txt``) answer JSON too;
    a failed event delivery answers as it was told to."""
    return http.framework_error(error)
