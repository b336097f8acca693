"""PostgreSQL LISTEN/NOTIFY: the listener connects with the URL's connection options."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import asyncpg
import pytest

from pipeline.log.notify import CHANNEL, Wakeups
from tests.support import create_pg_database, drop_pg_database


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    url, name = await create_pg_database()
    try:
        yield url
    finally:
        await drop_pg_database(name)


@pytest.mark.parametrize("options", ["ssl=prefer", "command_timeout=30",
                                     "prepared_statement_cache_size=0",
                                     "ssl=prefer&command_timeout=30"])
async def test_listener_takes_connection_options_of_the_url(
        pg_url: str, options: str, caplog: pytest.LogCaptureFixture) -> None:
    """asyncpg makes a DSN's unknown query keys server settings, which ``ssl`` and the like
    cannot be: the listener must read them as the engines do, or never connect at all."""
    heard: asyncio.Queue[int | None] = asyncio.Queue()
    wakeups = Wakeups(f"{pg_url}?{options}", heard.put_nowait, retry=0.05)
    caplog.set_level(logging.WARNING, logger="signalbox.notify")
    await wakeups.start()
    try:
        await asyncio.wait_for(wakeups.connected.wait(), 10)
        assert await asyncio.wait_for(heard.get(), 10) is None  # the (re)connection's wake-up
        conn = await asyncpg.connect(pg_url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            await conn.execute(f"NOTIFY {CHANNEL}, '42'")
        finally:
            await conn.close()
        assert await asyncio.wait_for(heard.get(), 10) == 42
    finally:
        await wakeups.stop()
    assert "LISTEN connection failed" not in caplog.text
