"""JSON representations of the models, exactly the fields of the contract."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from db.models import Item, Transfer, User
from service.items import CreatedItem

if TYPE_CHECKING:  # service/transfers.py shows its events with this module
    from service.transfers import TransferRecord
    from service.users import UserRecord

M = TypeVar("M")


@functools.lru_cache(maxsize=64)  # the rows of one batch share their created_at
def timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with microseconds, e.g. ``2026-11-22T14:27:33.123456Z``."""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def user(row: User | UserRecord) -> dict[str, Any]:
    """A user as the contract shows it."""
    return {
        "id": row.id,
        "name": row.name,
        "email": row.email,
        "balance": row.balance,
        "created_at": timestamp(row.created_at),
        "updated_at": timestamp(row.updated_at),
    }


def page(
    key: str, rows: Sequence[M], limit: int, represent: Callable[[M], dict[str, Any]]
) -> dict[str, Any]:
    """A page of a listing; ``next_after`` is the last id when the page is full."""
    items = [represent(row) for row in rows]
    return {key: items, "next_after": items[-1]["id"] if len(items) == limit else None}


def item(row: Item | CreatedItem) -> dict[str, Any]:
    """An item as the contract shows it."""
    return {
        "id": row.id,
        "owner_id": row.owner_id,
        "name": row.name,
        "quantity": row.quantity,
        "created_at": timestamp(row.created_at),
    }


def transfer(row: Transfer | TransferRecord) -> dict[str, Any]:
    """A transfer as the contract shows it."""
    return {
        "id": row.id,
        "from_user_id": row.from_user_id,
        "to_user_id": row.to_user_id,
        "amount": row.amount,
        "created_at": timestamp(row.created_at),
    }
