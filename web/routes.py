"""Which resources each entry point serves, as ``../shared/API.md`` lists them."""

from __future__ import annotations

from web import health, users
from web.http import Router

USERS = Router({"users": users.RESOURCE}, bare=users.RESOURCE)
HEALTH = Router({"healthz": health.RESOURCE}, bare=health.RESOURCE)
API = Router({"users": users.RESOURCE, "healthz": health.RESOURCE})
