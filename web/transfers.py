"""The transfers resource: atomic moves of money between two users."""

from __future__ import annotations

from typing import TypedDict

from sqlalchemy.orm import Session

from service import transfers
from service.errors import ValidationFailed
from web import representations as show
from web.errors import Reply
from web.http import Call, Endpoint, route
from web.schemas import Amount, IdRef, body_validator, id_parameter, page_query


class NewTransfer(TypedDict):
    from_user_id: IdRef
    to_user_id: IdRef
    amount: Amount


_fields = body_validator(NewTransfer)


def new_transfer(body: object) -> NewTransfer:
    """The validated transfer; moving money to oneself is a field error too."""
    transfer = _fields(body)
    if transfer["from_user_id"] == transfer["to_user_id"]:
        raise ValidationFailed([{"loc": ["to_user_id"], "msg": "must differ from from_user_id"}])
    return transfer


def create(session: Session, call: Call) -> Reply:
    transfer = transfers.create_transfer(session, **call.body)
    return Reply(201, show.transfer(transfer), {"Location": f"/transfers/{transfer.id}"})


def read(session: Session, call: Call) -> Reply:
    return Reply(200, show.transfer(transfers.get_transfer(session, call.id)))


def listing(session: Session, call: Call) -> Reply:
    rows = transfers.list_transfers(session, **call.query)
    return Reply(200, show.page("transfers", rows, call.query["limit"], show.transfer))


ROUTES = [
    route(
        "/transfers",
        GET=Endpoint(listing, query=lambda args: page_query(args, {"user_id": id_parameter})),
        POST=Endpoint(create, body=new_transfer),
    ),
    route("/transfers/<id:id>", GET=Endpoint(read)),
]
