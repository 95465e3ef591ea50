"""Users: create, read, list, change and remove."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import bindparam, delete, select
from sqlalchemy.orm import Session

from db.errors import violation_of
from db.models import User, utcnow
from service.errors import Conflict, NotFound

# Built once: SQLAlchemy finds a statement's compiled form by a key it computes from the
# statement object, once per object. ``session.get`` builds a new statement on every call, and
# computing its key is a tenth of a whole GET's instructions (bench/README.md).
_USER_BY_ID = select(User).where(User.id == bindparam("user_id"))


def create_user(session: Session, *, name: str, email: str, balance: int = 0) -> User:
    """Add a user; raise ``Conflict`` when the email is taken."""
    now = utcnow()
    user = User(name=name, email=email, balance=balance, created_at=now, updated_at=now)
    session.add(user)
    with violation_of("uq_users_email", raises=_email_taken()):
        session.flush()
    return user


def get_user(session: Session, user_id: int) -> User:
    """The user with this id; raise ``NotFound`` when there is none."""
    user = session.execute(_USER_BY_ID, {"user_id": user_id}).scalar_one_or_none()
    if user is None:
        raise NotFound(f"user {user_id} not found")
    return user


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
    user = get_user(session, user_id)
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
        raise NotFound(f"user {user_id} not found")


def _email_taken() -> Conflict:
    return Conflict("a user with this email already exists")
