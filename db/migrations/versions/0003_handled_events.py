"""handled events

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from db.types import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "handled_events",
        sa.Column("source", sa.String(1024), nullable=False),
        sa.Column("id", sa.String(1024), nullable=False),
        sa.Column("type", sa.String(1024), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(2000), nullable=True),
        sa.Column("handled_at", UTCDateTime(), nullable=False),
        sa.CheckConstraint(
            "outcome IN ('applied', 'rejected')", name=op.f("ck_handled_events_known_outcome")
        ),
        sa.PrimaryKeyConstraint("source", "id", name=op.f("pk_handled_events")),
    )
    op.create_index("ix_handled_events_handled_at", "handled_events", ["handled_at"])


def downgrade() -> None:
    op.drop_table("handled_events")
