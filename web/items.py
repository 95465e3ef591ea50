"""The items resource: one item or a batch of up to 1000, all or nothing."""

from __future__ import annotations

from typing import Annotated, Any, TypedDict

from sqlalchemy.orm import Session

from service import items
from service.errors import NotFound
from web import representations as show
from web.errors import Reply
from web.http import Call, Endpoint, route
from web.schemas import (
    IdRef,
    ItemName,
    Length,
    Quantity,
    body_validator,
    id_parameter,
    page_query,
)

MAX_BATCH = 1000


class NewItem(TypedDict):
    owner_id: IdRef
    name: ItemName
    quantity: Quantity


class NewItems(TypedDict):
    items: Annotated[list[NewItem], Length(1, MAX_BATCH)]


_one = body_validator(NewItem)
_batch = body_validator(NewItems)


def new_items(body: dict[str, Any]) -> Any:
    """A batch when the body has ``items``, otherwise one item."""
    return _batch(body) if "items" in body else _one(body)


def create(session: Session, call: Call) -> Reply:
    batch = "items" in call.body
    try:
        rows = items.create_items(session, call.body["items"] if batch else [call.body])
    except items.UnknownOwner as error:
        loc = ["items", error.index, "owner_id"] if batch else ["owner_id"]
        raise NotFound(error.message, [{"loc": loc, "msg": "no user has this id"}]) from error
    if batch:
        return Reply(201, {"items": [show.item(row) for row in rows]})
    return Reply(201, show.item(rows[0]), {"Location": f"/items/{rows[0].id}"})


def read(session: Session, call: Call) -> Reply:
    return Reply(200, show.item(items.get_item(session, call.id)))


def listing(session: Session, call: Call) -> Reply:
    rows = items.list_items(session, **call.query)
    return Reply(200, show.page("items", rows, call.query["limit"], show.item))


ROUTES = [
    route(
        "/items",
        GET=Endpoint(listing, query=lambda args: page_query(args, {"owner_id": id_parameter})),
        POST=Endpoint(create, body=new_items),
    ),
    route("/items/<id:id>", GET=Endpoint(read)),
]
