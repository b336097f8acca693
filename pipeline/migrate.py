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


def _script_location() -> Path:
    spec = importlib.util.find_spec("pipeline.migrations")
    if spec is not None and spec.origin is not None:
        return Path(spec.origin).parent
    return Path(__file__).resolve().parent.parent / "migrations"  # a clone without an install


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_script_location()))
    config.attributes["url"] = url
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("")).get_current_head()
    assert head is not None
    return head


def upgrade(url: str) -> None:
    """Bring the schema at ``url`` to the newest revision (blocking; not inside an event loop)."""
    command.upgrade(alembic_config(url), "head")


async def upgrade_async(url: str) -> None:
    """:func:`upgrade` from async code: Alembic runs its own event loop, so give it a thread."""
    await asyncio.to_thread(upgrade, url)
