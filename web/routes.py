"""Which resources each entry point serves, as ``../shared/API.md`` lists them."""

from __future__ import annotations

from web import health, items, transfers, users
from web.http import Router

USERS = Router({"users": users.RESOURCE}, bare=users.RESOURCE)
ITEMS = Router({"items": items.RESOURCE}, bare=items.RESOURCE)
TRANSFERS = Router({"transfers": transfers.RESOURCE}, bare=transfers.RESOURCE)
HEALTH = Router({"healthz": health.RESOURCE}, bare=health.RESOURCE)
API = Router(
    {
        "users": users.RESOURCE,
        "items": items.RESOURCE,
        "transfers": transfers.RESOURCE,
        "healthz": health.RESOURCE,
    }
)
