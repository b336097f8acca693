"""The tables. Migrations in ``migrations/`` create them; this module is how code refers to them."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

# On SQLite an INTEGER PRIMARY KEY is the rowid itself: the fastest possible ordered key.
PositionType = BigInteger().with_variant(Integer(), "sqlite")

events = Table(
    "events",
    metadata,
    Column("position", PositionType, primary_key=True, autoincrement=False),
    Column("id", String(36), nullable=False, unique=True),
    Column("stream", String(200), nullable=False),
    Column("type", String(100), nullable=False),
    Column("data", Text, nullable=False),
    Column("meta", Text, nullable=False),
    Column("time", String(32), nullable=False),
    Column("hash", String(64), nullable=False),
    # Copies of meta["ticker"] / meta["strategy"], so that readers can filter in SQL.
    Column("ticker", String(100), nullable=True),
    Column("strategy", String(200), nullable=True),
    Index("ix_events_stream_position", "stream", "position"),
    Index("ix_events_type_position", "type", "position"),
)

log_head = Table(
    "log_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("epoch", String(36), nullable=False),
    # Last committed position and hash. Every append locks this row first, which serializes
    # position assignment in commit order (see docs/protocol.md, "Ordering").
    Column("position", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
    Column("created_at", String(32), nullable=False),
)

signals = Table(
    "signals",
    metadata,
    Column("signal_id", String(36), primary_key=True),
    Column("status", String(20), nullable=False),
    Column("source", String(20), nullable=False),
    Column("token_name", String(100), nullable=True),
    Column("ticker", String(100), nullable=True),
    Column("strategy", String(200), nullable=True),
    Column("action", String(20), nullable=True),
    Column("idempotency_key", String(200), nullable=True, unique=True),
    Column("content_hash", String(64), nullable=True),
    Column("received_at", String(32), nullable=False),
    Column("updated_at", String(32), nullable=False),
    Column("first_position", BigInteger, nullable=False),
    Column("last_position", BigInteger, nullable=False),
    Column("claimed_by", String(200), nullable=True),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("last_error", Text, nullable=True),
    Column("dispatched_at", String(32), nullable=True),
    Column("processing_at", String(32), nullable=True),
    Column("processed_at", String(32), nullable=True),
    Column("failed_at", String(32), nullable=True),
    Column("expired_at", String(32), nullable=True),
    Index("ix_signals_content_hash", "content_hash", "received_at"),
    Index("ix_signals_processing", "status", "processing_at"),
    Index("ix_signals_received", "first_position"),
    Index("ix_signals_ticker", "ticker", "first_position"),
    Index("ix_signals_status", "status", "first_position"),
)

tokens = Table(
    "tokens",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("scopes", String(200), nullable=False),
    Column("created_at", String(32), nullable=False),
    Column("expires_at", String(32), nullable=True),
    Column("revoked_at", String(32), nullable=True),
)

consumers = Table(
    "consumers",
    metadata,
    Column("name", String(200), primary_key=True),
    # The last position the consumer acknowledged: it resumes after it.
    Column("position", BigInteger, nullable=False),
    Column("updated_at", String(32), nullable=False),
)

leases = Table(
    "leases",
    metadata,
    Column("name", String(200), primary_key=True),
    # The instance that holds it, until expires_at unless renewed.
    Column("holder", String(100), nullable=False),
    Column("expires_at", String(32), nullable=False),
)
