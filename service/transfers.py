"""Transfers: money moved between two balances atomically, each announced on a topic."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import NamedTuple, cast

from sqlalchemy import Table, bindparam, insert, or_, select, update
from sqlalchemy.orm import Session

from db import outbox
from db.models import MAX_BIGINT, Transfer, utcnow
from service.errors import Conflict, InsufficientFunds, NotFound
from service.users import USERS
from web import representations

# Every committed transfer is published here, its data what GET /transfers/{id} answers.
COMPLETED_TOPIC = "transfer-completed"
COMPLETED_TYPE = "transfer.completed"

TRANSFERS = cast(Table, Transfer.__table__)


class TransferRecord(NamedTuple):
    """A transfer as stored: what making or reading one returns, free of any session."""

    id: int
    from_user_id: int
    to_user_id: int
    amount: int
    created_at: datetime


# Statements over the tables, as service/users.py explains, built once. A balance changes by
# an amount in SQL: the row is locked, and the statement says exactly what the transfer does.
_COLUMNS = [TRANSFERS.c[field] for field in TransferRecord._fields]
_LOCK_BALANCES = (
    select(USERS.c.id, USERS.c.balance)
    .where(USERS.c.id.in_([bindparam("from_user_id"), bindparam("to_user_id")]))
    .order_by(USERS.c.id)
    .with_for_update()
)
_ADD_TO_BALANCE = (
    update(USERS)
    .where(USERS.c.id == bindparam("user_id"))
    .values(balance=USERS.c.balance + bindparam("amount"), updated_at=bindparam("now"))
)
_INSERT_TRANSFER = insert(TRANSFERS).returning(*_COLUMNS)
_TRANSFER_BY_ID = select(*_COLUMNS).where(TRANSFERS.c.id == bindparam("transfer_id"))


def create_transfer(
    session: Session, *, from_user_id: int, to_user_id: int, amount: int
) -> TransferRecord:
    """Move ``amount`` from one user to another.

    Both rows are locked FOR UPDATE in id order, so concurrent transfers queue
    instead of deadlocking, and each sees the balances the previous one left.
    Raises ``NotFound``, ``InsufficientFunds``, or ``Conflict`` when the
    receiver's balance would pass 2^63-1. Emits a ``transfer.completed`` event.
    """
    both = {"from_user_id": from_user_id, "to_user_id": to_user_id}
    connection = session.connection()
    balances: dict[int, int] = dict(connection.execute(_LOCK_BALANCES, both).all())
    for user_id in (from_user_id, to_user_id):
        if user_id not in balances:
            raise NotFound(f"user {user_id} not found")
    if balances[from_user_id] < amount:
        raise InsufficientFunds(f"user {from_user_id} has a balance below {amount}")
    if balances[to_user_id] > MAX_BIGINT - amount:
        raise Conflict(f"the balance of user {to_user_id} would pass the maximum")

    now = utcnow()
    connection.execute(
        _ADD_TO_BALANCE,
        [
            {"user_id": from_user_id, "amount": -amount, "now": now},
            {"user_id": to_user_id, "amount": amount, "now": now},
        ],
    )
    transfer = TransferRecord._make(
        connection.execute(_INSERT_TRANSFER, {**both, "amount": amount, "created_at": now}).one()
    )
    outbox.emit(
        session,
        COMPLETED_TOPIC,
        representations.transfer(transfer),
        attributes={"event_type": COMPLETED_TYPE},
    )
    return transfer


def get_transfer(session: Session, transfer_id: int) -> TransferRecord:
    """The transfer with this id; raise ``NotFound`` when there is none."""
    row = session.connection().execute(_TRANSFER_BY_ID, {"transfer_id": transfer_id}).one_or_none()
    if row is None:
        raise NotFound(f"transfer {transfer_id} not found")
    return TransferRecord._make(row)


def list_transfers(
    session: Session, *, limit: int, after: int, user_id: int | None = None
) -> Sequence[Transfer]:
    """Up to ``limit`` transfers with ids above ``after``, ascending; ``user_id``: either side."""
    query = select(Transfer).where(Transfer.id > after).order_by(Transfer.id).limit(limit)
    if user_id is not None:
        query = query.where(or_(Transfer.from_user_id == user_id, Transfer.to_user_id == user_id))
    return session.scalars(query).all()
