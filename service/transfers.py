"""Transfers: money moved between two balances atomically, each announced on a topic."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import bindparam, or_, select
from sqlalchemy.orm import Session

from db import outbox
from db.models import MAX_BIGINT, Transfer, User, utcnow
from service.errors import Conflict, InsufficientFunds, NotFound
from web import representations

# Every committed transfer is published here, its data what GET /transfers/{id} answers.
COMPLETED_TOPIC = "transfer-completed"
COMPLETED_TYPE = "transfer.completed"

# Built once, as service/users.py's: their cache keys are computed once, not on every call.
_LOCK_BOTH = (
    select(User)
    .where(User.id.in_([bindparam("from_user_id"), bindparam("to_user_id")]))
    .order_by(User.id)
    .with_for_update()
)
_TRANSFER_BY_ID = select(Transfer).where(Transfer.id == bindparam("transfer_id"))


def create_transfer(
    session: Session, *, from_user_id: int, to_user_id: int, amount: int
) -> Transfer:
    """Move ``amount`` from one user to another.

    Both rows are locked FOR UPDATE in id order, so concurrent transfers queue
    instead of deadlocking, and each sees the balances the previous one left.
    Raises ``NotFound``, ``InsufficientFunds``, or ``Conflict`` when the
    receiver's balance would pass 2^63-1. Emits a ``transfer.completed`` event.
    """
    both = {"from_user_id": from_user_id, "to_user_id": to_user_id}
    locked = session.scalars(_LOCK_BOTH, both).all()
    by_id = {user.id: user for user in locked}
    for user_id in (from_user_id, to_user_id):
        if user_id not in by_id:
            raise NotFound(f"user {user_id} not found")
    sender, receiver = by_id[from_user_id], by_id[to_user_id]
    if sender.balance < amount:
        raise InsufficientFunds(f"user {from_user_id} has a balance below {amount}")
    if receiver.balance > MAX_BIGINT - amount:
        raise Conflict(f"the balance of user {to_user_id} would pass the maximum")

    now = utcnow()
    sender.balance -= amount
    receiver.balance += amount
    sender.updated_at = receiver.updated_at = now
    transfer = Transfer(
        from_user_id=from_user_id, to_user_id=to_user_id, amount=amount, created_at=now
    )
    session.add(transfer)
    session.flush()
    outbox.emit(
        session,
        COMPLETED_TOPIC,
        representations.transfer(transfer),
        attributes={"event_type": COMPLETED_TYPE},
    )
    return transfer


def get_transfer(session: Session, transfer_id: int) -> Transfer:
    """The transfer with this id; raise ``NotFound`` when there is none."""
    transfer = session.execute(_TRANSFER_BY_ID, {"transfer_id": transfer_id}).scalar_one_or_none()
    if transfer is None:
        raise NotFound(f"transfer {transfer_id} not found")
    return transfer


def list_transfers(
    session: Session, *, limit: int, after: int, user_id: int | None = None
) -> Sequence[Transfer]:
    """Up to ``limit`` transfers with ids above ``after``, ascending; ``user_id``: either side."""
    query = select(Transfer).where(Transfer.id > after).order_by(Transfer.id).limit(limit)
    if user_id is not None:
        query = query.where(or_(Transfer.from_user_id == user_id, Transfer.to_user_id == user_id))
    return session.scalars(query).all()
