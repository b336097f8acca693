"""Processing: status columns of the signals projection, and durable consumer positions.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

STEP_COLUMNS = ("dispatched_at", "processing_at", "processed_at", "failed_at", "expired_at")


def upgrade() -> None:
    with op.batch_alter_table("signals") as batch:
        batch.add_column(sa.Column("claimed_by", sa.String(200), nullable=True))
        batch.add_column(sa.Column("attempts", sa.Integer, nullable=False,
                                   server_default="0"))
        batch.add_column(sa.Column("last_error", sa.Text, nullable=True))
        for name in STEP_COLUMNS:
            batch.add_column(sa.Column(name, sa.String(32), nullable=True))
    op.create_index("ix_signals_processing", "signals", ["status", "processing_at"])
    op.create_table(
        "consumers",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("position", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.String(32), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("consumers")
    op.drop_index("ix_signals_processing", "signals")
    with op.batch_alter_table("signals") as batch:
        for name in (*STEP_COLUMNS, "last_error", "attempts", "claimed_by"):
            batch.drop_column(name)
