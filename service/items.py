"""Items: created one at a time or in batches of up to 1000, all or nothing."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import NamedTuple, TypedDict, cast

from sqlalchemy import Table, insert, select
from sqlalchemy.orm import Session

from db.errors import violation_of
from db.models import Item, User, utcnow
from service.errors import NotFound

ITEMS = cast(Table, Item.__table__)


class NewItem(TypedDict):
    """The fields of an item to create, already validated."""

    owner_id: int
    name: str
    quantity: int


class CreatedItem(NamedTuple):
    """An item just written: its new id and what it was written with."""

    id: int
    owner_id: int
    name: str
    quantity: int
    created_at: datetime


class UnknownOwner(NotFound):
    """Raised when an item's ``owner_id`` names no user; ``index`` is its place in the batch."""

    def __init__(self, index: int, owner_id: int) -> None:
        super().__init__(f"user {owner_id} not found")
        self.index = index
        self.owner_id = owner_id


def create_items(session: Session, new_items: Sequence[NewItem]) -> list[CreatedItem]:
    """Add the items in order with one multi-row INSERT; ``UnknownOwner`` for a missing owner.

    The owners are locked FOR KEY SHARE: none can be removed before this transaction ends.
    """
    owner_ids = {item["owner_id"] for item in new_items}
    found = set(
        session.scalars(
            select(User.id).where(User.id.in_(owner_ids)).with_for_update(key_share=True)
        )
    )
    for index, item in enumerate(new_items):
        if item["owner_id"] not in found:
            raise UnknownOwner(index, item["owner_id"])
    now = utcnow()
    # A Core INSERT of the table, executed with 1000 parameter sets: SQLAlchemy sends it as
    # one INSERT ... VALUES ... RETURNING per 1000 rows. It returns only the ids, and skips
    # the ORM's bookkeeping per row, which would cost more than the database does.
    statement = insert(ITEMS).returning(ITEMS.c.id, sort_by_parameter_order=True)
    removed = NotFound("an owner was removed while its items were created")
    with violation_of("fk_items_owner_id_users", raises=removed):
        ids = session.scalars(statement, [{**item, "created_at": now} for item in new_items]).all()
    return [
        CreatedItem(id, **item, created_at=now) for id, item in zip(ids, new_items, strict=True)
    ]


def get_item(session: Session, item_id: int) -> Item:
    """The item with this id; raise ``NotFound`` when there is none."""
    item = session.get(Item, item_id)
    if item is None:
        raise NotFound(f"item {item_id} not found")
    return item


def list_items(
    session: Session, *, limit: int, after: int, owner_id: int | None = None
) -> Sequence[Item]:
    """Up to ``limit`` items with ids above ``after``, ascending, optionally of one owner."""
    query = select(Item).where(Item.id > after).order_by(Item.id).limit(limit)
    if owner_id is not None:
        query = query.where(Item.owner_id == owner_id)
    return session.scalars(query).all()
