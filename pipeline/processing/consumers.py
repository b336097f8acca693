"""Durable consumers: a named reader's acknowledged position, kept by the server.

Acks are staged into the log's group commit (no event: a position is not a fact about a
signal), so they cost no transaction of their own, and a position only ever moves forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import case, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.dml import Insert

from pipeline.log import EventLog, Transaction, format_time
from pipeline.log.schema import consumers

_UPSERTS: dict[str, Insert] = {}


def _upsert(dialect: str) -> Insert:
    """INSERT … ON CONFLICT that keeps the larger position (one statement per dialect, so that
    many acks of a batch go out as one executemany)."""
    if dialect not in _UPSERTS:
        module: Any = postgresql if dialect == "postgresql" else sqlite
        statement = module.insert(consumers)
        excluded = statement.excluded
        _UPSERTS[dialect] = statement.on_conflict_do_update(
            index_elements=[consumers.c.name],
            set_={
                "position": case((excluded.position > consumers.c.position, excluded.position),
                                 else_=consumers.c.position),
                "updated_at": excluded.updated_at,
            },
        )
    return _UPSERTS[dialect]


@dataclass(frozen=True)
class ConsumerPosition:
    name: str
    position: int
    updated_at: str

    def to_body(self, head: int) -> dict[str, Any]:
        return {"name": self.name, "position": self.position,
                "lag": max(0, head - self.position), "updated_at": self.updated_at}


async def acknowledge(log: EventLog, name: str, position: int) -> None:
    """Store ``position`` as ``name``'s position (if it is further than the stored one)."""

    async def unit(tx: Transaction) -> None:
        stage_position(tx, name, position)

    await log.transact(unit)


async def start_position(log: EventLog, name: str, position: int) -> None:
    """Store ``position`` for a consumer that has no position yet; one that has keeps it.

    A new in-process handler starts at the head as of its server's start, fixed before the
    server takes requests, so that nothing accepted after the start is skipped however long
    the handler takes to get its lease."""

    async def unit(tx: Transaction) -> None:
        tx.stage(_insert_new(tx.dialect),
                 {"name": name, "position": position, "updated_at": format_time(tx.now)})

    await log.transact(unit)


_NEW: dict[str, Insert] = {}


def _insert_new(dialect: str) -> Insert:
    if dialect not in _NEW:
        module: Any = postgresql if dialect == "postgresql" else sqlite
        _NEW[dialect] = module.insert(consumers).on_conflict_do_nothing(
            index_elements=[consumers.c.name])
    return _NEW[dialect]


async def stored_position(engine: AsyncEngine, name: str) -> int | None:
    async with engine.connect() as conn:
        value = (await conn.execute(
            select(consumers.c.position).where(consumers.c.name == name)
        )).scalar_one_or_none()
    return None if value is None else int(value)


async def list_positions(engine: AsyncEngine) -> list[ConsumerPosition]:
    async with engine.connect() as conn:
        rows = (await conn.execute(select(consumers).order_by(consumers.c.name))).all()
    return [ConsumerPosition(r.name, int(r.position), r.updated_at) for r in rows]


def stage_position(tx: Transaction, name: str, position: int) -> None:
    """Stage ``name``'s position into ``tx``: it commits with whatever else ``tx`` holds."""
    tx.stage(_upsert(tx.dialect),
             {"name": name, "position": position, "updated_at": format_time(tx.now)})
