"""The users resource: parse, call the domain, respond."""

from __future__ import annotations

from typing import NotRequired, TypedDict

from sqlalchemy.orm import Session

from service import users
from web import representations as show
from web.errors import Reply
from web.http import Call, Endpoint, route
from web.schemas import (
    Balance,
    Email,
    UserName,
    body_validator,
    email_filter,
    page_query,
)


class NewUser(TypedDict):
    name: UserName
    email: Email
    balance: NotRequired[Balance]


class UserChanges(TypedDict, total=False):
    name: UserName
    email: Email


def create(session: Session, call: Call) -> Reply:
    user = users.create_user(session, **call.body)
    return Reply(201, show.user(user), {"Location": f"/users/{user.id}"})


def read(session: Session, call: Call) -> Reply:
    return Reply(200, show.user(users.get_user(session, call.id)))


def listing(session: Session, call: Call) -> Reply:
    rows = users.list_users(session, **call.query)
    return Reply(200, show.page("users", rows, call.query["limit"], show.user))


def update(session: Session, call: Call) -> Reply:
    return Reply(200, show.user(users.update_user(session, call.id, **call.body)))


def remove(session: Session, call: Call) -> Reply:
    users.delete_user(session, call.id)
    return Reply(204)


ROUTES = [
    route(
        "/users",
        GET=Endpoint(listing, query=lambda args: page_query(args, {"email": email_filter})),
        POST=Endpoint(create, body=body_validator(NewUser)),
    ),
    route(
        "/users/<id:id>",
        GET=Endpoint(read),
        PATCH=Endpoint(update, body=body_validator(UserChanges)),
        DELETE=Endpoint(remove),
    ),
]
