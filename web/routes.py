"""Which routes each entry point serves (docs/API.md lists them).

A function deployed on its own serves its resource at its root too (``mount``); the ``api``
function serves every route by its full path.
"""

from __future__ import annotations

from web import health, items, openapi, transfers, users
from web.http import Router

USERS = Router(users.ROUTES, mount="/users")
ITEMS = Router(items.ROUTES, mount="/items")
TRANSFERS = Router(transfers.ROUTES, mount="/transfers")
HEALTH = Router(health.ROUTES, mount="/healthz")
API = Router(
    [
        *users.ROUTES,
        *items.ROUTES,
        *transfers.ROUTES,
        *health.ROUTES,
        *openapi.ROUTES,
    ]
)
