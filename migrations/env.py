"""Alembic environment: async engines, SQLite in batch mode, one migrator at a time.

Run through ``signalbox migrate`` (or ``pipeline.migrate``), which passes the database URL in
the Alembic config. Instances that start together apply each revision exactly once; the others
wait and then find nothing left to do: on SQLite the one transaction of the upgrade holds the
write lock, on PostgreSQL an advisory lock is held around it.

On PostgreSQL the upgrade's session waits for a lock, and pauses between two statements of its
transaction, the commit timeout at most (see ``migration_engine``): a revision that computes
in Python between statements must keep each pause well under it.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from pipeline.log.backends import migration_engine
from pipeline.log.schema import metadata

MIGRATION_LOCK = 0x5167_6E61_6C62_6F78  # "Sgnalbox": the advisory lock key


def _run(connection: Connection) -> None:
    is_sqlite = connection.dialect.name == "sqlite"
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=is_sqlite,
        # One transaction for every revision to apply, SQLite included (Alembic would commit
        # each revision on its own there): it holds the write lock (BEGIN IMMEDIATE, see
        # migration_engine) from reading the schema's revision to the end, so instances that
        # start together apply each revision once. PostgreSQL's advisory lock does the same.
        transactional_ddl=True,
        transaction_per_migration=False,
    )
    if connection.dialect.name == "postgresql":
        # Waiting for another instance's upgrade, however long, is what this lock is for: it
        # holds up no one else (the lock_timeout of migration_engine is for the others).
        connection.execute(text("SET LOCAL lock_timeout = 0"))
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
        connection.commit()
    try:
        with context.begin_transaction():
            context.run_migrations()
    finally:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK})
            connection.commit()


async def _main(url: str, wait: float) -> None:
    engine = migration_engine(url, wait=wait)
    try:
        async with engine.connect() as conn:
            await conn.run_sync(_run)
    finally:
        await engine.dispose()


def run() -> None:
    url = context.config.attributes.get("url")
    if not url:
        raise RuntimeError("no database URL: run migrations through `signalbox migrate`")
    asyncio.run(_main(url, context.config.attributes.get("wait", 5.0)))


if context.is_offline_mode():  # pragma: no cover - offline SQL generation is not offered
    raise RuntimeError("offline migrations are not supported: run `signalbox migrate`")
run()
