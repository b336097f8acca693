"""Schema upgrades: raced by instances starting together, and refused when they do not fit."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from pathlib import Path

import asyncpg
import pytest
from alembic import command
from sqlalchemy import Connection, Engine, event, text

from pipeline import migrate
from pipeline.log.backends import migration_engine
from tests.support import ServerProcess


async def scalar_rows(url: str, sql: str) -> list[object]:
    engine = migration_engine(url)
    try:
        async with engine.connect() as conn:
            return list((await conn.execute(text(sql))).scalars())
    finally:
        await engine.dispose()


async def test_instances_starting_together_migrate_exactly_once(database_url: str) -> None:
    servers = [ServerProcess(database_url) for _ in range(3)]
    threads = [threading.Thread(target=server.start) for server in servers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        assert all(s.process is not None and s.process.poll() is None and s.port
                   for s in servers), [s.output[-5:] for s in servers]
        assert await scalar_rows(database_url, "SELECT version_num FROM alembic_version") == [
            migrate.head_revision()]
        epochs = await scalar_rows(database_url, "SELECT epoch FROM log_head")
        assert len(epochs) == 1
    finally:
        for server in servers:
            server.stop()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_an_upgrade_is_one_transaction_on_sqlite(database_url: str) -> None:
    """Every revision from an empty database to the head in one transaction, which holds the
    write lock from the reading of the schema's revision to the end: committed a revision at a
    time, another process could run a revision between two commits, and the first would then
    run it again ("table ... already exists")."""
    commits: list[Connection] = []

    def committed(connection: Connection) -> None:
        commits.append(connection)

    event.listen(Engine, "commit", committed)
    try:
        await migrate.upgrade_async(database_url)
    finally:
        event.remove(Engine, "commit", committed)
    assert len(migrate.known_revisions()) > 1 and len(commits) == 1
    assert await scalar_rows(database_url, "SELECT version_num FROM alembic_version") == [
        migrate.head_revision()]


def signalbox(database_url: str, *args: str,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", *args, "--database-url",
                           database_url], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})}, check=False)


async def test_a_schema_newer_than_the_code_is_refused(database_url: str) -> None:
    await migrate.upgrade_async(database_url)
    await execute(database_url, "UPDATE alembic_version SET version_num = 'ffff'")
    for args in (["serve", "--port", "0"], ["serve", "--no-migrate", "--port", "0"],
                 ["migrate"], ["token", "list"], ["token", "create", "bot", "--scope", "read"],
                 ["rebuild"]):
        done = signalbox(database_url, *args)
        assert done.returncode != 0
        assert "newer than this Signalbox understands" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_an_older_schema_is_upgraded_by_serve_and_refused_without_migrating(
        database_url: str) -> None:
    await asyncio.to_thread(command.upgrade, migrate.alembic_config(database_url), "0001")
    refused = signalbox(database_url, "serve", "--no-migrate", "--port", "0")
    assert refused.returncode != 0 and "run `signalbox migrate`" in refused.stderr
    server = ServerProcess(database_url).start()  # serve migrates first
    server.stop()
    assert await scalar_rows(database_url, "SELECT version_num FROM alembic_version") == [
        migrate.head_revision()]


async def execute(url: str, sql: str) -> None:
    if url.startswith("sqlite"):
        engine = migration_engine(url)
        try:
            async with engine.begin() as conn:
                await conn.execute(text(sql))
        finally:
            await engine.dispose()
        return
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def test_a_mistyped_sqlite_path_is_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such.db"
    for args in (["token", "list"], ["token", "create", "bot", "--scope", "read"],
                 ["rebuild"]):
        done = signalbox(f"sqlite+aiosqlite:///{missing}", *args)
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
        assert f"there is no database at {missing}" in done.stderr, done.stderr
        assert not missing.parent.exists()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_an_upgrade_that_cannot_take_its_locks_gives_up_in_one_line(
        database_url: str) -> None:
    """An upgrade waiting for a lock held by another session (instances of the old version
    reading a table it alters, an operator's transaction) makes every later query of that
    table queue behind it: every instance stops. It gives up after a commit timeout instead,
    in one line that says what to do, and can be run again."""
    await asyncio.to_thread(command.upgrade, migrate.alembic_config(database_url), "0002")
    admin = await asyncpg.connect(database_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        async with admin.transaction():
            await admin.execute("SELECT version_num FROM alembic_version FOR UPDATE")
            refused = await asyncio.to_thread(
                signalbox, database_url, "migrate", env={"SIGNALBOX_COMMIT_TIMEOUT": "1"})
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "Traceback" not in refused.stderr and len(refused.stderr.splitlines()) == 1
        assert "lock" in refused.stderr
        assert await scalar_rows(database_url, "SELECT version_num FROM alembic_version") == [
            "0002"]
    finally:
        await admin.close()
    assert signalbox(database_url, "migrate").returncode == 0
