"""Users: create, read, list, change and remove."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import NamedTuple, cast

from sqlalchemy import Table, bindparam, delete, insert, select
from sqlalchemy.orm import Session

from db.errors import violation_of
from db.models import User, utcnow
from service.errors import Conflict, NotFound

USERS = cast(Table, User.__table__)


class UserRecord(NamedTuple):
    """A user as stored: what creating or reading one returns, free of any session."""

    id: int
    name: str
    email: str
    balance: int
    created_at: datetime
    updated_at: datetime


# Reading a user to show it and adding one are each a single statement that says it all, so
# they are statements over the table, run on the session's connection in its transaction,
# rather than through the ORM's identity map and unit of work, which cost an eighth of a GET's
# instructions and a quarter of a POST's (docs/design.md). Built once, so that SQLAlchemy
# computes their cache keys once.
_COLUMNS = [USERS.c[field] for field in UserRecord._fields]
_USER_BY_ID = select(*_COLUMNS).where(USERS.c.id == bindparam("user_id"))
_INSERT_USER = insert(USERS).returning(*_COLUMNS)


def create_user(session: Session, *, name: str, email: str, balance: int = 0) -> UserRecord:
    """Add a user; raise ``Conflict`` when the email is taken."""
    now = utcnow()
    new = {"name": name, "email": email, "balance": balance, "created_at": now, "updated_at": now}
    with violation_of("uq_users_email", raises=_email_taken()):
        return UserRecord._make(session.connection().execute(_INSERT_USER, new).one())


def get_user(session: Session, user_id: int) -> UserRecord:
    """The user with this id; raise ``NotFound`` when there is none."""
    row = session.connection().execute(_USER_BY_ID, {"user_id": user_id}).one_or_none()
    if row is None:
        raise _not_found(user_id)
    return UserRecord._make(row)


def list_users(
    session: Session, *, limit: int, after: int, email: str | None = None
) -> Sequence[User]:
    """Up to ``limit`` users with ids above ``after``, ascending, optionally by email."""
    query = select(User).where(User.id > after).order_by(User.id).limit(limit)
    if email is not None:
        query = query.where(User.email == email.lower())
    return session.scalars(query).all()


def update_user(
    session: Session, user_id: int, *, name: str | None = None, email: str | None = None
) -> User:
    """Change a user's name or email; raise ``NotFound`` or ``Conflict``."""
    user = session.get(User, user_id)
    if user is None:
        raise _not_found(user_id)
    if name is not None:
        user.name = name
    if email is not None:
        user.email = email
    with violation_of("uq_users_email", raises=_email_taken()):
        session.flush()
    return user


def delete_user(session: Session, user_id: int) -> None:
    """Remove a user and their items; ``NotFound``, or ``Conflict`` if they have transfers."""
    has_transfers = Conflict(f"user {user_id} has transfers and cannot be removed")
    with violation_of(
        "fk_transfers_from_user_id_users", "fk_transfers_to_user_id_users", raises=has_transfers
    ):
        result = session.execute(delete(User).where(User.id == user_id))
    if result.rowcount == 0:  # type: ignore[attr-defined]
        raise _not_found(user_id)


def _not_found(user_id: int) -> NotFound:
    return NotFound(f"user {user_id} not found")


def _email_taken() -> Conflict:
    return Conflict("a user with this email already exists")
