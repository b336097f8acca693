"""Schema upgrades with Alembic, from the revisions in ``migrations/``.

``migrations/`` is installed as ``pipeline.migrations``, so the same code works from a clone
and from an installed wheel.
"""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from pipeline.errors import Conflict, SchemaMismatch
from pipeline.log.backends import lock_timed_out, migration_engine


def _script_location() -> Path:
    spec = importlib.util.find_spec("pipeline.migrations")
    if spec is not None and spec.origin is not None:
        return Path(spec.origin).parent
    return Path(__file__).resolve().parent.parent / "migrations"  # a clone without an install


def alembic_config(url: str, *, wait: float = 5.0) -> Config:
    """``wait``: how long the upgrade may wait for a lock (see ``migration_engine``)."""
    config = Config()
    config.set_main_option("script_location", str(_script_location()))
    config.attributes["url"] = url
    config.attributes["wait"] = wait
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("")).get_current_head()
    assert head is not None
    return head


def upgrade(url: str, *, wait: float = 5.0) -> None:
    """Bring the schema at ``url`` to the newest revision (blocking; not inside an event loop).
    Raises :class:`Conflict`, having changed nothing, when a lock it needs is not had within
    ``wait`` seconds (the commit timeout: see ``migration_engine``)."""
    try:
        command.upgrade(alembic_config(url, wait=wait), "head")
    except DBAPIError as exc:
        if not lock_timed_out(exc):
            raise
        raise Conflict(
            f"the schema upgrade waited {wait:g} s (SIGNALBOX_COMMIT_TIMEOUT) for a lock held "
            "by another session (a transaction left open, instances busy with a table it "
            "changes) and changed nothing: run it again, with the instances stopped if it "
            "keeps waiting") from exc


async def upgrade_async(url: str) -> None:
    """:func:`upgrade` from async code: Alembic runs its own event loop, so give it a thread."""
    await asyncio.to_thread(upgrade, url)


def known_revisions() -> set[str]:
    scripts = ScriptDirectory.from_config(alembic_config(""))
    return {script.revision for script in scripts.walk_revisions()}


async def current_revision(url: str) -> str | None:
    """The schema revision of the database at ``url`` (None: no schema yet)."""
    engine = migration_engine(url)
    try:
        async with engine.connect() as conn:
            return (await conn.execute(text("SELECT version_num FROM alembic_version"))
                    ).scalar_one_or_none()
    except SQLAlchemyError:
        return None  # no alembic_version table: an empty database
    finally:
        await engine.dispose()


def check_revision(revision: str | None, *, exact: bool) -> None:
    """Refuse a schema this code does not understand: newer (unknown) always, older when
    ``exact`` (that is, when no upgrade is about to run)."""
    head = head_revision()
    if revision is not None and revision not in known_revisions():
        raise SchemaMismatch(
            f"the database schema is at revision {revision}, newer than this Signalbox "
            f"understands (up to {head}): run the Signalbox version that migrated it, or newer"
        )
    if exact and revision != head:
        raise SchemaMismatch(
            f"the database schema is at revision {revision or 'none'}, this Signalbox needs "
            f"{head}: run `signalbox migrate` (or serve without --no-migrate)"
        )
