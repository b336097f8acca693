"""The event log, its head (with the epoch), the signals projection and tokens.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

POSITION = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("position", POSITION, primary_key=True, autoincrement=False),
        sa.Column("id", sa.String(36), nullable=False, unique=True),
        sa.Column("stream", sa.String(200), nullable=False),
        sa.Column("type", sa.String(100), nullable=False),
        sa.Column("data", sa.Text, nullable=False),
        sa.Column("meta", sa.Text, nullable=False),
        sa.Column("time", sa.String(32), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("ticker", sa.String(100), nullable=True),
        sa.Column("strategy", sa.String(200), nullable=True),
    )
    op.create_index("ix_events_stream_position", "events", ["stream", "position"])
    op.create_index("ix_events_type_position", "events", ["type", "position"])

    head = op.create_table(
        "log_head",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("epoch", sa.String(36), nullable=False),
        sa.Column("position", sa.BigInteger, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
    )
    # The epoch is born with the log: cursors are only meaningful together with it.
    op.bulk_insert(head, [{
        "id": 1,
        "epoch": str(uuid.uuid4()),
        "position": 0,
        "hash": "0" * 64,
        "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    }])

    op.create_table(
        "signals",
        sa.Column("signal_id", sa.String(36), primary_key=True),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("source", sa.String(20), nullable=False),
        sa.Column("token_name", sa.String(100), nullable=True),
        sa.Column("ticker", sa.String(100), nullable=True),
        sa.Column("strategy", sa.String(200), nullable=True),
        sa.Column("action", sa.String(20), nullable=True),
        sa.Column("idempotency_key", sa.String(200), nullable=True, unique=True),
        sa.Column("content_hash", sa.String(64), nullable=True),
        sa.Column("received_at", sa.String(32), nullable=False),
        sa.Column("updated_at", sa.String(32), nullable=False),
        sa.Column("first_position", sa.BigInteger, nullable=False),
        sa.Column("last_position", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_signals_content_hash", "signals", ["content_hash", "received_at"])
    op.create_index("ix_signals_received", "signals", ["first_position"])
    op.create_index("ix_signals_ticker", "signals", ["ticker", "first_position"])
    op.create_index("ix_signals_status", "signals", ["status", "first_position"])

    op.create_table(
        "tokens",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("scopes", sa.String(200), nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.Column("expires_at", sa.String(32), nullable=True),
        sa.Column("revoked_at", sa.String(32), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("tokens")
    op.drop_table("signals")
    op.drop_table("log_head")
    op.drop_table("events")
